"""A real kill-and-resume of the standalone labelling pass: the pass runs in a child process, is SIGKILLed while a
chunk is half written, and the same command run again redoes only the incomplete chunks and ends byte-identical to
an uninterrupted run.

The child runs ``runners.data.run_labelling`` with the in-process engine (``InProcessPasses``: the library pass
that ``ray_jobs/soft_labels.py`` runs on Ray Data with the same decode / teacher / write steps and the same record,
resume and manifest logic), so no Ray has to start in the child. Every atomic rename in the child waits a little
(``os.replace`` wrapped): the pass itself is unchanged, only slow enough that the kill lands midway, while a
finished temporary file waits for its rename.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import DEMO_CONFIG, PROJECT, tiny_overrides

pytestmark = pytest.mark.timeout(180)

CHILD = textwrap.dedent("""
    import json, os, sys, time

    overrides, estimate_dir, checkpoint, out, rename_delay = json.loads(sys.argv[1])
    real_replace = os.replace

    def slow_replace(src, dst, *args, **kwargs):
        time.sleep(rename_delay)
        return real_replace(src, dst, *args, **kwargs)

    os.replace = slow_replace

    from labelshift.build import build_split
    from labelshift.config import load_config
    from labelshift.pseudo import pseudo_settings
    from labelshift.runners.data import InProcessPasses, estimate_stage_ia, run_labelling

    cfg = load_config(sys.argv[2], overrides)
    transform, priors_used = estimate_stage_ia(cfg, estimate_dir)
    dataset = build_split(cfg, "target", train=False, with_labels=False)
    run_labelling(InProcessPasses("cpu", None), cfg, checkpoint, dataset, out, pseudo_settings(cfg, transform),
                  priors_used)
""")
CHUNKS = 16  # eval.batch_size=1 over the 16 target-train images
KILL_AFTER = 3  # complete chunks before the kill
OUTPUT_DIRS = ("labels", "confidence", "soft")


def _complete_chunks(out: Path, names: list[str]) -> set[str]:
    """Images (= chunks) whose three output files exist."""
    return {name for name in names
            if all((out / d / f"{name}.{'parquet' if d == 'soft' else 'png'}").is_file() for d in OUTPUT_DIRS)}


def _temporaries(out: Path) -> list[Path]:
    return sorted(out.rglob(".*.tmp"))


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _start(script: Path, request: list, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(PROJECT), "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
           "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.Popen([sys.executable, str(script), json.dumps(request), str(DEMO_CONFIG)], cwd=PROJECT,
                            env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def _kill_midway(child: subprocess.Popen, out: Path, names: list[str], log: Path, timeout: float = 90.0) -> None:
    """SIGKILL ``child`` as soon as :data:`KILL_AFTER` chunks are complete and a later file waits, written, for
    its rename; fails when the pass ends (or the time runs out) first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and child.poll() is None:
        if len(_complete_chunks(out, names)) >= KILL_AFTER and _temporaries(out):
            child.send_signal(signal.SIGKILL)
            child.wait(10)
            return
        time.sleep(0.005)
    child.kill()
    child.wait(10)
    pytest.fail(f"the labelling pass was not caught midway (exit code {child.returncode}, "
                f"{len(_complete_chunks(out, names))} of {len(names)} chunks complete): {log.read_text()[-2000:]}")


def test_a_killed_labelling_pass_resumes_only_missing_chunks_byte_identical(shared_cfg, tiny_trained, tmp_path):
    from labelshift.build import build_split
    from labelshift.pseudo import LABEL_MANIFEST, LABEL_RECORD, pseudo_settings
    from labelshift.runners.data import InProcessPasses, estimate_stage_ia, run_labelling

    overrides = tiny_overrides(tmp_path / "run", world=tiny_trained.world) + [
        "eval.batch_size=1", "pseudo.confidence_threshold=0.07"]
    cfg = shared_cfg("eval.batch_size=1", "pseudo.confidence_threshold=0.07")
    dataset = build_split(cfg, "target", train=False, with_labels=False)
    names = list(dataset.names)
    assert len(names) == CHUNKS

    # the uninterrupted run, in this process
    transform, priors_used = estimate_stage_ia(cfg, tiny_trained.estimate)
    whole = run_labelling(InProcessPasses("cpu", None), cfg, tiny_trained.model, dataset, tmp_path / "whole",
                          pseudo_settings(cfg, transform), priors_used, log=lambda line: None)
    assert whole["chunks_run"] == CHUNKS and whole["failures"] == 0

    script, out = tmp_path / "label_child.py", tmp_path / "killed"
    script.write_text(CHILD)
    request = [overrides, str(tiny_trained.estimate), str(tiny_trained.model), str(out), 0.1]
    _kill_midway(_start(script, request, tmp_path / "first.log"), out, names, tmp_path / "first.log")
    done = _complete_chunks(out, names)
    assert KILL_AFTER <= len(done) < CHUNKS and _temporaries(out)  # killed midway, a written file never renamed
    assert not (out / LABEL_MANIFEST).exists()  # the manifest comes last
    kept = {path: path.stat().st_mtime_ns for name in done for path in out.rglob(f"{name}.*")}

    second = _start(script, request, tmp_path / "second.log")
    assert second.wait(120) == 0, (tmp_path / "second.log").read_text()[-2000:]
    redone = CHUNKS - len(done)
    assert (f"{redone} images labelled in {redone} of {CHUNKS} chunks (resumed: the others were complete); "
            f"0 failure(s)") in (tmp_path / "second.log").read_text()
    assert {path: path.stat().st_mtime_ns for path in kept} == kept  # complete chunks were not rewritten
    assert not _temporaries(out)

    resumed, reference = _tree(out), _tree(tmp_path / "whole")
    assert set(resumed) == set(reference) and len(resumed) == 3 * CHUNKS + 2
    assert {rel: data for rel, data in resumed.items() if rel != LABEL_MANIFEST} == \
        {rel: data for rel, data in reference.items() if rel != LABEL_MANIFEST}  # LABEL_RECORD included
    manifest, reference_manifest = (json.loads((root / LABEL_MANIFEST).read_text()) for root in (out, tmp_path / "whole"))
    assert manifest["counts"]["chunks_run"] == manifest["counts"]["images"] == redone
    assert {k: v for k, v in manifest.items() if k != "counts"} == \
        {k: v for k, v in reference_manifest.items() if k != "counts"}
    assert (out / LABEL_RECORD).read_bytes() == (tmp_path / "whole" / LABEL_RECORD).read_bytes()
