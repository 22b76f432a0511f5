"""Benchmark: soft-label generation on Ray Data against a reference-style loop, same images and model, one run.

* **pipeline**: ``labelshift.runners.data.label_pass`` (decode tasks -> model actor -> write tasks): hard labels
  and confidences at the image resolution, top-k soft labels at the model's output grid (the ``pseudo:``
  defaults). Steady state = images written per second between the 10th-percentile and the last output file's
  modification time (the actor's start-up and the first chunks excluded); start-up is reported separately.
* **pipeline without Ray** (``--no-ray``): the same stages on thread pools (``pseudo.label_split`` with ``threads``:
  ``--decode-threads`` decoding ahead, the same teacher function in the main thread on ``--device``,
  ``--write-threads`` encoding and writing); the same files byte for byte; steady state measured the same way.
* **reference**: the reference code's loop: a DataLoader (PIL decode + resize, ``num_workers=1``), batch 1, fp32,
  logits upsampled to the full image resolution, softmax, argmax, palette PNG saved with PIL; torch's default
  thread count; steady state after the first 5 images.

Both include decoding the 2048x1024 PNGs and writing every output. The model is the demo's small model trained
briefly on the world's source images (its confidences make the kept-mass number meaningful), or ``--checkpoint``. On
``--device cuda`` both loops run the model on the GPU (bf16 + channels_last for the pipeline, ``eval.amp_bf16``;
fp32 for the reference loop, which copies the full-resolution softmax to the host as the reference code does).
``deeplabv2_resnet101`` (random weights: nothing is downloaded) runs the same comparison on ``--r101-images``.

    python -m labelshift.bench.soft_labels [--world /tmp/labelshift_world_2048] [--images 200]
    python -m labelshift.bench.soft_labels --no-ray --device cuda --decode-threads 14 --images 0 --r101-images 200

The world (``labelshift world --size 2048x1024``, 200 target-train images) is generated on the first run and
reused. Ends with one JSON line.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


def _config(world: Path, out: Path, model: str, device: str, extra: Sequence[str] = ()):
    from labelshift.config import load_config

    return load_config(DEMO_CONFIG, [
        f"output_dir={out}", "data.world=null", f"data.source.root={world}/gta5", f"data.source_val.root={world}/gta5",
        f"data.target.root={world}/cityscapes", f"data.target_val.root={world}/cityscapes",
        "data.source_transform.size=[256,128]", "data.target_transform.size=[1024,512]", f"model.name={model}",
        "train.source.iterations=150", "train.source.batch_size=4", "eval.batch_size=4", "ray.data_actors=1",
        "ray.data_cpus_per_actor=2", f"ray.use_gpu={device == 'cuda'}", *extra])


def _ensure_world(world: Path, images: int) -> None:
    from labelshift.data.world import generate_world, read_world_manifest

    if read_world_manifest(world) is None:
        generate_world(world, size=(2048, 1024), num_source=10, num_target_train=images, num_target_val=4)


def _teacher(cfg, out: Path, checkpoint: str | None) -> Path:
    """``checkpoint``, else the small model trained for a few steps on the world's source (cached)."""
    from labelshift.runners import LocalTrainRunner

    if checkpoint:
        return Path(checkpoint)
    path = out / "teacher.safetensors"
    if not path.exists():
        payload = {"stage": "source", "config": cfg.model_dump(mode="json")}
        LocalTrainRunner(out / "train").fit(payload, "source", path)
    return path


class _PilImages(torch.utils.data.Dataset):
    """The reference's dataset: PIL decode, PIL bilinear resize, normalise."""

    def __init__(self, paths: list[Path], size: tuple[int, int], mean, std) -> None:
        self.paths, self.size = paths, size
        self.mean, self.std = np.asarray(mean, np.float32), np.asarray(std, np.float32)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        from PIL import Image

        image = Image.open(self.paths[index]).convert("RGB")
        full = (image.height, image.width)
        pixels = np.asarray(image.resize(self.size, Image.BILINEAR), np.float32) / 255.0
        return torch.from_numpy(((pixels - self.mean) / self.std).transpose(2, 0, 1).copy()), full, index


