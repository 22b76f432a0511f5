from pathlib import Path

import pytest

from labelshift.config import ConfigError, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", ["demo.yaml", "gta5_to_cityscapes.yaml", "synthia_to_cityscapes.yaml"])
def test_shipped_configs_validate(name):
    cfg = load_config(CONFIGS / name)
    assert cfg.name == name.removesuffix(".yaml")


def test_reference_hyperparameters_in_real_configs():
    g2c = load_config(CONFIGS / "gta5_to_cityscapes.yaml")
    assert g2c.model.name == "deeplabv2_resnet101"
    assert (g2c.train.refine.iterations, g2c.train.refine.lr, g2c.train.refine.head_lr_mult) == (40000, 2.5e-4, 10.0)
    assert (g2c.train.distill.iterations, g2c.train.distill.lr, g2c.train.distill.batch_size) == (20000, 5e-4, 8)
    assert g2c.train.distill.sync_bn and g2c.ray.num_workers == 4 and g2c.ray.use_gpu
    assert g2c.data.source_transform.size == (1280, 720)
    assert g2c.data.target_transform.crop_size == (1024, 512) and g2c.data.target_transform.scale_range == (0.5, 1.5)
    s2c = load_config(CONFIGS / "synthia_to_cityscapes.yaml")
    assert s2c.data.class_set == "synthia16" and s2c.data.source.kind == "synthia"


def test_overrides_are_parsed_as_yaml():
    cfg = load_config(CONFIGS / "demo.yaml", ["train.source.iterations=7", "ray.use_gpu=true", "eval.scales=[0.5,1.0]"])
    assert cfg.train.source.iterations == 7 and cfg.ray.use_gpu is True and cfg.eval.scales == (0.5, 1.0)


