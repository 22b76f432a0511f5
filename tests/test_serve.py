"""The Ray Serve application over real HTTP on the session's local Ray: endpoints, every bad input with its status,
a fuzz test, back-pressure (a JSON 503), hot-swapped priors (PUT, and a user_config redeploy in the same replica
process) without a restart, a sweep's overrides file served by serve/config.yaml's application, the token guard,
online tracking toward the true prior of a shifted stream, per-image priors (adjust=local), the served mask
against labelshift.inference.predict, a 3-second load smoke and the upload page in headless Chromium."""
from __future__ import annotations

import base64
import concurrent.futures
import io
import os
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import DEMO_CONFIG, PROJECT

httpx = pytest.importorskip("httpx")
serve = pytest.importorskip("ray.serve")
TOKEN = "s3cret-token"
MAX_BYTES, MAX_PIXELS = 300_000, 400_000


def _png(rgb: np.ndarray) -> bytes:
    return cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes()


def _ids(png: bytes) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(png)))


@pytest.fixture(scope="module")
def server(local_ray, tiny_trained, tmp_path_factory):
    """Three apps on one Serve instance on a free loopback port: ``/`` (adapted bundle, token, online tracking),
    ``/corrected`` (the same weights marked prior-corrected, no token), ``/tight`` (one request in work, one
    waiting). The hot-swap test adds ``/swap``, deployed from a config."""
    from labelshift.artifacts import TARGET
    from labelshift.bench.serve import free_port
    from labelshift.bundle import export_bundle
    from labelshift.calibrate import Calibration
    from labelshift.config import load_config
    from serve.app import make_app

    root = tmp_path_factory.mktemp("serve")
    cfg = load_config(DEMO_CONFIG, tiny_trained.overrides)
    for name, corrected in (("adapted", False), ("corrected", True)):
        export_bundle(root / name, model_path=tiny_trained.model, cfg=cfg, priors=tiny_trained.priors(),
                      calibration=Calibration.from_dict(tiny_trained.calibration()), prior_corrected=corrected,
                      model_stage="refine" if corrected else "pretrain")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    common = {"num_cpus": 0.25, "max_bytes": MAX_BYTES, "max_pixels": MAX_PIXELS}
    serve.run(make_app({"bundle": str(root / "adapted"), "token": TOKEN, **common,
                         "online": {"enabled": True, "window_images": 8, "min_images": 2, "update_every": 1}}),
              name="main", route_prefix="/")
    serve.run(make_app({"bundle": str(root / "corrected"), **common}), name="corrected", route_prefix="/corrected")
    serve.run(make_app({"bundle": str(root / "adapted"), **common, "max_batch_size": 1, "max_ongoing_requests": 1,
                         "max_queued_requests": 1}), name="tight", route_prefix="/tight")
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        yield {"client": client, "root": root, "url": f"http://127.0.0.1:{port}", "common": common,
               "bundle_target": tiny_trained.priors()[TARGET].probs.tolist()}
    serve.shutdown()


@pytest.fixture(scope="module")
def world_image(tiny_world) -> np.ndarray:
    from labelshift.data.io import read_image

    return read_image(sorted((tiny_world / "cityscapes" / "leftImg8bit" / "val").rglob("*.png"))[0])


def _segment(client, body: bytes, path: str = "/v1/segment", content_type: str = "image/png", **params):
    return client.post(path, content=body, headers={"content-type": content_type}, params=params)


def _healthy(client, prefix: str = "") -> str:
    answer = client.get(f"{prefix}/healthz")
    assert answer.status_code == 200 and answer.json()["status"] == "ok"
    return answer.json()["replica"]


