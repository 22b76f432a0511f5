"""The README works as written: its shell blocks marked ``<!-- runnable -->`` run, in order, in one bash, from a
copy of the repository, on a copy of the shared tiny world (the README's documented ``$ARGS`` override gives
its knobs and a few training steps). ``make demo`` is replaced by the tiny job run here beforehand (the suite
must not call itself, and ``make demo`` / ``make test`` are never runnable blocks). The shared tiny *model*
cannot be reused: the configs keep their worlds under their own output directories (the sweep's differs from
the demo's), and a stage's fingerprint includes the data roots, so a model trained on the shared world's
paths does not count as the demo's.

The blocks start a Ray head on the README's fixed ports and a Serve app on 127.0.0.1:8000, so they run in
private network, PID and mount namespaces (``unshare``): nothing they start can meet another process on this
machine (or a Ray session under /tmp/ray), and everything they start ends with them.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

mlflow = pytest.importorskip("mlflow")

from conftest import PROJECT, tiny_overrides  # noqa: E402

README = PROJECT / "README.md"
RUNNABLE = re.compile(r"<!-- runnable -->\s*\n```bash\n(.*?)\n```", re.DOTALL)
NEVER_RUNNABLE = re.compile(r"^\s*make (demo|test)\b", re.MULTILINE)
# what the README test's $ARGS adds to the tiny world: a 4-setting IA grid instead of 126 (runtime)
SWEEP_GRID = 'sweep.ia.parameters={"adjust.temperature":{"values":[0.75,1.0]},"prior.method":{"values":[em,bbse]}}'
NAMESPACES = ["unshare", "--net", "--pid", "--fork", "--mount-proc"]
AS_USER = ["--user", "--map-root-user"]  # unprivileged; root may create the namespaces without a user namespace


def runnable_blocks(text: str) -> list[str]:
    return RUNNABLE.findall(text)


def _checkout(root: Path) -> Path:
    """The repository's files (tracked, and untracked but not ignored) copied under ``root``, with ``.venv``
    linked (it counts as installed: ``make`` must not reinstall it)."""
    listed = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=PROJECT, check=True,
                            capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = PROJECT / name
        if source.is_file() and not name.startswith("tests/"):
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, root / name)
    (root / ".venv").symlink_to(PROJECT / ".venv")
    stamp = (PROJECT / ".venv" / ".installed").stat().st_mtime
    os.utime(root / "pyproject.toml", (stamp - 1, stamp - 1))
    return root


def _tiny_args(tiny_world: Path) -> list[str]:
    """$ARGS: the tiny world's knobs and training sizes. Not its place, nor where outputs go: each config keeps
    its own world (the sweep's differs from the demo's) and the README's commands say where outputs go."""
    return [o for o in tiny_overrides(tiny_world.parent, world=tiny_world)
            if not o.startswith(("output_dir=", "tracking.")) and ".root=" not in o] + [SWEEP_GRID]


def _prepare(checkout: Path, tiny_world: Path, args: list[str]) -> None:
    """What ``make demo`` leaves behind, on the tiny world: outputs/demo (a copy of the shared world at its
    place, every stage done, logged to ./mlflow.db); and the sweep's upstream stages (on its own world)."""
    from labelshift.config import load_config
    from labelshift.pipeline import Pipeline
    from labelshift.runners import LocalTrainRunner
    from labelshift.tracking import MlflowTracker, Tracker

    demo = checkout / "outputs" / "demo"
    shutil.copytree(tiny_world, demo / "world")
    cfg = load_config(checkout / "configs" / "demo.yaml", args)
    tracker = MlflowTracker(f"sqlite:///{checkout}/mlflow.db", cfg.tracking.experiment)
    with tracker.job(cfg):
        Pipeline(cfg, LocalTrainRunner(demo / "ray"), tracker, log=lambda m: None).run()
    sweep_cfg = load_config(checkout / "configs" / "sweep_ia.yaml", args)
    Pipeline(sweep_cfg, LocalTrainRunner(checkout / sweep_cfg.output_dir / "ray"), Tracker(),
             log=lambda m: None).run(("pretrain", "estimate"))


def _script(blocks: list[str]) -> str:
    """One bash running the blocks in order (``set -e``: the first failing command stops it, its block named)."""
    lines = ["set -euo pipefail", "ip link set lo up", "mount -t tmpfs tmpfs /tmp/ray"]
    for number, block in enumerate(blocks, 1):
        lines += [f"echo \"==== README runnable block {number} $(date +%T)\" >&2", block]
    return "\n".join(lines + ["echo '==== README blocks done' >&2"]) + "\n"


