"""Benchmark and load test of the HTTP segmentation server (serve/app.py) on a local Ray, over loopback.

    python -m labelshift.bench.serve [--bundle DIR] [--seconds 10]      # the benchmark
    python -m labelshift.bench.serve --load [--clients 8 --seconds 20]  # the bounded load test

Benchmark, one run, side by side: the direct in-process prediction of one image (decoded array -> engine:
resize, forward, upsample, IA, argmax; no HTTP, no decode), single-client HTTP latency of the batched app
(PNG upload, decode, batching, PNG answer: the overhead over the direct call), and the throughput of 8
concurrent clients against the batched app (``max_batch_size`` 8) and the unbatched one (1). Warm-up requests
are not measured; Ray and Serve start-up are not included. Load test: 8 clients for 20 s against the batched
app with a bounded queue; 503s are deliberate back-pressure, any other 5xx is an error. Both end with one JSON
line. Without ``--bundle`` the demo's adapted bundle is used, or a tiny one is trained when it is missing.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

DEMO_BUNDLE = Path("outputs/demo/stages/export/bundles/adapted")
PROJECT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_load(url: str, body: bytes, *, clients: int, seconds: float, content_type: str = "image/png") -> dict:
    """``clients`` threads POST ``body`` to ``url`` for ``seconds``; latencies (ms) of 200s, status counts."""
    latencies: list[float] = []
    statuses: Counter = Counter()
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def client() -> None:
        import httpx

        with httpx.Client(timeout=60) as session:
            while time.perf_counter() < deadline:
                began = time.perf_counter()
                try:
                    status = session.post(url, content=body, headers={"content-type": content_type}).status_code
                except httpx.HTTPError:
                    status = 0  # connection error: counted, never hidden
                with lock:
                    statuses[status] += 1
                    if status == 200:
                        latencies.append(1000 * (time.perf_counter() - began))

    began = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    ok = np.asarray(latencies) if latencies else np.asarray([np.nan])
    return {"p50_ms": float(np.percentile(ok, 50)), "p99_ms": float(np.percentile(ok, 99)),
            "rps": len(latencies) / elapsed, "statuses": {str(k): v for k, v in sorted(statuses.items())},
            "errors_5xx": sum(v for k, v in statuses.items() if k >= 500 and k != 503 or k == 0)}


def tiny_bundle(directory: Path) -> Path:
    """A bundle of a tiny model trained for a few steps on a small embedded world (when no demo bundle)."""
    from labelshift.artifacts import read_priors
    from labelshift.bundle import export_bundle
    from labelshift.calibrate import Calibration
    from labelshift.config import load_config
    from labelshift.pipeline import Pipeline
    from labelshift.runners import LocalTrainRunner
    from labelshift.tracking import Tracker

    overrides = [f"output_dir={directory}", f"data.source.root={directory}/world/gta5",
                 f"data.source_val.root={directory}/world/gta5", f"data.target.root={directory}/world/cityscapes",
                 f"data.target_val.root={directory}/world/cityscapes", "data.world.num_source=40",
                 "data.world.num_target_train=16", "data.world.num_target_val=8", "train.source.iterations=20",
                 "prior.bootstrap=0", "tracking.enabled=false"]
    cfg = load_config(PROJECT / "configs" / "demo.yaml", overrides)
    Pipeline(cfg, LocalTrainRunner(directory / "train"), Tracker(), log=lambda m: None).run(("pretrain", "estimate"))
    estimate = directory / "stages" / "estimate"
    export_bundle(directory / "bundle", model_path=directory / "stages" / "pretrain" / "model.safetensors", cfg=cfg,
                  priors=read_priors(estimate), prior_corrected=False, model_stage="pretrain",
                  calibration=Calibration.from_dict(json.loads((estimate / "calibration.json").read_text())))
    return directory / "bundle"


def _image_bytes(bundle_dir: Path) -> tuple[np.ndarray, bytes]:
    """A target-domain image of the bundle's world (else a seeded random one) at the model input size."""
    import cv2

    from labelshift.bundle import load_bundle

    bundle = load_bundle(bundle_dir)
    root = Path(bundle.config.data.target_val.root)
    found = sorted(root.glob("leftImg8bit/val/*/*.png"))
    width, height = bundle.input_size
    image = cv2.cvtColor(cv2.imread(str(found[0])), cv2.COLOR_BGR2RGB) if found else \
        np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return image, cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))[1].tobytes()