def test_endpoints_answer_and_openapi_lists_them(server):
    client = server["client"]
    assert _healthy(server["client"]) and _healthy(client, "/corrected")
    assert set(client.get("/openapi.json").json()["paths"]) == {"/v1/segment", "/v1/priors", "/healthz"}
    page = client.get("/")
    assert page.status_code == 200 and "<title>labelshift segmentation</title>" in page.text
    priors = client.get("/v1/priors").json()
    assert (priors["target_name"], priors["default_adjust"], priors["prior_corrected"]) == ("target", "ia", False)
    assert client.get("/corrected/v1/priors").json()["default_adjust"] == "none"


def test_the_served_mask_equals_predict_in_every_format(server, world_image):
    from labelshift.adjust import ia_transform
    from labelshift.bundle import load_bundle
    from labelshift.inference import predict
    from labelshift.serving import SegmentationEngine

    client, body = server["client"], _png(world_image)
    engine = SegmentationEngine(load_bundle(server["root"] / "adapted"))
    bundle = engine.bundle
    logits = predict(engine.model, engine.image_tensor(world_image)[None], world_image.shape[:2],
                     device=torch.device("cpu"))
    settings = bundle.adjust.model_copy(update={"temperature": 1.5, "tau_target": 0.8})
    expected = ia_transform(settings, bundle.source, bundle.target_prior, bundle.calibration)(logits).argmax(1)[0]
    raw = _segment(client, body, adjust="ia", temperature=1.5, tau_target=0.8)
    assert raw.status_code == 200 and raw.headers["content-type"] == "image/png"
    assert np.array_equal(_ids(raw.content), expected.numpy())
    assert raw.headers["x-labelshift-prior"] == "target"
    multipart = client.post("/v1/segment", params={"format": "json", "adjust": "none"},
                            files={"image": ("street.png", body, "image/png")})
    document = multipart.json()
    unadjusted = logits.argmax(1)[0].numpy()
    assert (document["width"], document["height"], document["adjust"]) == (64, 32, "none")
    assert np.array_equal(_ids(base64.b64decode(document["mask_png_base64"])), unadjusted)
    shares = np.bincount(unadjusted.ravel(), minlength=19) / unadjusted.size
    assert [document["class_shares"][name] for name in document["classes"]] == pytest.approx(shares.tolist())
    overlay = _segment(client, body, format="overlay", adjust="none")
    colours = np.asarray(engine.palette, dtype=np.float32)[unadjusted]
    blended = np.rint(0.5 * world_image.astype(np.float32) + 0.5 * colours)
    assert np.array_equal(np.array(Image.open(io.BytesIO(overlay.content))), blended.astype(np.uint8))


def test_adjust_local_serves_the_image_own_prior_statelessly(server, world_image):
    from labelshift.adjust import ia_transform
    from labelshift.bundle import load_bundle
    from labelshift.inference import predict
    from labelshift.serving import SegmentationEngine

    client, body = server["client"], _png(world_image)
    engine = SegmentationEngine(load_bundle(server["root"] / "corrected"))  # same weights and priors
    bundle, version = engine.bundle, client.get("/v1/priors").json()["version"]
    logits = predict(engine.model, engine.image_tensor(world_image)[None], world_image.shape[:2],
                     device=torch.device("cpu"))
    local = ia_transform(bundle.adjust.model_copy(update={"mode": "local", "temperature": 1.5}), bundle.source,
                         bundle.target_prior, bundle.calibration)
    priors = local.image_priors(logits)
    answer = _segment(client, body, adjust="local", temperature=1.5, format="json")
    document = answer.json()
    assert answer.status_code == 200 and (document["adjust"], document["prior"]) == ("local", "local, toward target")
    assert np.array_equal(_ids(base64.b64decode(document["mask_png_base64"])),
                          local.apply(logits, priors).argmax(1)[0].numpy())
    assert document["image_prior"]["prior"] == pytest.approx(priors.probs[0].tolist())
    assert document["image_prior"]["iterations"] == priors.record(0)["iterations"]
    assert _segment(client, body, adjust="local", temperature=1.5, format="json").json() == document
    assert client.get("/v1/priors").json()["version"] == version  # nothing kept between requests
    refused = _segment(client, body, "/corrected/v1/segment", adjust="local")
    assert (refused.status_code, refused.json()["error"]) == (422, "bad_parameters")


