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


def test_unknown_key_names_key_and_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text((CONFIGS / "demo.yaml").read_text() + "\nprior:\n  methd: em\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert f"invalid configuration in {path}:\n  prior.methd: unknown key (not a field of this section)" in str(err.value)


def test_bad_value_names_key_file_and_expectation():
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "demo.yaml", ["prior.method=magic"])
    message = str(err.value)
    assert f"invalid configuration in {CONFIGS / 'demo.yaml'}:" in message
    assert "prior.method: Input should be 'reference', 'count', 'soft_count', 'presence', 'em' or 'bbse' (got 'magic')" in message


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="override 'train.source.iterations' .*expected 'section.key=value'"):
        load_config(CONFIGS / "demo.yaml", ["train.source.iterations"])
    with pytest.raises(ConfigError, match=f"config file {tmp_path / 'nope.yaml'} does not exist"):
        load_config(tmp_path / "nope.yaml")
