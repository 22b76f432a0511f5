"""Sweeps without Ray: the logit cache's exact upsampled argmax, the search-space schema, label-free objectives
and regret, the estimate stage's EM with and without calibration, the world's selection split."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from labelshift.config import ConfigError, load_config
from labelshift.logit_cache import LogitCache, bilinear_source
from labelshift.metrics import ConfusionMatrix
from labelshift.selection import miou_of, regret_table

from conftest import DEMO_CONFIG, tiny_overrides


def _smooth_logits(num_classes: int, size: tuple[int, int], cells: int) -> torch.Tensor:
    coarse = torch.randn(1, num_classes, cells, 2 * cells)
    return 4 * F.interpolate(coarse, size=size, mode="bilinear", align_corners=False)[0]


def _full_confusion(logits: torch.Tensor, labels: torch.Tensor, align_corners: bool) -> np.ndarray:
    upsampled = F.interpolate(logits[None], size=tuple(labels.shape), mode="bilinear", align_corners=align_corners)
    matrix = ConfusionMatrix(logits.shape[0])
    matrix.update(labels, upsampled.argmax(1)[0])
    return matrix.matrix


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("low, high", [((8, 16), (64, 128)), ((7, 13), (50, 97)), ((16, 32), (128, 256))])
@pytest.mark.parametrize("smooth", [True, False])
def test_cache_confusion_equals_upsample_then_argmax(align_corners, low, high, smooth):
    """Blocks whose corners agree + interpolated pixels of the mixed blocks give the exact confusion of
    F.interpolate + argmax, for integer and non-integer scales, smooth maps and i.i.d. noise (every block mixed,
    many candidate classes), with ignored pixels and a transform."""
    logits = (_smooth_logits(19, low, cells=max(2, low[0] // 3)) if smooth else torch.randn(19, *low)).half().float()
    labels = torch.randint(0, 19, high)
    labels[: high[0] // 5] = 255
    cache = LogitCache([logits.half().numpy()], [labels.to(torch.uint8).numpy()], ["a"], 19, align_corners)
    bias = torch.linspace(-1, 1, 19)[:, None, None]
    got = cache.confusion(lambda z: z / 0.7 + bias)
    expected = _full_confusion(logits / 0.7 + bias, labels, align_corners)
    assert got.matrix.sum() == (labels != 255).sum()
    assert np.abs(got.matrix - expected).sum() <= 2  # at most a rounding tie (float summation order)


def test_cache_stores_logits_beyond_float16_range_rescaled_and_scores_them_exactly():
    """A random-weight DeepLabV2-R101 reaches |logits| ~1e5 (float16 ends at 65504: the cache held inf and every
    estimate became NaN): such images are stored divided by 2**e, read back finite within float16's relative
    precision, and score like the float32 logits."""
    from labelshift.logit_cache import FLOAT16_LOGIT_LIMIT, to_float16

    logits = _smooth_logits(19, (8, 16), cells=3) * 4e4
    labels = torch.randint(0, 19, (64, 128))
    stored, exponent = to_float16(logits)
    assert exponent == int(np.ceil(np.log2(float(logits.abs().max()) / FLOAT16_LOGIT_LIMIT))) >= 1
    cache = LogitCache([stored], [labels.to(torch.uint8).numpy()], ["a"], 19, False, scale_exponents=[exponent])
    restored = cache.low_res(0)
    assert torch.isfinite(restored).all() and not np.isfinite(logits.half().numpy()).all()
    assert float(((restored - logits).abs() / logits.abs().max()).max()) < 2 ** -11
    assert np.abs(cache.confusion().matrix - _full_confusion(restored, labels, False)).sum() <= 2
    # against the float32 logits: only float16 rounding moves decisions (here 2 of 8192 pixels)
    assert np.abs(cache.confusion().matrix - _full_confusion(logits, labels, False)).sum() <= 2 * 8
    assert to_float16(logits / 1e4)[1] == 0
    with pytest.raises(ValueError, match="non-finite logits"):
        to_float16(torch.full((19, 2, 2), float("nan")))


def test_bilinear_source_matches_torch():
    for align_corners in (False, True):
        i0, i1, weight = bilinear_source(5, 17, align_corners)
        row = torch.arange(5, dtype=torch.float32) ** 2
        expected = F.interpolate(row[None, None, None], size=(1, 17), mode="bilinear",
                                 align_corners=align_corners)[0, 0, 0]
        mine = (1 - torch.from_numpy(weight)) * row[i0] + torch.from_numpy(weight) * row[i1]
        torch.testing.assert_close(mine, expected)


# ------------------------------------------------------------------------------------------------ the schema
def _demo(tmp_path, *extra):
    return load_config(DEMO_CONFIG, tiny_overrides(tmp_path) + list(extra))


def test_sweep_space_rejects_what_a_trial_cannot_change(tmp_path):
    with pytest.raises(ConfigError, match=r"ia: \['train.refine.tau'\] cannot be swept over cached logits"):
        _demo(tmp_path, "sweep.ia.parameters={train.refine.tau: {values: [1]}}")
    with pytest.raises(ConfigError, match=r"cr: \['adjust.temperature'\] are not Classifier Refinement settings"):
        _demo(tmp_path, "sweep.cr.parameters={adjust.temperature: {values: [1]}}")
    with pytest.raises(ConfigError, match=r"grid search needs values.*\['adjust.tau_target'\] are ranges"):
        _demo(tmp_path, "sweep.ia.parameters={adjust.tau_target: {low: 0.5, high: 2}}")
    with pytest.raises(ConfigError, match=r"sweep.ia.parameters.prior.method: 'magic' is not a valid prior.method"):
        _demo(tmp_path, "sweep.ia.parameters={prior.method: {values: [em, magic]}}")
    with pytest.raises(ConfigError, match=r"a log range needs low > 0"):
        _demo(tmp_path, "sweep.cr.search=random", "sweep.cr.parameters={train.refine.lr: {low: 0, high: 1, log: true}}")


def test_sweep_configs_load_and_the_best_setting_round_trips(tmp_path):
    from labelshift.config.sweep import overrides_of

    cfg = load_config(DEMO_CONFIG.parent / "sweep_cr.yaml")
    assert cfg.sweep.ia.grid_size() == 3 * 2 * 3 * 7 and cfg.sweep.cr.grid_size() == 4
    assert cfg.data.target.list_file == "splits/adapt.txt" and cfg.data.target_select.list_file == "splits/select.txt"
    setting = {"adjust.temperature": 0.75, "prior.method": "em_raw", "train.refine.tau": 0.5}
    again = _demo(tmp_path, *overrides_of(setting))
    assert (again.adjust.temperature, again.prior.method, again.train.refine.tau) == (0.75, "em_raw", 0.5)


# ------------------------------------------------------------------------------------------ label-free choices
def test_miou_of_and_regret_table():
    assert miou_of(np.array([[3, 1], [0, 2]])) == pytest.approx(100 * (3 / 4 + 2 / 3) / 2)
    trials = [{"select": 50.0, "a": 1.0, "b": 0.0, "val": 60.0},
              {"select": 55.0, "a": 0.0, "b": 2.0, "val": 62.5},
              {"select": 40.0, "a": 3.0, "b": 1.0, "val": 58.0}]
    table = regret_table(trials, "select", ["a", "b"], "val")
    assert table["a"] == {"trial": 2, "differs": True, "regret": 4.5}
    assert table["b"] == {"trial": 1, "differs": False, "regret": 0.0}


def test_expected_miou_ranks_the_true_prior_first():
    """With posteriors that are exact for the target, the label-free expected mIoU of IA towards the true prior
    beats IA towards the source prior (what the labelled mIoU says too)."""
    from labelshift.selection import LabelFreeScores, ReferencePosterior

    generator = torch.Generator().manual_seed(0)
    num_classes, cells = 3, 4000
    source = np.array([0.6, 0.3, 0.1])
    target = np.array([0.1, 0.3, 0.6])
    labels = torch.multinomial(torch.tensor(target), cells, replacement=True, generator=generator)
    means = torch.eye(num_classes) * 1.5
    features = means[labels] + torch.randn(cells, num_classes, generator=generator)
    logits = -0.5 * ((features[:, None, :] - means[None]) ** 2).sum(-1) + torch.log(torch.tensor(source))  # (N, K)
    calibrated = logits.softmax(1).T.reshape(num_classes, 1, cells)
    reference = ReferencePosterior([calibrated.half().numpy()], [np.ones(cells)], source, target)
    scores = {}
    for name, prior in (("source", source), ("target", target)):
        adjusted = (logits - np.log(source).astype(np.float32) + np.log(prior).astype(np.float32)).T
        accumulator = LabelFreeScores(reference, prior)
        accumulator.add(0, adjusted.reshape(num_classes, 1, cells))
        labelled = ConfusionMatrix(num_classes)
        labelled.update(labels, adjusted.argmax(0))
        scores[name] = {**accumulator.result(), "labelled": 100 * labelled.miou()}
    assert scores["target"]["labelled"] > scores["source"]["labelled"] + 5
    assert scores["target"]["expected_miou"] > scores["source"]["expected_miou"] + 5
    assert scores["target"]["em_loglik"] > scores["source"]["em_loglik"]


# ------------------------------------------------------------------------------------------- estimate and world
def test_estimate_stage_writes_em_with_and_without_calibration(tiny_trained):
    priors = tiny_trained.priors()
    calibrated, raw = priors["estimate_em"], priors["estimate_em_raw"]
    assert calibrated.provenance["estimator"] == "em" and raw.provenance["estimator"] == "em_raw"
    assert raw.provenance["source_prior"] == pytest.approx(priors["source_pixel"].probs.tolist())
    assert calibrated.provenance["source_prior"] == pytest.approx(priors["source_calibrated"].probs.tolist())
    assert np.abs(calibrated.probs - raw.probs).sum() > 1e-3  # different posteriors, different estimates


def test_world_writes_a_held_out_selection_split(tiny_world):
    splits = tiny_world / "cityscapes" / "splits"
    select = splits.joinpath("select.txt").read_text().split()
    adapt = splits.joinpath("adapt.txt").read_text().split()
    train = sorted(p.name.removesuffix("_leftImg8bit.png")
                   for p in (tiny_world / "cityscapes" / "leftImg8bit" / "train").glob("*/*.png"))
    assert len(select) == round(0.2 * len(train)) and not set(select) & set(adapt)
    assert sorted(select + adapt) == train


def test_search_spaces_map_onto_tune():
    pytest.importorskip("ray")
    pytest.importorskip("optuna")
    from ray.tune.search.optuna import OptunaSearch
    from ray.tune.search.sample import Categorical, Float

    from labelshift.runners.tune import _search_algorithm, param_space
    from labelshift.config.sweep import SpaceConfig

    space = SpaceConfig(search="optuna", num_samples=3, parameters={
        "train.refine.tau": {"low": 0.25, "high": 2.0}, "train.refine.lr": {"low": 1e-4, "high": 1e-2, "log": True},
        "prior.method": {"values": ["em", "em_raw"]}})
    params = param_space(space)
    assert isinstance(params["train.refine.tau"], Float) and (params["train.refine.tau"].lower,
                                                               params["train.refine.tau"].upper) == (0.25, 2.0)
    assert isinstance(params["prior.method"], Categorical) and params["prior.method"].categories == ["em", "em_raw"]
    assert isinstance(_search_algorithm(space, seed=0, max_concurrent=1), OptunaSearch)
    grid_space = SpaceConfig(parameters={"adjust.tau_target": {"values": [0.5, 1.0]}}, max_concurrent_trials=1)
    assert param_space(grid_space)["adjust.tau_target"] == {"grid_search": [0.5, 1.0]}
    # Tune ignores TuneConfig.max_concurrent_trials for a variant generator: the generator itself holds the limit
    assert _search_algorithm(grid_space, seed=0, max_concurrent=1).max_concurrent == 1


def test_concurrent_trials_are_sized_to_the_cluster_cpus_unless_set():
    from labelshift.config.sweep import SpaceConfig
    from labelshift.runners.tune import concurrent_trials

    unset = SpaceConfig(parameters={"adjust.tau_target": {"values": [0.5, 1.0]}})
    assert unset.max_concurrent_trials is None
    assert concurrent_trials(unset, trial_cpus=1.0, cluster_cpus=16.0) == 16
    assert concurrent_trials(unset, trial_cpus=3.0, cluster_cpus=16.0) == 5  # a CR trial: 1 + 2 workers x 1 CPU
    assert concurrent_trials(unset, trial_cpus=4.0, cluster_cpus=2.0) == 1  # never below one
    fixed = unset.model_copy(update={"max_concurrent_trials": 1})
    assert concurrent_trials(fixed, trial_cpus=1.0, cluster_cpus=16.0) == 1


# ------------------------------------------------------------------ trial inputs on the shared tiny trained run
SWEEP_IA_CONFIG = DEMO_CONFIG.parent / "sweep_ia.yaml"


def _sweep_overrides(tiny_trained) -> list[str]:
    return [*tiny_trained.overrides, f"data.target_select.root={tiny_trained.world}/cityscapes",
            "data.world.target_select_fraction=null"]  # the shared world's knobs


@pytest.fixture(scope="module")
def tiny_sweep_inputs(tiny_trained):
    """IA trial inputs (selection-split logit cache, priors, reference posterior) of the shared tiny run."""
    from labelshift.build import build_model
    from labelshift.ia_sweep import EstimateOutputs, build_inputs
    from labelshift.runners.sweeps import cache_of

    cfg = load_config(SWEEP_IA_CONFIG, _sweep_overrides(tiny_trained))
    model = build_model(cfg, tiny_trained.model).eval()
    return build_inputs(cfg, EstimateOutputs.read(tiny_trained.estimate),
                        cache_of(cfg, model, "target_select", torch.device("cpu")))


# ------------------------------------------------------------------------------- per-image priors (issue 15)
def test_ia_space_searches_the_per_image_mode_and_skips_what_it_cannot_apply(tiny_trained, tiny_sweep_inputs):
    """``adjust.mode`` and ``adjust.local.*`` are config paths of the IA space; a local trial scores the cache
    with the library's LocalIA (κ = 100: per-image priors, other decisions than global IA; a huge κ: global
    IA's); local mode with an image prior (reference) is skipped with NaN scores and never chosen."""
    from labelshift.config.sweep import overrides_of
    from labelshift.ia_sweep import score_setting
    from labelshift.selection import best_index

    space = ("sweep.ia.parameters={adjust.mode: {values: [global, local]}, adjust.local.kappa: {values: [100, 1e12]},"
             " adjust.local.estimator: {values: [map_em, map_count]}, prior.method: {values: [em, reference]},"
             " adjust.local.presence: {values: [true, false]}}")
    overrides = _sweep_overrides(tiny_trained)
    assert load_config(SWEEP_IA_CONFIG, [*overrides, space]).sweep.ia.grid_size() == 32
    for swept, message in (("adjust.local.max_iter: {values: [10]}", r"adjust.local.max_iter'\] cannot be swept"),
                           ("adjust.local.kappa: {values: [-1]}", r"sweep.ia.parameters.adjust.local.kappa: -1")):
        with pytest.raises(ConfigError, match=message):
            load_config(SWEEP_IA_CONFIG, [*overrides, f"sweep.ia.parameters={{{swept}}}"])
    # count: a pixel prior under which the tiny model still scores (its em estimate sends every pixel to a class
    # the selection split lacks: mIoU 0, global and local alike)
    settings = {"global": {"adjust.mode": "global", "prior.method": "count"},
                "local": {"adjust.mode": "local", "adjust.local.kappa": 100.0, "prior.method": "count"},
                "local_huge_kappa": {"adjust.mode": "local", "adjust.local.kappa": 1e12, "adjust.local.presence": False,
                                     "prior.method": "count"},
                "global_reference": {"adjust.mode": "global", "prior.method": "reference"},
                "local_reference": {"adjust.mode": "local", "adjust.local.kappa": 100.0, "prior.method": "reference"}}
    scores = {name: score_setting(tiny_sweep_inputs, setting) for name, setting in settings.items()}
    assert scores["local_huge_kappa"]["select_miou"] == pytest.approx(scores["global"]["select_miou"], abs=1e-6)
    assert scores["local"]["label_free_neg_entropy"] != pytest.approx(scores["global"]["label_free_neg_entropy"])
    assert 0 < scores["local"]["select_miou"] <= 100 and scores["local"]["skipped"] == 0.0
    skipped = scores["local_reference"]
    assert skipped["skipped"] == 1.0 and np.isnan(skipped["select_miou"]) and np.isnan(
        skipped["label_free_expected_miou"])
    assert scores["global_reference"]["skipped"] == 0.0
    rows = list(scores.values())
    assert not rows[best_index([row["select_miou"] for row in rows])]["skipped"]
    again = load_config(DEMO_CONFIG, [*tiny_trained.overrides, *overrides_of(
        {"adjust.mode": "local", "adjust.local.kappa": 300.0, "adjust.local.estimator": "map_count"})])
    assert (again.adjust.mode, again.adjust.local.kappa, again.adjust.local.estimator) == ("local", 300.0, "map_count")


