"""Stage artifact directories with manifests: skip what is complete, never leave half-written output.

A stage writes into ``<stages>/<name>.partial/``; when it finishes, ``manifest.json`` (fingerprint of its
configuration, the commit ids of the upstream outputs it consumed, a commit id of its own, outputs with sizes,
metrics) is written there and the directory is renamed to ``<stages>/<name>/``. A re-run skips a stage whose
manifest is complete, whose fingerprint matches the current configuration, whose recorded inputs are the current
upstream commits (a re-run upstream stage invalidates everything downstream) and whose outputs all exist.

A ``.partial/`` left by a killed run is kept when its recorded work (``PARTIAL_RECORD``: fingerprint and upstream
inputs) is this run's, so a resumable body (the pseudo-label pass) redoes only what is missing; any other partial
is discarded. Bodies write atomically, so a kept partial holds only finished files.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from labelshift.atomic import write_json_atomic

MANIFEST = "manifest.json"
PARTIAL_RECORD = ".partial.json"  # in <name>.partial/: the work it holds (fingerprint and inputs)


def fingerprint(data: Any) -> str:
    """sha256 of canonical JSON."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


class StageDir:
    def __init__(self, stages_root: Path, name: str, stage_fingerprint: str, inputs: dict | None = None) -> None:
        self.name = name
        self.final = stages_root / name
        self.partial = stages_root / f"{name}.partial"
        self.fingerprint = stage_fingerprint
        self.inputs = inputs

    @property
    def run_key(self) -> str:
        """Names this stage's work (configuration and upstream inputs), e.g. its resumable training run."""
        return fingerprint({"fingerprint": self.fingerprint, "inputs": self.inputs})[:12]

    def manifest(self) -> dict | None:
        path = self.final / MANIFEST
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def is_complete(self) -> bool:
        """Complete, same configuration, built from ``self.inputs`` (when known), outputs present."""
        manifest = self.manifest()
        if not manifest or manifest.get("status") != "complete" or manifest.get("fingerprint") != self.fingerprint:
            return False
        if self.inputs is not None and manifest.get("inputs", {}) != self.inputs:  # no record: no-input stages only
            return False
        for rel, size in manifest.get("outputs", {}).items():
            path = self.final / rel
            if not path.exists() or (path.is_file() and path.stat().st_size != size):
                return False
        return True

    def _partial_work(self) -> dict:
        return {"fingerprint": self.fingerprint, "inputs": self.inputs or {}}

    def begin(self) -> Path:
        """The ``.partial`` directory to write outputs into: a killed run's, when it holds this very work
        (same fingerprint and inputs), else a clean one."""
        try:
            kept = json.loads((self.partial / PARTIAL_RECORD).read_text()) == self._partial_work()
        except (OSError, json.JSONDecodeError):
            kept = False
        if not kept:
            shutil.rmtree(self.partial, ignore_errors=True)
            self.partial.mkdir(parents=True)
            write_json_atomic(self.partial / PARTIAL_RECORD, self._partial_work())
        return self.partial

    def path(self, rel: str) -> Path:
        """Where an output lives once the stage is complete."""
        return self.final / rel

    def commit(self, outputs: list[str], metrics: dict, extra: dict | None = None) -> dict:
        """Record the manifest in ``.partial`` and move it into place."""
        manifest = {"stage": self.name, "status": "complete", "fingerprint": self.fingerprint,
                    "commit": uuid.uuid4().hex, "inputs": self.inputs or {},
                    "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "metrics": metrics,
                    "outputs": {rel: _size(self.partial / rel) for rel in outputs}, **(extra or {})}
        write_json_atomic(self.partial / MANIFEST, manifest)
        (self.partial / PARTIAL_RECORD).unlink(missing_ok=True)
        if self.final.exists():
            trash = self.final.with_name(f".{self.name}.old")
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(self.final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(self.partial, self.final)
        return manifest


def _size(path: Path) -> int:
    if not path.exists():
        raise FileNotFoundError(f"stage output {path} was not written")
    return path.stat().st_size if path.is_file() else 0