def test_the_readme_marks_its_blocks_and_never_runs_the_suite_or_the_demo():
    blocks = runnable_blocks(README.read_text())
    assert len(blocks) >= 4
    assert not any(NEVER_RUNNABLE.search(block) for block in blocks)
    text = "\n".join(blocks)
    for command in ("ray start --head", "ray job submit", "ray_jobs/sweep.py", "make serve", "curl ",
                    "labelshift compare"):
        assert command in text, f"no runnable README block runs {command!r}"


def test_the_readme_links_to_files_that_exist():
    text = README.read_text()
    targets = {link.split("#")[0] for link in re.findall(r"\]\(([^)\s]+)\)", text) if "://" not in link}
    assert {"docs/reference.md", "docs/results.md", "docs/fidelity.md"} <= targets
    assert all((PROJECT / target).exists() for target in targets if target), sorted(targets)


def _namespaces() -> list[str] | None:
    """The unshare command line that works here (private network, PID and mount namespaces), or None."""
    if shutil.which("unshare") is None:
        return None
    for command in (NAMESPACES[:1] + AS_USER + NAMESPACES[1:], NAMESPACES):
        if subprocess.run(command + ["true"], capture_output=True).returncode == 0:
            return command
    return None


def test_the_readmes_runnable_blocks_work_on_the_tiny_world(tiny_world, tmp_path, monkeypatch):
    namespaces = _namespaces()
    if namespaces is None:
        if os.environ.get("CI") == "true":
            pytest.fail("unshare (util-linux) cannot create network/PID/mount namespaces here")
        pytest.skip("unshare cannot create network/PID/mount namespaces here (the blocks use fixed ports)")
    checkout = _checkout(tmp_path / "labelshift")
    monkeypatch.chdir(checkout)  # the README's relative paths (outputs/demo/world, ...) resolve here
    args = _tiny_args(tiny_world)
    _prepare(checkout, tiny_world, args)
    blocks = runnable_blocks(README.read_text())
    home = tmp_path / "home"
    home.mkdir()
    assert not any(" " in a for a in args)  # $ARGS is split on spaces by the shell
    env = {**os.environ, "HOME": str(home), "ARGS": " ".join(args),
           "MLFLOW_DISABLE_TELEMETRY": "true", "RAY_USAGE_STATS_ENABLED": "0", "PATH": os.environ["PATH"]}
    for name in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "VIRTUAL_ENV", "LABELSHIFT_SERVE_TOKEN"):
        env.pop(name, None)
    run = subprocess.run(namespaces + ["bash", "-c", _script(blocks)], cwd=checkout, env=env, capture_output=True,
                         text=True, timeout=600)
    log = run.stdout + run.stderr
    (tmp_path / "readme_blocks.log").write_text(log)
    assert run.returncode == 0, log[-6000:]
    _check_outputs(checkout, log)


def _check_outputs(checkout: Path, log: str) -> None:
    """What the blocks leave behind: the cluster job's results table, the sweep's choice, the served mask,
    the comparison."""
    import numpy as np
    from PIL import Image

    assert "| source-only (adapted model) |" in log and "Job 'raysubmit_" in log and "succeeded" in log
    # the cluster job found make demo's stages complete (absolute paths: it runs from Ray's copy of the code)
    assert "[refine] complete (manifest valid): skipped" in log and "[refine] running" not in log
    best = checkout / "outputs" / "sweep_ia" / "sweeps" / "ia" / "best_overrides.yaml"
    assert best.is_file() and "adjust.temperature" in best.read_text()
    street = np.array(Image.open(checkout / "street.png"))
    mask = Image.open(checkout / "mask.png")
    assert mask.mode == "P" and mask.size == (street.shape[1], street.shape[0])
    assert int(np.array(mask).max()) < 19
    assert Image.open(checkout / "overlay.png").size == mask.size
    shares = json.loads((checkout / "segment.json").read_text())["class_shares"]
    assert sum(shares.values()) == pytest.approx(1.0, abs=1e-3)
    summary = json.loads((checkout / "outputs" / "demo" / "summary.json").read_text())
    miou = next(row["target_val_miou"] for row in summary["rows"] if row["row"] == "source_only")
    assert f"| evaluate_adapted | none | {miou:.2f}" in log  # labelshift compare's table, from the MLflow runs
    assert (checkout / "outputs" / "compare.png").read_bytes()[:4] == b"\x89PNG"