# --------------------------------------------------------------------------------------- the guarded choice
def test_paired_bootstrap_wins_is_the_share_of_resamples_the_candidate_wins():
    """Two images: the candidate wins only on the resample that draws image A twice (probability 1/4): on B
    alone, and on A + B, the baseline is better."""
    from labelshift.selection import paired_bootstrap_wins

    perfect = np.array([[10, 0], [0, 10]])
    candidate = np.stack([perfect, np.array([[0, 10], [0, 10]])])
    baseline = np.stack([np.array([[5, 5], [0, 10]]), perfect])
    assert paired_bootstrap_wins(candidate, baseline, 4000, seed=0) == pytest.approx(0.25, abs=0.03)
    assert paired_bootstrap_wins(candidate, candidate, 100, seed=0) == 0.0  # ties never win
    # perfect on both images: better than the baseline except on the resample of image B twice (a tie)
    assert paired_bootstrap_wins(np.stack([perfect, perfect]), baseline, 4000, seed=0) == pytest.approx(0.75, abs=0.03)
    with pytest.raises(ValueError, match="equal shape"):
        paired_bootstrap_wins(candidate, baseline[:1], 10, seed=0)


def test_choice_keeps_the_top_trial_only_when_it_beats_the_fallback_on_the_bootstrap(tiny_sweep_inputs):
    from labelshift.config.sweep import SelectionRule
    from labelshift.ia_sweep import choose_setting, per_image_confusions, score_setting
    from labelshift.selection import miou_of, paired_bootstrap_wins

    settings = [{"adjust.temperature": t, "prior.method": m} for t in (0.5, 1.0, 3.0) for m in ("em", "count")]
    records = [{"trial": f"t{i}", "setting": s, "metrics": score_setting(tiny_sweep_inputs, s)}
               for i, s in enumerate(settings)]
    top = max(records, key=lambda r: r["metrics"]["select_miou"])
    per_image = per_image_confusions(tiny_sweep_inputs, top["setting"])
    assert len(per_image) == len(tiny_sweep_inputs.cache)
    assert miou_of(per_image.sum(0)) == pytest.approx(top["metrics"]["select_miou"], abs=1e-9)

    unguarded = choose_setting(tiny_sweep_inputs, records, SelectionRule(guard_level=0), "expected_miou")
    assert unguarded["setting"] == top["setting"] and unguarded["guard"]["kept_top"]
    tie = choose_setting(tiny_sweep_inputs, records, SelectionRule(fallback=top["setting"]), "expected_miou")
    assert not tie["guard"]["kept_top"] and tie["guard"]["top_beats_fallback"] == 0.0  # equal settings: no win
    worst = min(records, key=lambda r: r["metrics"]["select_miou"])
    rule = SelectionRule(fallback=worst["setting"], guard_level=0.5, bootstrap=200)
    guarded = choose_setting(tiny_sweep_inputs, records, rule, "expected_miou", seed=3)
    wins = paired_bootstrap_wins(per_image, per_image_confusions(tiny_sweep_inputs, worst["setting"]), 200, seed=3)
    assert guarded["guard"]["top_beats_fallback"] == wins and guarded["guard"]["kept_top"] == (wins >= 0.5)
    expected = top if wins >= 0.5 else worst
    assert guarded["setting"] == expected["setting"]
    assert guarded["select_miou"] == pytest.approx(expected["metrics"]["select_miou"], abs=1e-9)

    combined = choose_setting(tiny_sweep_inputs, records, SelectionRule(objective="combined", guard_level=0),
                              "expected_miou")
    means = [0.5 * (r["metrics"]["select_miou"] + r["metrics"]["label_free_expected_miou"]) for r in records]
    assert combined["setting"] == records[int(np.argmax(means))]["setting"]
    with pytest.raises(ConfigError, match=r"selection.fallback: \['train.refine.tau'\] are not IA settings"):
        load_config(SWEEP_IA_CONFIG, ["sweep.selection.fallback={train.refine.tau: 1}"])