def _bomb_header(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))


def test_every_bad_input_gets_its_status_as_json_and_the_server_stays_healthy(server, world_image):
    client, body = server["client"], _png(world_image)
    noise = np.random.default_rng(0).integers(0, 256, (400, 400, 3), dtype=np.uint8)  # 480 kB as PNG
    cases = [
        (_segment(client, body[: len(body) // 2]), 400, "corrupt"),
        (_segment(client, b"not an image at all"), 400, "corrupt"),
        (_segment(client, _png(noise)), 413, "too_large"),
        (client.post("/v1/segment", files={"image": ("big.png", _png(noise), "image/png")}), 413, "too_large"),
        (_segment(client, _bomb_header(50_000, 50_000)), 413, "too_large"),
        (_segment(client, body, content_type="image/gif"), 415, "unsupported_type"),
        (_segment(client, body, content_type="text/plain"), 415, "unsupported_type"),
        (_segment(client, body, content_type="image/jpeg"), 415, "unsupported_type"),
        (client.post("/v1/segment", files={"image": ("a.txt", b"hello", "text/plain")}), 415, "unsupported_type"),
        (_segment(client, body, temperature=100), 422, "bad_parameters"),
        (_segment(client, body, tau_target=-1), 422, "bad_parameters"),
        (_segment(client, body, adjust="magic"), 422, "bad_parameters"),
        (_segment(client, body, format="gif"), 422, "bad_parameters"),
        (_segment(client, body, "/corrected/v1/segment", adjust="ia"), 422, "bad_parameters"),
        (_segment(client, body, "/tight/v1/segment", adjust="online"), 422, "bad_parameters"),
    ]
    for answer, status, error in cases:
        assert (answer.status_code, answer.json()["error"]) == (status, error), answer.text
        assert answer.json()["detail"]
    assert "would correct twice" in cases[13][0].json()["detail"]
    assert "50000x50000" in cases[4][0].json()["detail"]
    gray16 = (np.arange(32 * 64).reshape(32, 64) * 31).astype(np.uint16)
    converted = client.post("/v1/segment", files={"image": ("g.png", cv2.imencode(".png", gray16)[1].tobytes(),
                                                            "application/octet-stream")})
    assert converted.status_code == 200 and _ids(converted.content).shape == (32, 64)
    _healthy(client)


def test_fuzzed_bytes_never_yield_a_5xx_or_a_dead_replica(server, world_image):
    from hypothesis import HealthCheck, given, settings, strategies as st

    client, body = server["client"], _png(world_image)
    replica = _healthy(client)

    @settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(st.one_of(st.binary(max_size=2000),
                     st.tuples(st.integers(0, len(body) - 1), st.binary(min_size=1, max_size=16),
                               st.integers(0, len(body))).map(  # overwrite some bytes, maybe truncate
                         lambda m: (body[: m[0]] + m[1] + body[m[0] + len(m[1]):])[: m[2] or None]),
                     st.integers(1, len(body) - 1).map(lambda cut: body[:cut])),
           st.sampled_from(["image/png", "image/jpeg"]))
    def check(data: bytes, content_type: str) -> None:
        answer = _segment(client, data, content_type=content_type)
        assert answer.status_code < 500, answer.text
        if answer.status_code != 200:
            assert set(answer.json()) == {"error", "detail"}

    check()
    assert _healthy(client) == replica


def test_overload_answers_a_json_503_and_the_server_recovers(server):
    noise = np.random.default_rng(1).integers(0, 256, (300, 300, 3), dtype=np.uint8)
    body = cv2.imencode(".jpg", noise)[1].tobytes()
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda _: httpx.post(f"{server['url']}/tight/v1/segment", content=body, timeout=60,
                                                     headers={"content-type": "image/jpeg"}), range(24)))
    statuses = [answer.status_code for answer in answers]
    assert set(statuses) == {200, 503} and statuses.count(200) >= 2, statuses
    for answer in answers:
        if answer.status_code == 503:  # the replica's own answer (it holds 1 working + 1 waiting), not Serve's
            assert answer.headers["content-type"] == "application/json" and answer.headers["retry-after"] == "1"
            assert answer.json()["error"] == "overloaded" and "1 in work, 1 waiting" in answer.json()["detail"]
    health = server["client"].get("/tight/healthz").json()
    assert health["status"] == "ok" and health["requests"]["refused"] == statuses.count(503)
    assert health["requests"]["held"] == 0
    assert _segment(server["client"], body, "/tight/v1/segment", "image/jpeg").status_code == 200


def _sky_prior(classes) -> dict:
    from labelshift.priors import ClassPrior

    weights = np.full(len(classes), 0.001)
    weights[list(classes).index("sky")] = 1.0
    return ClassPrior(tuple(classes), weights, "pixel", provenance={"estimator": "hand"}).to_dict()


def test_priors_hot_swap_changes_the_output_without_a_restart_and_needs_the_token(server, world_image):
    client, body = server["client"], _png(world_image)
    replica = _healthy(client)
    before = client.get("/v1/priors").json()
    sky = _sky_prior(before["target"]["classes"])
    assert client.put("/v1/priors", json=sky).status_code == 401
    wrong = client.put("/v1/priors", json=sky, headers={"authorization": "Bearer nope"})
    assert (wrong.status_code, wrong.json()["error"]) == (403, "forbidden")
    assert _segment(client, body, adjust="ia").content == _segment(client, body, adjust="ia").content
    mask_before = _ids(_segment(client, body, adjust="ia").content)
    swapped = client.put("/v1/priors", json=sky, headers={"authorization": f"Bearer {TOKEN}"})
    assert swapped.status_code == 200 and swapped.json()["version"] == before["version"] + 1
    sky_id = before["target"]["classes"].index("sky")
    mask_after = _ids(_segment(client, body, adjust="ia").content)
    assert (mask_after == sky_id).mean() > (mask_before == sky_id).mean()
    assert _healthy(client) == replica  # PUT swapped the prior in the running replica
    bad = client.put("/v1/priors", json={**sky, "classes": sky["classes"][:-1]},
                     headers={"authorization": f"Bearer {TOKEN}"})
    assert (bad.status_code, bad.json()["error"]) == (422, "bad_prior")
    # without a token, a loopback-bound server takes PUT from loopback
    assert client.put("/corrected/v1/priors", json=sky).status_code == 200


def _deploy_config(server, overrides: Path, user_config: dict | None = None) -> None:
    """Deploy the app ``swap`` from serve/config.yaml's application as shipped (``import_path``, ``args``, the
    deployment's autoscaling and ``user_config``), as ``serve run serve/config.yaml`` does (the same controller
    call), with the test's bundle, limits and CPUs, a sweep's ``overrides`` file and, when given, ``user_config``
    in place of the shipped one."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    (shipped,) = yaml.safe_load((PROJECT / "serve" / "config.yaml").read_text())["applications"]
    args = {**shipped["args"], "bundle": str(server["root"] / "adapted"), "overrides": str(overrides),
            **server["common"]}
    deployments = [{**deployment, **({} if user_config is None else {"user_config": user_config})}
                   for deployment in shipped["deployments"]]
    app = {**shipped, "name": "swap", "route_prefix": "/swap", "args": args, "deployments": deployments}
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate({"applications": [app]}), _blocking=True)


def test_the_shipped_config_serves_the_sweep_overrides_and_a_user_config_hot_swaps_over_them(server, world_image,
                                                                                              tmp_path):
    from labelshift.adjust import ia_transform
    from labelshift.bundle import apply_overrides_file, load_bundle
    from labelshift.inference import predict
    from labelshift.serving import SegmentationEngine

    client, body = server["client"], _png(world_image)
    overrides = tmp_path / "best_overrides.yaml"  # as ray_jobs/sweep.py writes it: {config path: value}
    overrides.write_text(yaml.safe_dump({"adjust.temperature": 1.5, "adjust.tau_target": 0.5, "prior.method": "bbse"}))
    engine = SegmentationEngine(load_bundle(server["root"] / "adapted"))
    logits = predict(engine.model, engine.image_tensor(world_image)[None], world_image.shape[:2],
                     device=torch.device("cpu"))
    tuned = apply_overrides_file(engine.bundle, overrides)
    tuned_mask = ia_transform(tuned.adjust, tuned.source, tuned.target_prior, tuned.calibration)(logits).argmax(1)[0]
    plain = engine.bundle
    plain_mask = ia_transform(plain.adjust, plain.source, plain.target_prior, plain.calibration)(logits).argmax(1)[0]
    assert not np.array_equal(tuned_mask.numpy(), plain_mask.numpy())  # the overrides change this image's mask

    def served() -> tuple[dict, dict, np.ndarray, str]:
        answer = _segment(client, body, "/swap/v1/segment", adjust="ia")
        return (client.get("/swap/healthz").json(), client.get("/swap/v1/priors").json(), _ids(answer.content),
                answer.headers["x-labelshift-prior"])

    _deploy_config(server, overrides)  # the shipped user_config ({}) keeps the overrides' settings
    health, priors, mask, prior_name = served()
    assert (priors["target_name"], prior_name, priors["adjust"]["temperature"], priors["adjust"]["tau_target"]) == \
        ("estimate_bbse", "estimate_bbse", 1.5, 0.5)
    assert np.array_equal(mask, tuned_mask.numpy())
    sky = _sky_prior(priors["target"]["classes"])
    _deploy_config(server, overrides, {"target_prior": sky, "adjust": {"tau_target": 3.0}})  # only user_config
    swapped_health, swapped, swapped_mask, _ = served()
    assert (swapped_health["pid"], swapped_health["actor_id"], swapped_health["replica"]) == \
        (health["pid"], health["actor_id"], health["replica"])  # reconfigure(), no restart
    assert swapped["target_name"] == "custom: hand (pixel, 19 classes)" and swapped["version"] == priors["version"] + 1
    assert (swapped["adjust"]["temperature"], swapped["adjust"]["tau_target"]) == (1.5, 3.0)  # a key left out: theirs
    sky_id = priors["target"]["classes"].index("sky")
    assert (swapped_mask == sky_id).mean() > (mask == sky_id).mean() + 0.2
    _deploy_config(server, overrides, {})  # back to the shipped user_config: the overrides again
    back_health, back, back_mask, _ = served()
    assert back_health["pid"] == health["pid"] and np.array_equal(back_mask, mask)
    assert (back["target_name"], back["adjust"]) == (priors["target_name"], priors["adjust"])
    serve.delete("swap")


def _label_prior(label_paths, rows: slice) -> np.ndarray:
    """The true pixel prior (K=19) of rows ``rows`` of the world's Cityscapes-layout label maps."""
    from labelshift.classes import get_class_set

    train_ids = get_class_set("cityscapes19").cityscapes_id_lut()
    counts = np.zeros(19)
    for path in label_paths:
        labels = train_ids[np.array(Image.open(path))][rows]
        counts += np.bincount(labels[labels < 19].ravel(), minlength=19)
    return counts / counts.sum()


def test_online_tracking_moves_toward_the_true_prior_of_a_shifted_stream(server, tiny_world):
    """Two planted class-mix shifts (the top third of 8 target images: sky, then their bottom third: road) served
    over HTTP: after each, the window's EM estimate is much closer to the served pixels' true label prior than the
    bundle's estimated target prior it starts from, and the shift's dominant class gains what the truth says."""
    client = server["client"]
    images = sorted((tiny_world / "cityscapes" / "leftImg8bit" / "train").rglob("*.png"))[:8]
    labels = [Path(str(path).replace("leftImg8bit", "gtFine", 1).replace("leftImg8bit.png", "gtFine_labelIds.png"))
              for path in images]
    priors = client.get("/v1/priors").json()
    classes, seen = priors["target"]["classes"], priors["online"]["images_seen"]
    start = np.asarray(server["bundle_target"])
    for shift, rows, dominant in (("top", slice(0, 11), "sky"), ("bottom", slice(21, 32), "road")):
        for path in images:
            crop = np.ascontiguousarray(cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)[rows])
            assert _segment(client, _png(crop), adjust="none").status_code == 200
        online = client.get("/v1/priors").json()["online"]
        estimate, truth = np.asarray(online["prior"]["probs"]), _label_prior(labels, rows)
        assert online["window_images"] == 8 and online["prior"]["provenance"]["window_images"] == 8
        k = classes.index(dominant)
        assert np.abs(estimate - truth).sum() < 0.75 * np.abs(start - truth).sum(), (shift, estimate, truth)
        assert estimate[k] > start[k] + 0.2 and truth[k] > 0.5, (shift, estimate[k], start[k], truth[k])
    assert online["images_seen"] == seen + 16 and online["updates"] >= 15  # one estimate per image from the 2nd
    assert online["prior"]["provenance"]["estimator"] == "em"
    answer = _segment(client, _png(crop), adjust="online")
    assert answer.headers["x-labelshift-prior"] == "online"