def direct_predict_ms(bundle_dir: Path, image: np.ndarray, threads: int, repeats: int = 50) -> float:
    """Median ms of the engine's in-process segmentation of one decoded image (IA on), ``threads`` torch threads
    (as the replicas use)."""
    from labelshift.bundle import load_bundle
    from labelshift.runtime import apply_runtime
    from labelshift.serving import SegmentationEngine, SegmentOptions

    bundle = load_bundle(bundle_dir)
    apply_runtime(threads, bundle.config.runtime.deterministic)
    engine = SegmentationEngine(bundle)
    options = [SegmentOptions("ia")]
    engine.segment([image], options)
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        engine.segment([image], options)
        times.append(1000 * (time.perf_counter() - began))
    return float(np.median(times))


def _deploy(bundle_dir: Path, name: str, **settings) -> None:
    from ray import serve

    sys.path.insert(0, str(PROJECT))
    from serve.app import make_app

    serve.run(make_app({"bundle": str(bundle_dir), "num_cpus": 1, **settings}), name=name, route_prefix=f"/{name}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=None)
    parser.add_argument("--load", action="store_true", help="the bounded load test instead of the benchmark")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=None, help="per measurement (default 10; --load: 20)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, in-process and per replica")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    seconds = args.seconds or (20.0 if args.load else 10.0)
    scratch = tempfile.TemporaryDirectory(prefix="bench-serve-")
    bundle_dir = args.bundle or (DEMO_BUNDLE if (DEMO_BUNDLE / "bundle.json").is_file() else
                                 tiny_bundle(Path(scratch.name)))
    bundle_dir = bundle_dir.resolve()
    image, body = _image_bytes(bundle_dir)
    import httpx
    import ray
    from ray import serve

    result: dict = {"bundle": str(bundle_dir), "image": f"{image.shape[1]}x{image.shape[0]} PNG, {len(body)} bytes",
                    "clients": args.clients, "seconds": seconds, "threads": args.threads}
    if not args.load:
        result["direct_predict_ms"] = direct_predict_ms(bundle_dir, image, args.threads)
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        base = f"http://127.0.0.1:{port}"
        _deploy(bundle_dir, "batched", torch_threads=args.threads, max_batch_size=8, max_ongoing_requests=16, max_queued_requests=32,
                batch_wait_timeout_s=0.005)
        for _ in range(5):  # warm-up
            httpx.post(f"{base}/batched/v1/segment", content=body, headers={"content-type": "image/png"}, timeout=60)
        if args.load:
            result.update(run_load(f"{base}/batched/v1/segment", body, clients=args.clients, seconds=seconds))
        else:
            single = run_load(f"{base}/batched/v1/segment", body, clients=1, seconds=seconds / 2)
            batched = run_load(f"{base}/batched/v1/segment", body, clients=args.clients, seconds=seconds)
            serve.delete("batched")
            _deploy(bundle_dir, "unbatched", torch_threads=args.threads, max_batch_size=1, max_ongoing_requests=16, max_queued_requests=32)
            unbatched = run_load(f"{base}/unbatched/v1/segment", body, clients=args.clients, seconds=seconds)
            result.update({"p50_ms": single["p50_ms"], "p99_ms": single["p99_ms"], "rps": single["rps"],
                           "overhead_ms": single["p50_ms"] - result["direct_predict_ms"],
                           "batched_rps": batched["rps"], "batched_p50_ms": batched["p50_ms"],
                           "unbatched_rps": unbatched["rps"], "unbatched_p50_ms": unbatched["p50_ms"],
                           "errors_5xx": single["errors_5xx"] + batched["errors_5xx"] + unbatched["errors_5xx"],
                           "statuses": {"batched": batched["statuses"], "unbatched": unbatched["statuses"]}})
    finally:
        serve.shutdown()
        ray.shutdown()
        scratch.cleanup()
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
