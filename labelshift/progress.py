"""What a person watching a job sees while a training stage runs, in the job's driver process.

A training runner turns rank 0's reports (``{"step", "loss", "lr"}``, every ``log_every`` steps) into a
:class:`StepProgress`: a progress bar of steps with the latest loss on a terminal (:class:`StepBar`, tqdm), a
few milestone lines (:class:`StepMilestones`, every quarter of the run) where there is no terminal (e.g. under
``ray job submit``, whose logs are a file), or nothing. Reports made in another process (a Ray Train
controller) reach the driver through a :class:`ProgressFile` that the driver polls.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Literal, Protocol, TextIO

from labelshift.atomic import write_json_atomic

ProgressMode = Literal["bars", "lines", "off"]
PROGRESS_MODES: tuple[str, ...] = ("bars", "lines", "off")
MILESTONES = 4  # StepMilestones prints a line at every quarter of a run


class StepProgress(Protocol):
    """The progress of one training run, fed with rank 0's reports as they arrive."""

    def update(self, report: dict) -> None:
        """``report``: ``{"step": int, "loss": float, ...}`` (a final checkpoint reported again after a resume
        has no loss)."""

    def close(self) -> None: ...


ProgressFactory = Callable[[str, int], StepProgress]  # (what is trained, total steps) -> its progress display


class NoProgress:
    def update(self, report: dict) -> None: ...

    def close(self) -> None: ...


class StepBar:
    """A tqdm bar of steps with the latest loss (left on screen when the run ends: one line per training run)."""

    def __init__(self, description: str, total_steps: int, stream: TextIO | None = None) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total_steps, desc=description, unit="step", file=stream, leave=True,
                        dynamic_ncols=True)

    def update(self, report: dict) -> None:
        step = int(report["step"])
        if "loss" in report:
            self.bar.set_postfix(loss=f"{float(report['loss']):.4f}", refresh=False)
        self.bar.update(step - self.bar.n)

    def close(self) -> None:
        self.bar.close()


class StepMilestones:
    """One line when the run passes each quarter of its steps (the first report at or past it), e.g.
    ``  source training: step 150/600 (25%), loss 0.5120``; a resumed run starts at the quarter it resumed in."""

    def __init__(self, description: str, total_steps: int, log: Callable[[str], None]) -> None:
        self.description = description
        self.total_steps = total_steps
        self.log = log
        self.quarters_logged = 0

    def update(self, report: dict) -> None:
        step = int(report["step"])
        quarter = min(MILESTONES, step * MILESTONES // max(self.total_steps, 1))
        if quarter <= self.quarters_logged:
            return
        self.quarters_logged = quarter
        loss = f", loss {float(report['loss']):.4f}" if "loss" in report else ""
        self.log(f"  {self.description}: step {step}/{self.total_steps} "
                 f"({100 * step // max(self.total_steps, 1)}%){loss}")

    def close(self) -> None: ...


def step_progress(mode: ProgressMode, *, stream: TextIO | None = None,
                  log: Callable[[str], None] = print) -> ProgressFactory:
    """The progress display of every training run of a job: bars on ``stream`` (default stderr), milestone
    lines through ``log``, or nothing."""
    if mode not in PROGRESS_MODES:
        raise ValueError(f"unknown progress mode {mode!r}; expected one of {PROGRESS_MODES}")
    if mode == "bars":
        return lambda description, total_steps: StepBar(description, total_steps, stream)
    if mode == "lines":
        return lambda description, total_steps: StepMilestones(description, total_steps, log)
    return lambda description, total_steps: NoProgress()


class ProgressFile:
    """Rank 0's latest report, written (atomically) by the process that receives reports and read by the
    driver. The file is small and rewritten at every report; a missing file reads as no report yet. Its
    directory belongs to the reader: once the reader has removed it (the run is over), writes are dropped."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def write(self, report: dict) -> None:
        if self.path.parent.is_dir():
            write_json_atomic(self.path, {key: report[key] for key in ("step", "loss") if key in report},
                              indent=None)

    def read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None


def training_description(payload: dict) -> tuple[str, int]:
    """What a training payload trains (``"refine training"``) and its total number of steps."""
    stage = payload["stage"]
    return f"{stage} training", int(payload["config"]["train"][stage]["iterations"])
