"""Benchmark of IA sweeps: 64 IA trials through Ray Tune over a logit cache vs one plain evaluation, and the
label-free objectives' regret on digits (and on the world, from a finished sweep).

Timing (one run, side by side, random weights, CPU): a world written at 2048×1024 (``--images`` target-val
images), the model at 1024×512 input. ``single_eval_s``: ``labelshift.inference.evaluate`` of the split with
one IA transform (PNG decode, forward, upsampling to 2048×1024, argmax, confusion). ``sweep_s``: building the
logit cache (one forward pass: decode + forward, fp16 logits at the output stride) + 64 trials through
``tune.Tuner`` (Tune start-up, object-store transfer, every trial; Ray itself already started). Priors for the
timing come from the cached logits (EM and counting), which changes no cost.

Digits: scikit-learn's digits, the priors benchmark's model and Dirichlet-shifted targets; per target set
a labelled selection part (``--digits-select`` points) and a test part; the IA grid is scored on the selection
part (labelled choice) and by each label-free objective on the whole unlabelled target set; regret = test mIoU
of the labelled choice − of the label-free choice. The guarded choice (``sweep.selection``'s default rule: the
top setting only when it beats the default T = τ = 1 with EM on BCTS on >= 90 % of paired bootstrap resamples
of the selection points) is scored against that default on the test part.

``python -m labelshift.bench.sweep [--models deeplabv2_resnet101,small] [--images 20] [--world-sweep DIR]``
ends with one JSON line ``{"trials", "sweep_s", "single_eval_s", "ratio", "label_free_regret_miou", ...}``.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from labelshift.bench.priors import DIGITS_PIXEL_METHODS, EM_BCTS
from labelshift.config.sweep import LABEL_FREE_OBJECTIVES

TIMING_SPACE = {"adjust.temperature": [0.75, 1.0, 1.5, 2.0], "adjust.tau_source": [0.5, 1.0],
                "adjust.tau_target": [0.5, 1.0, 1.5, 2.0], "prior.method": ["em", "count"]}  # 64 trials
TIMING_CONCURRENT_TRIALS = 2  # one trial per core of the 2-CPU Ray instance (IA trials: no ASHA, no MLflow)
DIGITS_GRID = {"adjust.temperature": [0.75, 1.0, 1.5], "adjust.tau_source": [0.5, 1.0],
               "adjust.tau_target": [0.5, 1.0, 1.5],
               "prior.method": [EM_BCTS, *DIGITS_PIXEL_METHODS]}  # digits' pixel methods see the raw softmax, bbse + em_bcts BCTS
DIGITS_DEFAULT = {"adjust.temperature": 1.0, "adjust.tau_source": 1.0, "adjust.tau_target": 1.0,
                  "prior.method": EM_BCTS}  # the guard's fallback on digits (no reference estimator there)


# ------------------------------------------------------------------------------------------------------ timing
def _timing_config(model: str, world: Path, images: int):
    from labelshift.config import load_config

    root = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
    return load_config(root, [
        f"name=bench_sweep_{model}", f"output_dir={world.parent / model}", f"model.name={model}",
        f"data.source.root={world}/gta5", f"data.source_val.root={world}/gta5",
        f"data.target.root={world}/cityscapes", f"data.target_val.root={world}/cityscapes",
        "data.world.size=[2048,1024]", "data.world.num_source=4", "data.world.num_target_train=2",
        f"data.world.num_target_val={images}", "data.target_transform.size=[1024,512]", "eval.batch_size=1",
        "runtime.torch_threads=2", "tracking.enabled=false"])


def _timing_estimates(cache, class_names):
    """Priors for the timing: uniform source priors, EM and counting on the cached logits (no calibration)."""
    from labelshift.artifacts import SOURCE_CALIBRATED, estimate_name, source_prior_name
    from labelshift.calibrate import Calibration
    from labelshift.estimate import EstimatorInputs, estimator_results, make_estimators, update_estimators
    from labelshift.ia_sweep import EstimateOutputs
    from labelshift.priors import ClassPrior

    uniform = ClassPrior(class_names, np.ones(len(class_names)), "pixel")
    calibration = Calibration.identity(len(class_names))
    estimators = make_estimators(("em", "count"), class_names, EstimatorInputs(uniform, uniform), bootstrap=0, seed=0)
    for index in range(len(cache)):
        update_estimators(estimators, cache.low_res(index)[None], calibration)
    priors = {source_prior_name("pixel"): uniform, SOURCE_CALIBRATED: uniform,
              source_prior_name("image"): ClassPrior(class_names, np.ones(len(class_names)), "image"),
              **{estimate_name(m): p for m, p in estimator_results(estimators).items()}}
    return EstimateOutputs(priors, calibration)


def time_model(model_name: str, world: Path, images: int, log) -> dict[str, Any]:
    from labelshift.adjust import ia_transform
    from labelshift.build import build_model, class_set_of, ensure_world, eval_loader
    from labelshift.ia_sweep import build_inputs
    from labelshift.inference import evaluate
    from labelshift.runners.sweeps import cache_of
    from labelshift.runners.tune import run_ia_trials
    from labelshift.config.sweep import SpaceConfig

    cfg = _timing_config(model_name, world, images)
    ensure_world(cfg, log)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    device, names = torch.device("cpu"), class_set_of(cfg).names
    began = time.perf_counter()
    cache = cache_of(cfg, model, "target_val", device)
    cache_s = time.perf_counter() - began
    inputs = build_inputs(cfg, _timing_estimates(cache, names), cache, label_free=True)
    transform = ia_transform(cfg.adjust, inputs.estimates.source(), inputs.estimates.priors["estimate_em"])
    began = time.perf_counter()
    evaluate(model, eval_loader(cfg, "target_val"), len(names), device=device, logit_transforms={"ia": transform})
    single_eval_s = time.perf_counter() - began
    space = SpaceConfig(parameters={path: {"values": values} for path, values in TIMING_SPACE.items()},
                        max_concurrent_trials=TIMING_CONCURRENT_TRIALS)
    began = time.perf_counter()
    records = run_ia_trials(inputs, space, storage_path=str(world.parent / "tune"), name=f"bench-{model_name}")
    tune_s = time.perf_counter() - began
    sweep_s = cache_s + tune_s
    result = {"model": model_name, "images": len(cache), "trials": len(records), "cache_s": round(cache_s, 1),
              "tune_s": round(tune_s, 1), "sweep_s": round(sweep_s, 1), "single_eval_s": round(single_eval_s, 1),
              "ratio": round(sweep_s / single_eval_s, 2), "cache_mib": round(cache.nbytes() / 2**20, 1)}
    log(json.dumps(result))
    return result


# ------------------------------------------------------------------------------------------------------ digits
def _digits_adjusted(task, estimates, logits, setting) -> torch.Tensor:
    from labelshift.adjust import adjust_logits

    return adjust_logits(logits.float(), task.source_prior, estimates[setting["prior.method"]],
                         temperature=setting["adjust.temperature"], tau_source=setting["adjust.tau_source"],
                         tau_target=setting["adjust.tau_target"])


def _digits_point_confusions(task, estimates, logits, rows, setting) -> np.ndarray:
    """(N, K, K) one-hot confusion [true, predicted] of each selection point ``rows`` (indices, labels)."""
    num_classes = len(task.classes)
    predicted = _digits_adjusted(task, estimates, logits, setting)[rows[0]].argmax(1).numpy()
    matrices = np.zeros((len(predicted), num_classes, num_classes), dtype=np.int64)
    matrices[np.arange(len(predicted)), rows[1], predicted] = 1
    return matrices


def _digits_scores(task, estimates, logits, labels, reference, setting) -> dict[str, float]:
    from labelshift.metrics import ConfusionMatrix
    from labelshift.selection import LabelFreeScores

    prior = estimates[setting["prior.method"]]
    adjusted = _digits_adjusted(task, estimates, logits, setting)
    scores = {}
    for name, rows in labels.items():
        matrix = ConfusionMatrix(len(task.classes))
        matrix.update(torch.from_numpy(rows[1]), adjusted[rows[0]].argmax(1))
        scores[name] = 100 * matrix.miou()
    accumulator = LabelFreeScores(reference, prior)
    accumulator.add(0, adjusted.T[:, None, :])
    return {**scores, **accumulator.result()}


def run_digits(seeds: int = 5, concentrations=(0.1, 1.0, 10.0), target_size: int = 500,
               select_size: int = 100) -> dict[str, Any]:
    """Label-free vs labelled choice of IA settings on digits (see the module docstring)."""
    from labelshift.bench.priors import _estimates, prepare_digits, sample_target
    from labelshift.config.sweep import SelectionRule
    from labelshift.selection import ReferencePosterior, paired_bootstrap_wins, regret_table

    rule = SelectionRule()
    task = prepare_digits(0)
    settings = [dict(zip(DIGITS_GRID, values)) for values in itertools.product(*DIGITS_GRID.values())]
    draws = []
    for alpha, seed in itertools.product(concentrations, range(seeds)):
        rng = np.random.default_rng([0, seed, round(alpha * 1_000_000)])
        indices = sample_target(task.pool_labels, rng.dirichlet(np.full(len(task.classes), alpha)), target_size, rng)
        logits = task.pool_logits[indices]
        estimates = _estimates(task, logits)
        calibrated = task.calibration.apply(logits).softmax(1).float()
        reference = ReferencePosterior([calibrated.T[:, None, :].numpy()], [np.ones(len(indices))],
                                       task.source_prior, estimates[EM_BCTS])
        split = {"select": (np.arange(select_size), task.pool_labels[indices[:select_size]]),
                 "test": (np.arange(select_size, len(indices)), task.pool_labels[indices[select_size:]])}
        rows = [_digits_scores(task, estimates, logits, split, reference, s) for s in settings]
        table = regret_table(rows, "select", LABEL_FREE_OBJECTIVES, "test")
        top, default = int(np.argmax([r["select"] for r in rows])), settings.index(DIGITS_DEFAULT)
        wins = paired_bootstrap_wins(*(_digits_point_confusions(task, estimates, logits, split["select"], settings[i])
                                       for i in (top, default)), rule.bootstrap, seed)
        guarded = top if wins >= rule.guard_level else default
        guard = {"top_beats_default": wins, "top_minus_default": rows[top]["test"] - rows[default]["test"],
                 "guarded_minus_default": rows[guarded]["test"] - rows[default]["test"]}
        draws.append({"alpha": alpha, "seed": seed, "labelled_test_miou": rows[top]["test"], "guard": guard,
                      **{k: v for k, v in table.items()}})
    summary = {name: {"mean_regret": float(np.mean([d[name]["regret"] for d in draws])),
                      "max_regret": float(np.max([d[name]["regret"] for d in draws])),
                      "differs": int(sum(d[name]["differs"] for d in draws)), "draws": len(draws)}
               for name in LABEL_FREE_OBJECTIVES}
    for choice in ("top", "guarded"):  # test mIoU of the choice − of the default setting
        gains = np.array([d["guard"][f"{choice}_minus_default"] for d in draws])
        summary[f"{choice}_vs_default"] = {"mean": float(gains.mean()), "worst": float(gains.min()),
                                           "below_default": int((gains < 0).sum()), "draws": len(draws)}
    return {"settings": len(settings), "select_size": select_size, "target_size": target_size, "summary": summary,
            "draws": draws}


# -------------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m labelshift.bench.sweep", description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="deeplabv2_resnet101,small")
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--out", default="outputs/bench_sweep")
    parser.add_argument("--world-sweep", default=None, help="a finished IA sweep's output_dir (its summary.json "
                        "gives the world's label-free regret)")
    parser.add_argument("--objective", default="expected_miou", choices=LABEL_FREE_OBJECTIVES)
    parser.add_argument("--skip-timing", action="store_true")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    log = lambda line: print(line, file=sys.stderr)  # noqa: E731
    timings = []
    if not args.skip_timing:
        import ray

        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            timings = [time_model(m, out / "world", args.images, log) for m in args.models.split(",")]
        finally:
            ray.shutdown()
    digits = run_digits()
    world = None
    if args.world_sweep:
        world = json.loads((Path(args.world_sweep) / "sweeps" / "ia" / "summary.json").read_text())
    (out).mkdir(parents=True, exist_ok=True)
    (out / "sweep_benchmark.json").write_text(json.dumps({"timings": timings, "digits": digits, "world": world},
                                                         indent=1))
    print(json.dumps({"digits": digits["summary"]}, indent=1))
    first = timings[0] if timings else {}
    line = {key: first.get(key) for key in ("trials", "sweep_s", "single_eval_s", "ratio")}
    line["label_free_regret_miou"] = {
        "objective": args.objective, "digits_mean": round(digits["summary"][args.objective]["mean_regret"], 3),
        "world": None if world is None else round(world["label_free"][args.objective]["regret"], 3)}
    line["models"] = timings
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
