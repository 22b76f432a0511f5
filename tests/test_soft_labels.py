"""The soft-label codec and schema, PseudoLabelDataset (hard and soft targets), the soft distillation loss,
sharding-independent estimator draws and StageDir's kept partials (no Ray)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch


def test_soft_label_codec_round_trips_and_is_small(tmp_path):
    from labelshift.pseudo import SOFT_LABEL_VERSION, encode_soft_labels, read_soft_labels, soft_target, \
        write_soft_labels

    logits = torch.randn(19, 64, 128, generator=torch.Generator().manual_seed(0)) * 3
    probs = logits.softmax(0)
    soft = encode_soft_labels("aachen_000000_000019", probs, 3)
    names = tuple(f"c{i}" for i in range(19))
    write_soft_labels(tmp_path / "a.parquet", soft, names)
    back, classes = read_soft_labels(tmp_path / "a.parquet")
    assert classes == names and back.name == soft.name
    assert np.array_equal(back.class_ids, soft.class_ids) and np.array_equal(back.probs, soft.probs)
    assert np.array_equal(back.class_ids[0], logits.argmax(0).numpy())  # rank 0 is the argmax
    kept = torch.gather(probs, 0, torch.from_numpy(back.class_ids.astype(np.int64))).numpy()
    assert np.abs(back.probs / 255.0 - kept).max() <= 0.5 / 255 + 1e-7
    assert back.kept_mass == pytest.approx(float(kept.sum(0).mean()), abs=1e-6)
    target = soft_target(back, 19)
    np.testing.assert_allclose(target.sum(0), 1.0, atol=1e-6)
    assert np.count_nonzero(target, axis=0).max() <= 3
    assert (tmp_path / "a.parquet").stat().st_size * 8 <= 19 * 64 * 128 * 4  # <= 1/8 of a float32 softmax map

    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "a.parquet")
    assert table.schema.metadata[b"labelshift.soft_labels.version"] == str(SOFT_LABEL_VERSION).encode()
    assert table.column_names == ["name", "height", "width", "k", "class_ids", "probs", "kept_mass"]
    bumped = table.replace_schema_metadata({**table.schema.metadata, b"labelshift.soft_labels.version": b"99"})
    pq.write_table(bumped, tmp_path / "b.parquet")
    with pytest.raises(ValueError, match="schema version 99"):
        read_soft_labels(tmp_path / "b.parquet")


def test_pseudo_label_dataset_round_trips_hard_and_soft_targets(shared_cfg, tiny_trained, tmp_path):
    from labelshift.build import build_split
    from labelshift.data.pseudo_labels import PseudoLabelDataset, soft_cross_entropy
    from labelshift.pseudo import LABELS, SOFT, pseudo_settings, read_soft_labels, soft_target
    from labelshift.runners.data import InProcessPasses
    from labelshift.data.io import read_label_ids

    cfg = shared_cfg("pseudo.confidence_threshold=0.07")
    dataset = build_split(cfg, "target", train=False, with_labels=False)
    counts = InProcessPasses("cpu", None).label(cfg, tiny_trained.model, dataset, tmp_path, pseudo_settings(cfg))
    assert counts["images"] == 16 and 0.0 < counts["kept_pixel_fraction"] < 1.0

    hard = PseudoLabelDataset(build_split(cfg, "target", train=False, pseudo_label_dir=tmp_path / LABELS))
    item = hard[3]
    assert torch.equal(item["label"], torch.from_numpy(read_label_ids(tmp_path / LABELS / f"{item['name']}.png",
                                                                      "gray").astype(np.int64)))
    images = build_split(cfg, "target", train=False, with_labels=False)
    soft = PseudoLabelDataset(images, "soft", tmp_path / SOFT, confidence_threshold=0.07)
    item = soft[3]
    stored, _ = read_soft_labels(tmp_path / SOFT / f"{item['name']}.parquet")
    expected = torch.from_numpy(soft_target(stored, 19))  # (K, 8, 16) at the output grid of a 64x32 input
    expected[:, torch.from_numpy(stored.probs[0] < round(255 * 0.07))] = 0
    nearest = expected.repeat_interleave(4, dim=1).repeat_interleave(4, dim=2)  # evaluation transform: same size
    assert item["label"].shape == (19, 32, 64) and torch.equal(item["label"], nearest)
    assert 0 < (item["label"].sum(0) > 0).float().mean() < 1  # some pixels filtered, most kept

    logits = torch.randn(1, 19, 32, 64, requires_grad=True)
    loss = soft_cross_entropy(logits, item["label"][None])
    valid = item["label"].sum(0) > 0
    manual = -(item["label"] * torch.log_softmax(logits[0], 0)).sum(0)[valid].mean()
    assert torch.allclose(loss, manual)
    loss.backward()
    assert logits.grad[0][:, ~valid].abs().max() == 0


def test_training_transform_moves_soft_targets_with_the_image(shared_cfg, tiny_trained, tmp_path):
    from labelshift.build import build_split
    from labelshift.data.pseudo_labels import PseudoLabelDataset
    from labelshift.pseudo import SOFT, pseudo_settings
    from labelshift.runners.data import InProcessPasses

    cfg = shared_cfg()
    cfg.data.target_transform.crop_size, cfg.data.target_transform.scale_range = (40, 24), (0.8, 1.5)
    InProcessPasses("cpu", None).label(cfg, tiny_trained.model, build_split(cfg, "target", train=False,
                                                                            with_labels=False), tmp_path,
                                       pseudo_settings(cfg))
    images = build_split(cfg, "target", train=True, with_labels=False, seed=3)
    item = PseudoLabelDataset(images, "soft", tmp_path / SOFT)[5]
    assert item["image"].shape == (3, 24, 40) and item["label"].shape == (19, 24, 40)
    plain = build_split(cfg, "target", train=True, with_labels=False, seed=3)[5]
    assert torch.equal(item["image"], plain["image"])  # the same random geometry and jitter as a plain item
    np.testing.assert_allclose(item["label"].sum(0).numpy(), 1.0, atol=1e-6)


def test_named_draws_do_not_depend_on_sharding_or_order():
    from labelshift.estimate import make_estimator

    names = [f"img{i}" for i in range(8)]
    maps = torch.rand(8, 4, 6, 8, generator=torch.Generator().manual_seed(1)).softmax(1)
    kwargs = {"em": {"source_prior": [0.25] * 4, "sample_size": 100}, "count": {}}
    for method, extra in kwargs.items():
        whole = make_estimator(method, ("a", "b", "c", "d"), bootstrap=5, seed=2, **extra)
        whole.update(maps, names=names)
        shards = [make_estimator(method, ("a", "b", "c", "d"), bootstrap=5, seed=2, **extra) for _ in range(3)]
        for shard, rows in zip(shards, ([5, 6, 7], [0, 1], [2, 3, 4])):
            shard.expect_pixels(8 * 48)
            shard.update(maps[rows], names=[names[i] for i in rows])
        merged = shards[1]
        merged.merge(shards[2]).merge(shards[0])
        if method == "em":
            np.testing.assert_allclose(merged.result().probs, whole.result().probs, atol=1e-12)
        else:
            np.testing.assert_array_equal(merged.result().probs, whole.result().probs)
        with pytest.raises(ValueError, match="same 3 image"):
            merged.merge(shards[2])


def test_stage_dir_keeps_a_partial_of_the_same_work_only(tmp_path):
    from labelshift.pipeline.manifest import StageDir

    stage = StageDir(tmp_path, "pseudo", "f1", {"refine": "c1"})
    (stage.begin() / "labels").mkdir()
    (stage.partial / "labels" / "a.png").write_bytes(b"done")
    assert (StageDir(tmp_path, "pseudo", "f1", {"refine": "c1"}).begin() / "labels" / "a.png").read_bytes() == b"done"
    assert not (StageDir(tmp_path, "pseudo", "f1", {"refine": "c2"}).begin() / "labels").exists()  # other inputs
    (stage.begin() / "labels").mkdir()
    assert not (StageDir(tmp_path, "pseudo", "f2", {"refine": "c1"}).begin() / "labels").exists()  # other config
    done = StageDir(tmp_path, "pseudo", "f2", {"refine": "c1"})
    done.commit([], {})
    assert json.loads((tmp_path / "pseudo" / "manifest.json").read_text())["fingerprint"] == "f2"
    assert not (tmp_path / "pseudo" / ".partial.json").exists()


def test_threaded_labelling_pass_writes_the_files_of_the_in_process_pass(shared_cfg, tiny_trained, tmp_path):
    """The no-Ray pool variant (decode and write thread pools around the same teacher): the same bytes as
    ``label_split`` (hence as the Ray Data pass, tests/test_ray_data.py), and it resumes the same way."""
    from labelshift.build import build_model, build_split
    from labelshift.pseudo import label_split, pseudo_settings

    cfg = shared_cfg("pseudo.confidence_threshold=0.07")
    dataset = build_split(cfg, "target", train=False, with_labels=False)
    model, settings = build_model(cfg, tiny_trained.model).eval(), pseudo_settings(cfg)
    cpu = torch.device("cpu")
    plain = label_split(model, dataset, tmp_path / "plain", settings, device=cpu, batch_size=2)
    threaded = label_split(model, dataset, tmp_path / "pool", settings, device=cpu, batch_size=2, threads=(3, 1))
    assert len(_files_of(tmp_path / "pool")) == 48 and _files_of(tmp_path / "pool") == _files_of(tmp_path / "plain")
    assert threaded == plain and threaded["chunks_run"] == 8 and threaded["images"] == 16

    (tmp_path / "pool" / "soft" / f"{dataset.names[7]}.parquet").unlink()
    resumed = label_split(model, dataset, tmp_path / "pool", settings, device=cpu, batch_size=2, threads=(4, 2))
    assert resumed["chunks_run"] == 1 and resumed["images"] == 2
    assert _files_of(tmp_path / "pool") == _files_of(tmp_path / "plain")


def _files_of(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