def test_a_three_second_load_gives_no_5xx_but_deliberate_503s(server, world_image):
    from labelshift.bench.serve import run_load

    result = run_load(f"{server['url']}/v1/segment", _png(world_image), clients=4, seconds=3)
    assert result["errors_5xx"] == 0 and result["rps"] > 1 and set(result["statuses"]) <= {"200", "503"}
    _healthy(server["client"])


def _chromium() -> tuple[str, str] | None:
    found = shutil.which("chromium"), shutil.which("chromedriver")
    if all(found):
        return found
    if os.environ.get("CI") == "true":  # CI must run the page test: install Debian's packages
        subprocess.run(["apt-get", "install", "-y", "chromium", "chromium-driver"], check=False, timeout=600)
        found = shutil.which("chromium"), shutil.which("chromedriver")
        assert all(found), "CI=true but apt-get could not install chromium and chromium-driver"
        return found
    return None


def test_the_upload_page_shows_the_overlay_and_class_shares_in_headless_chromium(server, tiny_world):
    found = _chromium()
    if found is None:
        pytest.skip("headless Chromium is not installed (apt-get install chromium chromium-driver; under CI=true "
                    "the test installs it)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=900,700"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(found[1]), options=options)
    try:
        driver.get(server["url"] + "/")
        image = sorted((tiny_world / "cityscapes" / "leftImg8bit" / "val").rglob("*.png"))[0]
        driver.find_element(By.ID, "file").send_keys(str(image))
        driver.find_element(By.ID, "submit").click()
        WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#shares li"))
        overlay = driver.find_element(By.ID, "overlay")
        assert overlay.is_displayed() and driver.execute_script("return arguments[0].naturalWidth", overlay) == 64
        shares = [item.text for item in driver.find_elements(By.CSS_SELECTOR, "#shares li")]
        assert shares and all(": " in text and text.endswith(" %") for text in shares)
        assert "64x32, adjust=ia, prior=" in driver.find_element(By.ID, "status").text
        artifacts = Path(os.environ.get("LABELSHIFT_TEST_ARTIFACTS", PROJECT / "outputs" / "test-artifacts"))
        artifacts.mkdir(parents=True, exist_ok=True)
        assert driver.save_screenshot(str(artifacts / "serve_page.png"))
    finally:
        driver.quit()
