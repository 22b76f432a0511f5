"""The sections of an experiment configuration and :class:`ExperimentConfig` (pydantic v2, unknown keys
rejected). Only builders read configs; library constructors take explicit arguments."""
from __future__ import annotations

from typing import Literal, get_args

from pydantic import Field, field_validator, model_validator

from labelshift.config.base import PositiveFloat, PositiveInt, StrictModel
from labelshift.config.sweep import SweepConfig, space_errors

PipelineStage = Literal["pretrain", "estimate", "evaluate_adapted", "refine", "evaluate_refined", "pseudo",
                        "distill", "evaluate_distilled", "export"]
PIPELINE_STAGES: tuple[str, ...] = get_args(PipelineStage)


class WorldConfig(StrictModel):
    """The embedded synthetic world (``labelshift.data.world.generate_world``; knobs in docs/world.md).

    Knobs left unset (None) take the generator's defaults (``WorldKnobs``, docs/world.md).
    """

    seed: int = 0
    size: tuple[int, int] | None = None  # (width, height)
    source_layout: Literal["gta5", "synthia"] | None = None  # the source's on-disk layout (default gta5)
    num_source: int | None = None
    num_target_train: int | None = None
    num_target_val: int | None = None
    source_val_fraction: float | None = Field(None, gt=0.0, lt=1.0)
    presence_floor: float | None = None
    label_shift: float | None = None
    class_separation: float | None = None
    instance_color_std: float | None = None
    pixel_noise_std: float | None = None
    target_instance_color_std: float | None = None
    target_color_cast: float | None = None
    target_blur_sigma: float | None = None
    target_extra_noise_std: float | None = None
    target_select_fraction: float | None = None

    @model_validator(mode="after")
    def _check_knobs(self) -> "WorldConfig":
        from labelshift.world_knobs import make_knobs

        make_knobs(**self.model_dump(exclude_none=True))  # the generator's own ranges, reported under data.world
        return self


class DatasetConfig(StrictModel):
    """One dataset on disk in its real layout."""

    kind: Literal["gta5", "synthia", "cityscapes"]
    root: str
    split: str | None = None  # cityscapes: train|val; gta5/synthia: optional list file of stems
    list_file: str | None = None


class TransformConfig(StrictModel):
    """Images are resized to ``size``; training adds random scale, crop, flip and colour jitter.

    ``base_size``: training resizes to it (instead of ``size``) before the random scale and crop, e.g. the full
    2048x1024 Cityscapes frame so that crops at scales >= 0.5 need no padding. ``color_jitter``: brightness,
    contrast and saturation strength; ``hue``: hue shift strength (a fraction of the colour wheel, as
    torchvision's ColorJitter)."""

    size: tuple[PositiveInt, PositiveInt]  # (width, height) the model sees
    base_size: tuple[PositiveInt, PositiveInt] | None = None  # (width, height) before scale/crop in training
    crop_size: tuple[PositiveInt, PositiveInt] | None = None  # (width, height) random crop for training
    scale_range: tuple[PositiveFloat, PositiveFloat] = (1.0, 1.0)
    flip: bool = True
    color_jitter: float = Field(0.0, ge=0.0, le=1.0)
    hue: float = Field(0.0, ge=0.0, le=0.5)

    @model_validator(mode="after")
    def _ordered_scales(self) -> "TransformConfig":
        if self.scale_range[0] > self.scale_range[1]:
            raise ValueError(f"scale_range must be (low, high) with low <= high, got {self.scale_range}")
        return self


class DataConfig(StrictModel):
    source: DatasetConfig
    target: DatasetConfig
    source_val: DatasetConfig | None = None  # labelled source split for calibration / BBSE / model selection
    target_val: DatasetConfig
    # labelled held-out subset of target train for model selection (sweeps); never the evaluation split, and
    # kept out of ``target`` (the unlabelled pool the priors are estimated on): docs in README "Sweeps"
    target_select: DatasetConfig | None = None
    world: WorldConfig | None = None  # set: generate the embedded world under ``source.root``'s parent
    class_set: Literal["cityscapes19", "synthia16"] = "cityscapes19"
    source_transform: TransformConfig | None = None  # default: resize to 1280x720 (GTA5 in the reference)
    target_transform: TransformConfig | None = None  # default: resize to 1024x512 (Cityscapes in the reference)
    num_workers: int = Field(0, ge=0)
    interpolation: Literal["area_linear", "bicubic"] = "area_linear"  # image resizing (labels: nearest)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    @model_validator(mode="after")
    def _world_layout_is_the_source_kind(self) -> "DataConfig":
        layout = (self.world.source_layout or "gta5") if self.world is not None else None
        if layout is not None and self.source.kind != layout:
            raise ValueError(f"the embedded world writes a {layout} source (data.world.source_layout), but "
                             f"data.source.kind is {self.source.kind!r}")
        return self

    @model_validator(mode="after")
    def _default_transforms(self) -> "DataConfig":
        if self.source_transform is None:
            self.source_transform = TransformConfig(size=(1280, 720))
        if self.target_transform is None:
            self.target_transform = TransformConfig(size=(1024, 512))
        return self


