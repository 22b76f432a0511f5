"""The serving library without Ray: strict decoding and limits, the PUT guard, bundles (export, load, sweep
overrides), the engine's masks against labelshift.inference.predict, and online prior tracking."""
from __future__ import annotations

import io
import json
import struct
import zlib

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from labelshift.adjust import ia_transform
from labelshift.bundle import BundleError, apply_overrides_file, export_bundle, load_bundle
from labelshift.calibrate import Calibration
from labelshift.data.decode import ImageInputError, ImageLimits, decode_image
from labelshift.data.io import read_image
from labelshift.inference import predict
from labelshift.priors import ClassPrior, SourcePriors, prior_l1
from labelshift.serving import OnlinePriorTracker, ParameterError, SegmentationEngine, SegmentOptions
from labelshift.serving.auth import check_mutation


def _png(array: np.ndarray) -> bytes:
    ok, encoded = cv2.imencode(".png", array)
    assert ok
    return encoded.tobytes()


def _png_header(width: int, height: int) -> bytes:
    """A PNG signature and IHDR chunk announcing width x height (8-bit RGB), and nothing else."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))


RGB = (np.arange(5 * 7 * 3).reshape(5, 7, 3) * 5 % 256).astype(np.uint8)


# ------------------------------------------------------------------------------------------------ decoding
def test_png_and_jpeg_decode_as_the_dataset_reader_reads_them(tmp_path):
    for suffix in (".png", ".jpg"):
        path = tmp_path / f"image{suffix}"
        cv2.imwrite(str(path), cv2.cvtColor(RGB, cv2.COLOR_RGB2BGR))
        decoded = decode_image(path.read_bytes())
        assert decoded.dtype == np.uint8 and decoded.shape == (5, 7, 3)
        assert np.array_equal(decoded, read_image(path))
    assert np.array_equal(decode_image(_png(cv2.cvtColor(RGB, cv2.COLOR_RGB2BGR))), RGB)


def test_gray_rgba_palette_and_16_bit_images_are_converted_not_rejected():
    gray = RGB[..., 0]
    assert np.array_equal(decode_image(_png(gray)), np.repeat(gray[..., None], 3, axis=2))
    bgra = np.dstack([cv2.cvtColor(RGB, cv2.COLOR_RGB2BGR), np.full((5, 7), 9, np.uint8)])
    assert np.array_equal(decode_image(_png(bgra)), RGB)  # alpha dropped
    sixteen = RGB.astype(np.uint16) * 257  # 16-bit: v * 257 scales back to v exactly
    assert np.array_equal(decode_image(_png(cv2.cvtColor(sixteen, cv2.COLOR_RGB2BGR))), RGB)
    buffer = io.BytesIO()
    palette_image = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), mode="P")
    palette_image.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    palette_image.save(buffer, format="PNG")
    assert decode_image(buffer.getvalue()).tolist() == [[[10, 20, 30], [200, 100, 50]], [[200, 100, 50], [10, 20, 30]]]


@pytest.mark.parametrize("make, declared, status, reason, words", [
    (lambda png: b"", None, 400, "corrupt", "empty body"),
    (lambda png: png[: len(png) // 2], None, 400, "corrupt", "truncated or corrupt"),
    (lambda png: png[:20], None, 400, "corrupt", "no IHDR"),
    (lambda png: b"\xff\xd8\xff\xe0" + b"\x00" * 40, None, 400, "corrupt", "JPEG"),
    (lambda png: b"hello world", None, 400, "corrupt", "not an image"),
    (lambda png: b"GIF89a" + png, None, 415, "unsupported_type", "gif"),
    (lambda png: png, "jpeg", 415, "unsupported_type", "declared jpeg but the bytes are png"),
    (lambda png: png + b"\x00" * 2000, None, 413, "too_large", "the limit is 2000 bytes"),
    (lambda png: _png_header(100_000, 100_000), None, 413, "too_large", "10000000000 pixels; the limit is 4096"),
    (lambda png: _png_header(0, 10), None, 400, "corrupt", "empty image"),
])
def test_bad_bytes_raise_the_status_and_reason_they_deserve(make, declared, status, reason, words):
    limits = ImageLimits(max_bytes=2000, max_pixels=4096)
    with pytest.raises(ImageInputError) as caught:
        decode_image(make(_png(RGB)), limits, declared)
    assert (caught.value.status, caught.value.reason) == (status, reason)
    assert words in caught.value.detail


# ------------------------------------------------------------------------------------------------ PUT guard
def test_put_needs_the_token_when_one_is_set_and_loopback_otherwise():
    assert check_mutation("s3cret", "Bearer s3cret", "0.0.0.0", "10.0.0.8") is None
    assert check_mutation("s3cret", None, "127.0.0.1", "127.0.0.1").status == 401
    assert check_mutation("s3cret", "Basic s3cret", "127.0.0.1", "127.0.0.1").status == 401
    assert check_mutation("s3cret", "Bearer s3creT", "127.0.0.1", "127.0.0.1").status == 403
    assert check_mutation(None, None, "127.0.0.1", "127.0.0.1") is None
    assert check_mutation(None, None, "::1", "::1") is None
    refused = check_mutation(None, None, "0.0.0.0", "127.0.0.1")
    assert refused.status == 403 and "LABELSHIFT_SERVE_TOKEN" in refused.detail
    assert check_mutation(None, None, None, "127.0.0.1").status == 403  # unknown bind address: refused
    assert check_mutation(None, None, "127.0.0.1", "192.168.1.4").status == 403


# ------------------------------------------------------------------------------------------------ bundles
@pytest.fixture(scope="module")
def bundle_dir(tiny_trained, tmp_path_factory):
    from labelshift.config import load_config
    from conftest import DEMO_CONFIG

    directory = tmp_path_factory.mktemp("bundle") / "adapted"
    export_bundle(directory, model_path=tiny_trained.model, cfg=load_config(DEMO_CONFIG, tiny_trained.overrides),
                  priors=tiny_trained.priors(), calibration=Calibration.from_dict(tiny_trained.calibration()),
                  prior_corrected=False, model_stage="pretrain")
    return directory


def test_a_bundle_round_trips_and_carries_no_oracle(bundle_dir, tiny_trained):
    bundle = load_bundle(bundle_dir)
    written = tiny_trained.priors()
    assert "oracle_pixel" in written and not any(name.startswith("oracle") for name in bundle.priors)
    assert bundle.target_prior.probs.tolist() == written["target"].probs.tolist()
    assert bundle.source.calibrated.probs.tolist() == written["source_calibrated"].probs.tolist()
    assert (bundle.input_size, bundle.prior_corrected, bundle.model_stage) == ((64, 32), False, "pretrain")
    assert bundle.calibration.to_dict() == tiny_trained.calibration()


def test_a_bundle_with_other_weights_is_refused(bundle_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(bundle_dir, copy)
    (copy / "model.safetensors").unlink()
    (copy / "model.safetensors").write_bytes((bundle_dir / "model.safetensors").read_bytes() + b" ")
    with pytest.raises(BundleError, match="differs from the bundle's"):
        load_bundle(copy).build_model()
    with pytest.raises(BundleError, match="bundle.json is missing"):
        load_bundle(tmp_path)


def test_sweep_overrides_set_the_ia_settings_and_the_estimate(bundle_dir, tmp_path):
    overrides = tmp_path / "best.yaml"
    overrides.write_text("adjust: {temperature: 1.5, tau_target: 0.5}\nprior.method: bbse\n")
    tuned = apply_overrides_file(load_bundle(bundle_dir), overrides)
    assert (tuned.adjust.temperature, tuned.adjust.tau_target, tuned.target_prior_name) == (1.5, 0.5, "estimate_bbse")
    overrides.write_text("- adjust.temperature=0\n")
    with pytest.raises(BundleError, match="adjust.temperature: Input should be greater than 0"):
        apply_overrides_file(load_bundle(bundle_dir), overrides)
    overrides.write_text("- prior.calibration=none\n- adjust.tau_source=2\n")
    with pytest.raises(BundleError, match=r"\['prior.calibration=none'\] need a new estimate"):
        apply_overrides_file(load_bundle(bundle_dir), overrides)


def test_a_user_config_is_laid_over_the_sweep_overrides_and_a_key_left_out_serves_theirs(bundle_dir, tmp_path):
    overrides = tmp_path / "best_overrides.yaml"  # as a sweep writes it: {config path: value}
    overrides.write_text("adjust.temperature: 1.5\nadjust.tau_target: 0.5\nprior.method: bbse\n")
    tuned = apply_overrides_file(load_bundle(bundle_dir), overrides)
    engine = SegmentationEngine(tuned)
    engine.reconfigure({})  # what Serve calls at start with the shipped user_config
    assert (engine.target_name, engine.adjust, engine.version) == ("estimate_bbse", tuned.adjust, 1)
    assert engine.target_prior.probs.tolist() == tuned.priors["estimate_bbse"].probs.tolist()
    engine.reconfigure({"target_prior": "target", "adjust": {"tau_target": 2.0}})
    assert (engine.target_name, engine.adjust.temperature, engine.adjust.tau_target) == ("target", 1.5, 2.0)
    engine.set_target_prior("estimate_em")  # PUT /v1/priors ...
    engine.reconfigure({"adjust": {"tau_source": 0.0}})  # ... until the next user_config, which undoes it
    assert (engine.target_name, engine.adjust.tau_target, engine.adjust.tau_source) == ("estimate_bbse", 0.5, 0.0)
    assert engine.adjust.model_dump() == {**tuned.adjust.model_dump(), "tau_source": 0.0} and engine.version == 4
    with pytest.raises(ValueError, match="holds no prior 'estimate_magic'"):
        engine.reconfigure({"target_prior": "estimate_magic"})
    assert engine.target_name == "estimate_bbse" and engine.version == 4  # a refused user_config changes nothing


# ------------------------------------------------------------------------------------------------ engine
def test_engine_masks_equal_predict_with_the_same_ia_at_any_size(bundle_dir, tiny_world):
    bundle = load_bundle(bundle_dir)
    engine = SegmentationEngine(bundle)
    path = sorted((tiny_world / "cityscapes" / "leftImg8bit" / "val").rglob("*.png"))[0]
    image = read_image(path)
    small = np.ascontiguousarray(image[:20, :50])
    answers = engine.segment([image, small], [SegmentOptions("ia", temperature=2.0), SegmentOptions("none")])
    ia = ia_transform(bundle.adjust.model_copy(update={"temperature": 2.0}), bundle.source, bundle.target_prior,
                      bundle.calibration)
    for answer, array, transform in ((answers[0], image, ia), (answers[1], small, None)):
        logits = predict(engine.model, engine.image_tensor(array)[None], array.shape[:2], device=torch.device("cpu"))
        expected = (logits if transform is None else transform(logits)).argmax(1)[0].numpy()
        assert answer.mask.shape == array.shape[:2] and np.array_equal(answer.mask, expected)
    assert (answers[0].prior, answers[1].prior) == ("target", None)
    assert not np.array_equal(answers[0].mask, engine.segment([image], [SegmentOptions("none")])[0].mask)


def test_adjust_local_gives_each_image_its_own_prior_and_keeps_no_state(bundle_dir, tiny_world, tmp_path):
    # MAP-EM reads each image's soft posteriors (the default hard-EM can give two images of the tiny model's
    # all-one-class masks the same prior, and so can the presence weighting, which keeps that one class)
    assert bundle_dir.is_dir() and load_bundle(bundle_dir).calibration.presence is not None  # carried to Serve
    without_model = load_bundle(bundle_dir)
    without_model.calibration.presence = None  # a bundle exported before presence models: a 422, not a 500
    with pytest.raises(ParameterError, match="needs the presence model"):
        SegmentationEngine(without_model).check_options(SegmentOptions("local"))
    soft = tmp_path / "map_em.yaml"
    soft.write_text("adjust: {local: {estimator: map_em, presence: false}}\n")
    bundle = apply_overrides_file(load_bundle(bundle_dir), soft)
    engine = SegmentationEngine(bundle)
    paths = sorted((tiny_world / "cityscapes" / "leftImg8bit" / "val").rglob("*.png"))[:2]
    images = [read_image(path) for path in paths]
    answers = engine.segment(images, [SegmentOptions("local", tau_target=0.8)] * 2)
    local = ia_transform(bundle.adjust.model_copy(update={"mode": "local", "tau_target": 0.8}), bundle.source,
                         bundle.target_prior, bundle.calibration)
    for answer, image in zip(answers, images):
        logits = predict(engine.model, engine.image_tensor(image)[None], image.shape[:2], device=torch.device("cpu"))
        priors = local.image_priors(logits)
        assert np.array_equal(answer.mask, local.apply(logits, priors).argmax(1)[0].numpy())
        assert answer.image_prior["prior"] == pytest.approx(priors.probs[0].tolist())
        assert (answer.prior, answer.info()["image_prior"]["iterations"]) == ("local, toward target",
                                                                              priors.record(0)["iterations"])
    # the two images' priors differ from each other and from the dataset prior; a batch of one gives the same
    first, second = (np.asarray(answer.image_prior["prior"]) for answer in answers)
    assert prior_l1(bundle.target_prior, first) > 0.05 and np.abs(first - second).sum() > 0.05
    alone = engine.segment(images[1:], [SegmentOptions("local", tau_target=0.8)])[0]
    assert np.array_equal(alone.mask, answers[1].mask) and engine.version == 0
    engine.set_target_prior(ClassPrior(bundle.classes, np.full(len(bundle.classes), 1.0), "image"))
    with pytest.raises(ParameterError, match="shrinks each image's prior toward a pixel prior"):
        engine.check_options(SegmentOptions("local"))
    # a sweep's overrides file may choose local IA: adjust=ia then serves it, with the bundle's kappa replaced
    overrides = tmp_path / "best.yaml"
    overrides.write_text("adjust: {mode: local, local: {kappa: 300.0}}\n")
    tuned = SegmentationEngine(apply_overrides_file(bundle, overrides))
    answer = tuned.segment(images[:1], [SegmentOptions("ia")])[0]
    kappa300 = ia_transform(bundle.adjust.model_copy(update={"mode": "local", "local": tuned.adjust.local}),
                            bundle.source, bundle.target_prior, bundle.calibration).image_priors(
        predict(engine.model, engine.image_tensor(images[0])[None], images[0].shape[:2], device=torch.device("cpu")))
    assert (tuned.adjust.local.kappa, answer.prior) == (300.0, "local, toward target")
    assert answer.image_prior["prior"] == pytest.approx(kappa300.probs[0].tolist())


def test_a_corrected_model_refuses_ia_and_online(bundle_dir, tmp_path):
    import shutil

    corrected = tmp_path / "corrected"
    shutil.copytree(bundle_dir, corrected)
    index = json.loads((corrected / "bundle.json").read_text())
    (corrected / "bundle.json").write_text(json.dumps({**index, "prior_corrected": True}))
    engine = SegmentationEngine(load_bundle(corrected))
    assert engine.default_adjust == "none"
    for adjust in ("ia", "online", "local"):
        with pytest.raises(ParameterError, match=f"adjust={adjust} would correct twice"):
            engine.check_options(SegmentOptions(adjust))
    with pytest.raises(ParameterError, match=r"temperature must be in \[0.05, 20.0\]"):
        SegmentOptions("none", temperature=float("nan"))


def test_check_health_raises_when_the_model_answers_non_finite_logits(bundle_dir):
    engine = SegmentationEngine(load_bundle(bundle_dir))
    engine.check_health()  # Serve's check_health passes: the replica stays
    with torch.no_grad():
        next(engine.model.parameters()).fill_(float("nan"))
    with pytest.raises(RuntimeError, match=r"logits of shape \(1, 19, 8, 8\) \(finite: False\)"):
        engine.check_health()  # Serve replaces the replica


# ------------------------------------------------------------------------------------------------ online
def test_online_tracking_moves_to_the_true_prior_of_shifted_data():
    """Served images whose posteriors are exact under the source prior (Gaussian classes): the window's EM
    estimate lands near the target prior the images were drawn with, far from the source prior."""
    classes = ("a", "b", "c")
    source = ClassPrior(classes, np.array([0.6, 0.3, 0.1]), "pixel")
    target = np.array([0.1, 0.3, 0.6])
    means = np.array([-2.0, 0.0, 2.0])
    rng = np.random.default_rng(0)
    tracker = OnlinePriorTracker(classes, SourcePriors(source, source, source), Calibration.identity(3),
                                 window_images=20, pixels_per_image=500, update_every=5, min_images=5)
    assert tracker.prior is None
    for _ in range(30):
        labels = rng.choice(3, size=(16, 64), p=target)
        x = means[labels] + rng.normal(size=labels.shape)
        logits = -0.5 * (x[None] - means[:, None, None]) ** 2 + np.log(source.probs)[:, None, None]  # log p_s(y|x)+c
        tracker.observe(torch.from_numpy(logits[None]).float())
    state = tracker.state()
    assert (state.images_seen, state.window_images, state.updates) == (30, 20, 6)
    assert prior_l1(state.prior, target) < 0.08 < 0.9 < prior_l1(source, target)


# ------------------------------------------------------------------------------------------------ back-pressure
def test_admission_holds_working_plus_waiting_requests_and_refuses_the_next_at_once():
    import asyncio

    from labelshift.serving.admission import Admission, Overloaded
    from labelshift.serving.settings import REJECTION_HEADROOM, ServeSettings

    async def scenario() -> tuple[list[str], dict, int]:
        admission, release, events = Admission(working=2, waiting=1), asyncio.Event(), []

        async def request(number: int) -> None:
            try:
                async with admission.admit():
                    events.append(f"start {number}")
                    await release.wait()
            except Overloaded as refusal:
                events.append(f"refused {number}: {refusal.detail}")

        tasks = [asyncio.create_task(request(number)) for number in range(5)]
        await asyncio.sleep(0.01)
        held = admission.held
        release.set()
        await asyncio.gather(*tasks)
        return events, admission.state(), held

    events, state, held_while_blocked = asyncio.run(scenario())
    assert held_while_blocked == 3 and state == {"held": 0, "working": 2, "waiting": 1, "refused": 2}
    full = "the replica holds 3 requests (2 in work, 1 waiting), its limit; retry in about 1 s"
    assert events == ["start 0", "start 1", f"refused 3: {full}", f"refused 4: {full}", "start 2"]
    settings = ServeSettings(bundle="b", max_ongoing_requests=8, max_queued_requests=4)
    assert settings.admission_limit == 12
    assert settings.serve_options() == {"max_ongoing_requests": 12 + REJECTION_HEADROOM,
                                        "max_queued_requests": 12 + REJECTION_HEADROOM}
    unbounded = ServeSettings(bundle="b", max_queued_requests=-1)
    assert unbounded.admission_limit is None and unbounded.serve_options()["max_queued_requests"] == -1