def test_unknown_key_names_key_file_and_the_expected_keys(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text((CONFIGS / "demo.yaml").read_text().replace("prior:\n", "prior:\n  methd: em\n", 1))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == (
        f"invalid configuration in {path}:\n  prior.methd: unknown key; expected one of ['bootstrap', "
        "'calibration', 'em_sample_pixels', 'max_images', 'method', 'oracle', 'presence_threshold', 'seed', "
        "'source_image_prior', 'source_pixel_prior', 'source_prior', 'target_prior']; did you mean 'method'?")


def test_duplicate_yaml_key_is_an_error(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text((CONFIGS / "demo.yaml").read_text() + "\nprior:\n  method: count\n")
    with pytest.raises(ConfigError, match=f"config file {path} is not valid YAML: duplicate key 'prior' "
                                          r"\(first on line \d+\)"):
        load_config(path)


def test_errors_name_the_override_that_set_the_key():
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "demo.yaml", ["model.nme=small"])
    assert ("  model.nme: unknown key; expected one of ['align_corners', 'checkpoint', 'frozen_bn', 'name', "
            "'pretrained', 'width']; "
            "did you mean 'name'? [from the override 'model.nme=small']") in str(err.value)
    with pytest.raises(ConfigError) as err:  # a whole-section check still points at the override inside it
        load_config(CONFIGS / "demo.yaml", ["data.world.num_source=0", "eval.flip=true"])
    assert str(err.value).endswith("  data.world: num_source must be at least 1, got 0 "
                                   "[from the override 'data.world.num_source=0']")


@pytest.mark.parametrize("override, expected", [
    ("model.name=resnet9", "model.name: unknown model 'resnet9'; expected one of ['deeplabv2_resnet101', "
                           "'deeplabv2_resnet101_modified_aspp', 'deeplabv2_resnet50', 'small']"),
    ("stages=[estimate,foo]", "stages.1: Input should be 'pretrain', 'estimate', 'evaluate_adapted', 'refine', "
                              "'evaluate_refined', 'pseudo', 'distill', 'evaluate_distilled' or 'export' (got 'foo')"),
    ("train.source.iterations=-5", "train.source.iterations: Input should be greater than or equal to 1 (got -5)"),
    ("ray.num_workers=0", "ray.num_workers: Input should be greater than or equal to 1 (got 0)"),
    ("eval.scales=[0]", "eval.scales.0: Input should be greater than 0 (got 0)"),
    ("eval.subset=[road,roadd]", "  eval.subset names ['roadd'], not classes of cityscapes19"),
    ("data.world.num_source=0", "data.world: num_source must be at least 1, got 0"),
    ("data.source_transform.scale_range=[1.5,0.5]", "data.source_transform: scale_range must be "
                                                    "(low, high) with low <= high, got (1.5, 0.5)"),
])
def test_bad_values_are_rejected_when_loading(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "demo.yaml", [override])
    assert expected in str(err.value)


def test_real_config_list_files_resolve_inside_their_dataset_roots(tmp_path):
    from labelshift.data.io import resolve_list_path

    for name in ("gta5_to_cityscapes.yaml", "synthia_to_cityscapes.yaml"):
        cfg = load_config(CONFIGS / name)
        for split in (cfg.data.source, cfg.data.source_val):
            assert split.list_file is not None and not Path(split.list_file).is_absolute()
            resolved = resolve_list_path(split.list_file, Path(split.root))
            assert resolved.parent == Path(split.root) / "splits", (name, resolved)


def test_bad_value_names_key_file_and_expectation():
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "demo.yaml", ["prior.method=magic"])
    message = str(err.value)
    assert f"invalid configuration in {CONFIGS / 'demo.yaml'}:" in message
    assert ("prior.method: unknown prior estimator 'magic'; expected one of ['reference', 'count', 'soft_count', "
            "'presence', 'em', 'bbse', 'em_raw', 'ensemble'] (got 'magic')") in message


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="override 'train.source.iterations' .*expected 'section.key=value'"):
        load_config(CONFIGS / "demo.yaml", ["train.source.iterations"])
    with pytest.raises(ConfigError, match=f"config file {tmp_path / 'nope.yaml'} does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_a_moved_or_removed_key_names_its_new_place(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text((CONFIGS / "demo.yaml").read_text().replace("prior:\n", "prior:\n  kind: pixel\n", 1)
                    .replace("init: adapted}", "init: adapted, confidence_threshold: 0.7}"))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == (
        f"invalid configuration in {path}:\n"
        "  prior.kind: removed: the prior's kind (pixel or image) follows from prior.method\n"
        "  train.distill.confidence_threshold: moved to the pseudo: section; write it as "
        "pseudo.confidence_threshold: 0.7")


def test_real_data_configs_extend_one_base(tmp_path):
    from labelshift.config import read_config_file

    gta5, synthia = (load_config(CONFIGS / f"{name}_to_cityscapes.yaml") for name in ("gta5", "synthia"))
    assert (gta5.train, gta5.prior, gta5.model.name) == (synthia.train, synthia.prior, synthia.model.name)
    assert (gta5.data.class_set, synthia.data.class_set) == ("cityscapes19", "synthia16")
    assert gta5.train.refine.iterations == 40000 and gta5.ray.num_workers == 4
    assert "extends" not in read_config_file(CONFIGS / "gta5_to_cityscapes.yaml")
    child = tmp_path / "child.yaml"
    child.write_text("extends: child.yaml\nname: x\n")
    with pytest.raises(ConfigError, match="makes a cycle"):
        load_config(child)


def test_sweep_space_accepts_infinite_kappa():
    """κ = inf (global IA exactly) is a valid swept value: the space is validated on the config's Python values,
    not on a JSON dump (which writes infinity as null)."""
    cfg = load_config("configs/sweep_ia.yaml", [
        "sweep.ia.parameters={adjust.mode: {values: [local]}, adjust.local.kappa: {values: [100.0, .inf]}}"])
    assert cfg.sweep.ia.parameters["adjust.local.kappa"].values == [100.0, float("inf")]
    with pytest.raises(ConfigError, match="adjust.local.kappa"):
        load_config("configs/sweep_ia.yaml", ["sweep.ia.parameters={adjust.local.kappa: {values: [-1.0]}}"])