class ModelConfig(StrictModel):
    name: str = "small"  # a name of labelshift.models.model_names()
    frozen_bn: bool = False
    pretrained: str | None = None  # None | "imagenet" (torchvision weights) | path to a backbone file
    checkpoint: str | None = None  # adapted model to start from (reference/FADA format or ours)
    width: PositiveInt = 32  # small model only
    align_corners: bool = False  # bilinear upsampling of the logits to label size (FADA/the reference: True)

    @field_validator("name")
    @classmethod
    def _registered(cls, name: str) -> str:
        from labelshift.models import model_names

        if name not in model_names():
            raise ValueError(f"unknown model {name!r}; expected one of {model_names()}")
        return name


class OptimConfig(StrictModel):
    optimizer: Literal["sgd", "adam"] = "sgd"  # the reference recipe is SGD; adam trains the small CPU model faster
    iterations: PositiveInt = 1000  # steps trained
    schedule_iterations: PositiveInt | None = None  # poly LR horizon (the reference's MAX_ITER); None: iterations
    batch_size: PositiveInt = 8  # global batch, split across workers
    sampler: Literal["uniform", "class_balanced"] = "uniform"  # class_balanced: FADA's source sampler
    lr: PositiveFloat = 2.5e-4  # backbone LR; the head trains at ``head_lr_mult`` times it (reference: 10)
    head_lr_mult: PositiveFloat = 10.0
    momentum: float = Field(0.9, ge=0.0, lt=1.0)  # SGD only
    weight_decay: float = Field(5e-4, ge=0.0)
    poly_power: float = Field(0.9, ge=0.0)
    checkpoint_every: PositiveInt = 200
    log_every: PositiveInt = 50
    seed: int = 0
    amp_bf16: bool = True  # bf16 autocast + channels_last when training on CUDA

    @model_validator(mode="after")
    def _horizon_covers_the_run(self) -> "OptimConfig":
        if self.schedule_iterations is not None and self.schedule_iterations < self.iterations:
            raise ValueError(f"schedule_iterations ({self.schedule_iterations}) must be >= iterations "
                             f"({self.iterations}): the poly schedule would go below 0")
        return self


class DistillConfig(OptimConfig):
    """Self-distillation. ``init: fresh`` builds the student as ``model.name`` with ``student_pretrained`` weights
    (the reference: ImageNet) and trainable BatchNorm unless ``student_frozen_bn``; ``init: adapted`` starts from
    the adapted model. ``sync_bn`` converts the student's BatchNorm to SyncBatchNorm on multi-GPU runs."""

    init: Literal["fresh", "adapted"] = "fresh"
    targets: Literal["hard", "soft"] = "hard"  # hard pseudo labels (the reference) or the top-k soft labels
    student_pretrained: str | None = None  # fresh student: None | "imagenet" | path to a backbone file
    student_frozen_bn: bool = False
    sync_bn: bool = False


class RefineConfig(OptimConfig):
    """Classifier Refinement: ``tau`` is the strength of the prior terms of the logit-adjusted loss,
    ``CE(z + τ·(log π_s − log π_t), y)`` (the reference: 1)."""

    tau: float = Field(1.0, ge=0.0)


class TrainConfig(StrictModel):
    source: OptimConfig = OptimConfig()
    refine: RefineConfig = RefineConfig(iterations=40000, lr=2.5e-4)
    distill: DistillConfig = DistillConfig(iterations=20000, lr=5e-4)