def reference_loop(model, paths: list[Path], cfg, out: Path, device: torch.device) -> tuple[float, float]:
    """(steady img/s after the first 5 images (a quarter of fewer than 20), end-to-end img/s) of the
    reference-style loop, the model on ``device`` and the full-resolution softmax copied to the host."""
    from PIL import Image

    from labelshift.classes import get_class_set
    from labelshift.models import upsample_logits

    palette = np.zeros((256, 3), np.uint8)
    palette[:19] = np.asarray(get_class_set(cfg.data.class_set).palette, np.uint8)
    loader = torch.utils.data.DataLoader(_PilImages(paths, tuple(cfg.data.target_transform.size), cfg.data.mean,
                                                    cfg.data.std), batch_size=1, num_workers=1)
    out.mkdir(parents=True, exist_ok=True)
    warmup = min(5, len(paths) // 4)
    began = time.perf_counter()
    steady_from = None
    with torch.no_grad():
        for done, (image, full, index) in enumerate(loader):
            if done == warmup:
                steady_from = time.perf_counter()
            logits = model(image.to(device))
            probs = upsample_logits(logits, (int(full[0]), int(full[1]))).softmax(1).cpu()
            label = probs.max(1)[1][0].to(torch.uint8).numpy()
            png = Image.fromarray(label, "P")
            png.putpalette(palette.reshape(-1).tolist())
            buffer = io.BytesIO()
            png.save(buffer, format="PNG")
            (out / f"{int(index)}.png").write_bytes(buffer.getvalue())
    ended = time.perf_counter()
    return (len(paths) - warmup) / (ended - steady_from), len(paths) / (ended - began)


def pipeline_run(cfg, checkpoint: Path, dataset, out: Path, device: torch.device,
                 threads: tuple[int, int] | None) -> dict:
    """The Ray Data pass (``threads`` None) or the thread-pool pass (``threads``: decode, write): its counts,
    steady img/s (from output mtimes), end-to-end img/s, start-up seconds (model building included)."""
    from labelshift.pseudo import pseudo_settings
    from labelshift.runners.data import InProcessPasses, label_pass

    settings = pseudo_settings(cfg)
    began = time.time()
    if threads is None:
        counts = label_pass(cfg, checkpoint, dataset, out, settings)
    else:
        counts = InProcessPasses(device, None, threads).label(cfg, checkpoint, dataset, out, settings)
    ended = time.time()
    times = np.sort([p.stat().st_mtime for p in (out / "labels").glob("*.png")])
    skip = max(1, len(times) // 10)
    steady = (len(times) - 1 - skip) / max(times[-1] - times[skip], 1e-9)
    soft_bytes = [p.stat().st_size for p in (out / "soft").glob("*.parquet")] if settings.soft_dir else [0]
    return {"counts": counts, "steady_img_s": steady, "end_to_end_img_s": len(times) / (ended - began),
            "startup_s": float(times[0] - began), "soft_label_bytes_per_image": float(np.mean(soft_bytes))}


def compare(model_name: str, world: Path, out: Path, images: int, checkpoint: str | None, device: torch.device,
            threads: tuple[int, int] | None) -> dict:
    """Both loops over the first ``images`` target-train images with one model (the pipeline on Ray Data, or
    on thread pools with ``threads``)."""
    from labelshift.build import build_model, build_split, class_set_of

    cfg = _config(world, out / model_name, model_name, device.type)
    teacher = _teacher(cfg, out / model_name, checkpoint) if model_name == "small" else None
    if teacher is None:  # random weights, saved so that the actors load the same model
        from labelshift.models import save_checkpoint

        teacher = out / model_name / "random.safetensors"
        teacher.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(build_model(cfg, fresh=True), teacher,
                        {"model": model_name, "classes": list(class_set_of(cfg).names)})
    dataset = build_split(cfg, "target", train=False, with_labels=False)
    dataset.files, dataset.names = dataset.files[:images], dataset.names[:images]
    for stale in ("pipeline", "reference"):
        shutil.rmtree(out / model_name / stale, ignore_errors=True)
    pipeline = pipeline_run(cfg, teacher, dataset, out / model_name / "pipeline", device, threads)
    model = build_model(cfg, teacher).to(device).eval()
    steady, end_to_end = reference_loop(model, [path for path, _ in dataset.files], cfg, out / model_name / "reference",
                                        device)
    width, height = cfg.data.target_transform.size
    grid = (height // model.output_stride, width // model.output_stride)
    return {"model": model_name, "images": images, "pipeline": pipeline,
            "reference": {"steady_img_s": steady, "end_to_end_img_s": end_to_end},
            "ratio": pipeline["steady_img_s"] / steady, "soft_grid": list(grid),
            "fp32_softmax_bytes_per_image": 19 * grid[0] * grid[1] * 4}


def _report(result: dict) -> None:
    print(f"{result['model']}: pipeline {result['pipeline']['steady_img_s']:.2f} img/s (end to end "
          f"{result['pipeline']['end_to_end_img_s']:.2f}, start-up {result['pipeline']['startup_s']:.1f} s), "
          f"reference {result['reference']['steady_img_s']:.2f} img/s (end to end "
          f"{result['reference']['end_to_end_img_s']:.2f}); ratio {result['ratio']:.2f}; soft labels "
          f"{result['pipeline']['soft_label_bytes_per_image']:.0f} B/image vs fp32 softmax "
          f"{result['fp32_softmax_bytes_per_image']} B; kept mass "
          f"{result['pipeline']['counts']['soft_label_mean_kept_mass']:.4f}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m labelshift.bench.soft_labels", description=__doc__.split("\n")[0])
    parser.add_argument("--world", default="/tmp/labelshift_world_2048", help="2048x1024 world (generated if missing)")
    parser.add_argument("--out", default="outputs/bench_soft_labels")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--r101-images", type=int, default=6, help="images for deeplabv2_resnet101 (0: skip)")
    parser.add_argument("--checkpoint", default=None, help="small-model teacher (default: trained briefly)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda: where both loops run the model")
    parser.add_argument("--no-ray", action="store_true", help="the pipeline on thread pools instead of Ray Data")
    parser.add_argument("--decode-threads", type=int, default=os.cpu_count(), help="--no-ray: decoding threads")
    parser.add_argument("--write-threads", type=int, default=2, help="--no-ray: encoding and writing threads")
    args = parser.parse_args(argv)
    if not args.images and not args.r101_images:
        parser.error("nothing to measure: --images and --r101-images are both 0")
    device = torch.device(args.device)
    threads = (args.decode_threads, args.write_threads) if args.no_ray else None
    world, out = Path(args.world), Path(args.out).resolve()
    _ensure_world(world, max(args.images, args.r101_images))
    load = os.getloadavg()
    with _ray_unless(args.no_ray):
        results = []
        for model_name, images in (("small", args.images), ("deeplabv2_resnet101", args.r101_images)):
            if images:
                results.append(compare(model_name, world, out, images,
                                       args.checkpoint if model_name == "small" else None, device, threads))
                _report(results[-1])
    first, pipeline = results[0], results[0]["pipeline"]
    summary = {"pipeline_img_s": pipeline["steady_img_s"], "reference_img_s": first["reference"]["steady_img_s"],
               "ratio": first["ratio"], "soft_label_bytes_per_image": pipeline["soft_label_bytes_per_image"],
               "fp32_softmax_bytes_per_image": first["fp32_softmax_bytes_per_image"], "images": first["images"],
               "input_size": "1024x512", "device": _device_name(device), "model": first["model"],
               "engine": "threads" if args.no_ray else "ray_data",
               "threads": None if threads is None else {"decode": threads[0], "write": threads[1]},
               "kept_mass": pipeline["counts"]["soft_label_mean_kept_mass"],
               "load_average_before": [round(v, 2) for v in load], "cpu_count": os.cpu_count(),
               "deeplabv2_resnet101": None if len(results) < 2 else {
                   "ratio": results[-1]["ratio"], "images": results[-1]["images"],
                   "pipeline_img_s": results[-1]["pipeline"]["steady_img_s"],
                   "reference_img_s": results[-1]["reference"]["steady_img_s"]}}
    print(json.dumps(summary))
    return 0


@contextlib.contextmanager
def _ray_unless(no_ray: bool):
    """A local Ray instance for the Ray Data pipeline (none with ``--no-ray``)."""
    if no_ray:
        yield
        return
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def _device_name(device: torch.device) -> str:
    """``cpu``, or ``cuda (<GPU name>)``."""
    return f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else device.type


if __name__ == "__main__":
    raise SystemExit(main())