class LocalAdjustConfig(StrictModel):
    """Per-image priors (``adjust.mode: local``; labelshift.estimate.per_image, docs/per_image_priors.md): each
    image's prior q is estimated from its own (calibrated) pixel posteriors and shrunk toward the dataset prior
    π̂ (the configured target prior). ``map_em``: EM with a Dirichlet prior of concentration ``kappa`` centred on
    π̂, the image weighing ``effective_pixels`` pixels (its pixels are correlated): the fixed point
    q = (n_eff·mean_x r_x(q) + κ·π̂) / (n_eff + κ), so only κ/(κ + n_eff) decides; κ = inf is global IA exactly,
    κ = 0 plain per-image EM. ``map_count``: hard EM, the same shrinkage of the image's argmax histogram after IA
    toward its current prior, ``count_steps`` times from π̂ (the first step adjusts toward π̂: global IA).
    ``presence``: the estimate is then multiplied by each class's probability of being present in the image (a
    model fitted with the calibration on labelled source val, ``labelshift.image_presence``), floored at
    ``floor``: classes an image predicts but most likely lacks lose their mass. ``kappa: .inf`` with
    ``presence: false`` is global IA exactly.
    """

    estimator: Literal["map_em", "map_count"] = "map_count"  # chosen on the selection split (docs/per_image_priors.md)
    kappa: float = Field(1000.0, ge=0)  # Dirichlet concentration, in pixels; .inf: the dataset prior (global IA)
    effective_pixels: float = Field(1000.0, gt=0)  # what one image's likelihood weighs, in pixels
    sample_pixels: PositiveInt = 4096  # pixels per image the estimate reads (a regular grid, batch-independent)
    posteriors: Literal["calibrated", "raw"] = "calibrated"  # map_em: softmax of the BCTS-calibrated or raw logits
    floor: float = Field(0.01, ge=0.0, lt=1.0)  # q_c ≥ floor·π̂_c (renormalised): no class vanishes outright
    max_iter: PositiveInt = 200
    tol: float = Field(1e-6, gt=0)  # L1 change of q; an image not converged by max_iter uses π̂ (counted)
    count_steps: PositiveInt = 3  # map_count: argmax-histogram steps
    presence: bool = True  # weigh by P(class present in the image); chosen on the selection split (docs)


class AdjustConfig(StrictModel):
    """Inference Adjustment: z' = z / T − τ_s·log π_s + τ_t·log π_t.

    ``space``: ``raw`` adjusts the raw logits against the exact source prior of the target prior's kind (the
    paper's IA); ``calibrated`` adjusts pixel priors in the calibration's space, z/T + b − log π_cal + log π_t
    (exact under pure label shift, but the calibration is fitted on source val and need not transfer across an
    appearance shift). ``mode``: ``global`` uses one target prior for every image; ``local`` a prior per image
    (``local:``), shrunk toward the target prior.
    """

    space: Literal["raw", "calibrated"] = "raw"
    temperature: float = Field(1.0, gt=0)
    tau_source: float = 1.0
    tau_target: float = 1.0
    mode: Literal["global", "local"] = "global"
    local: LocalAdjustConfig = LocalAdjustConfig()


class PriorConfig(StrictModel):
    """The target prior: ``method`` is a registered estimator (its kind, pixel or image, follows from it);
    ``seed`` seeds the estimators' pixel samples, the calibration sample and the bootstrap."""

    method: str = "ensemble"
    calibration: Literal["none", "temperature", "bcts", "bcts_anchored"] = "bcts_anchored"
    # Source priors (preset name or JSON path). ``source_prior`` may be of either kind and takes the place of
    # its kind; ``source_pixel_prior`` / ``source_image_prior`` name each kind. A kind left unset: the exact
    # statistics of the source split's labels.
    source_prior: str | None = None
    source_pixel_prior: str | None = None
    source_image_prior: str | None = None
    target_prior: str | None = None  # preset name or JSON path; None: estimate
    em_sample_pixels: PositiveInt = 200_000
    presence_threshold: float = Field(0.001, ge=0.0, lt=1.0)
    bootstrap: int = Field(100, ge=0)
    oracle: bool = True  # measure estimates against target-train labels when they exist (never used to train)
    max_images: PositiveInt | None = None
    seed: int = 0

    @field_validator("method")
    @classmethod
    def _registered(cls, method: str) -> str:
        from labelshift.estimate.registry import METHODS

        if method not in METHODS:
            raise ValueError(f"unknown prior estimator {method!r}; expected one of {list(METHODS)}")
        return method


class PseudoConfig(StrictModel):
    """Pseudo labels for self-distillation: pixels whose teacher confidence is below ``confidence_threshold``
    are ignored (255). Per image the pseudo stage writes a hard trainId PNG and a confidence PNG at the label
    resolution and, with ``soft``, soft labels (the ``top_k`` classes and their probabilities quantised to
    uint8) at ``soft_grid`` (``output``: the model's own logit grid; ``input``: the model input size) in
    Parquet (``labelshift.pseudo``). ``decide_at``: where the hard label and confidence are decided before
    being written at the label resolution (``input``: on logits upsampled to the model input, then nearest;
    ``label``: on logits upsampled to the label resolution, as the reference does; 4x the work at 2x)."""

    confidence_threshold: float = Field(0.0, ge=0.0, lt=1.0)
    soft: bool = True
    top_k: int = Field(3, ge=1, le=255)
    soft_grid: Literal["output", "input"] = "output"
    decide_at: Literal["input", "label"] = "input"
    teacher: Literal["refined", "adapted_ia"] = "refined"  # the CR model, or the adapted model with IA (target)


class RayConfig(StrictModel):
    address: str | None = None  # None: local ray.init() (or RAY_ADDRESS inside a job)
    num_workers: PositiveInt = 1
    use_gpu: bool = False
    cpus_per_worker: PositiveFloat = 1.0
    max_failures: int = Field(1, ge=-1)  # -1: retry forever (Ray's FailureConfig)
    storage_path: str | None = None  # default: <output_dir>/ray
    data_actors: PositiveInt = 1  # model actors of the Ray Data passes (estimate, evaluate, pseudo labels)
    data_cpus_per_actor: PositiveFloat = 1.0  # CPUs each model actor reserves (and its torch threads, unless
    # runtime.torch_threads is set); with use_gpu each actor also takes one GPU


class TrackingConfig(StrictModel):
    tracking_uri: str | None = None  # default: MLFLOW_TRACKING_URI or sqlite:///<project>/mlflow.db
    experiment: str = "labelshift"
    enabled: bool = True


class EvalConfig(StrictModel):
    batch_size: PositiveInt = 4
    amp_bf16: bool = True  # bf16 autocast + channels_last when evaluating on CUDA (as training does)
    flip: bool = False
    scales: tuple[PositiveFloat, ...] = Field((1.0,), min_length=1)
    # model input (width, height) per evaluated model; unset: data.target_transform.size
    input_sizes: dict[Literal["adapted", "refined", "distilled"], tuple[PositiveInt, PositiveInt]] = {}
    subset: tuple[str, ...] | None = None  # also report mIoU over these classes (miou_subset); synthia16 runs
    # always report mIoU* over the published 13 classes (miou_13) as well


class RuntimeConfig(StrictModel):
    """The numeric runtime of every process of the job (the driver and each training worker):
    ``torch_threads`` intra-op threads (None: torch's default, which Ray sets from a worker's CPUs) and torch's
    deterministic algorithms. The same thread count on the same machine type gives bit-identical numbers."""

    torch_threads: PositiveInt | None = None
    deterministic: bool = True


class ExperimentConfig(StrictModel):
    name: str
    output_dir: str = "outputs/${name}"
    data: DataConfig
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    prior: PriorConfig = PriorConfig()
    adjust: AdjustConfig = AdjustConfig()
    pseudo: PseudoConfig = PseudoConfig()
    eval: EvalConfig = EvalConfig()
    ray: RayConfig = RayConfig()
    tracking: TrackingConfig = TrackingConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    stages: tuple[PipelineStage, ...] = PIPELINE_STAGES
    sweep: SweepConfig | None = None  # ray_jobs/sweep.py only (no stage reads it); README "Sweeps"

    @model_validator(mode="after")
    def _expand_output_dir(self) -> "ExperimentConfig":
        if "${name}" in self.output_dir:
            self.output_dir = self.output_dir.replace("${name}", self.name)
        return self

    @model_validator(mode="after")
    def _class_balanced_only_on_labelled_source(self) -> "ExperimentConfig":
        if self.train.distill.sampler != "uniform":
            raise ValueError("train.distill.sampler: the class-balanced sampler draws from source labels; the "
                             "distillation student trains on pseudo labels (use uniform)")
        return self

    @model_validator(mode="after")
    def _subset_in_class_set(self) -> "ExperimentConfig":
        from labelshift.classes import get_class_set

        if self.eval.subset is not None:
            names = get_class_set(self.data.class_set).names
            unknown = [name for name in self.eval.subset if name not in names]
            if unknown:
                raise ValueError(f"eval.subset names {unknown}, not classes of {self.data.class_set} {list(names)}")
        return self

    @model_validator(mode="after")
    def _swept_values_valid(self) -> "ExperimentConfig":
        if self.sweep is not None:
            errors = space_errors(self.model_dump(), ExperimentConfig.model_validate)
            if errors:
                raise ValueError("; ".join(errors))
        return self


