"""A job's console and its log file.

The console shows what a person watches: one line per stage, progress, the results table, errors. Everything
else the process prints goes to the job log: Ray's banners and the worker output it forwards to the driver (the
Ray Train controller's INFO lines included), MLflow's and alembic's messages, Python warnings, and the C-level
output of Ray's core and of child processes. :func:`job_console` redirects file descriptors 1 and 2 (so C-level
writes and child processes follow) and ``sys.stdout``/``sys.stderr`` to the log for the duration of a block,
and yields a :class:`Console` that writes where stdout and stderr pointed before. Console lines are written to the
log too, so the log alone tells the whole story.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import sys
import traceback
from pathlib import Path
from typing import Iterator, TextIO


class Console:
    """Lines for the person watching (``out``), errors and progress bars (``err``); both copied to ``log``."""

    def __init__(self, out: TextIO, err: TextIO, log: TextIO, log_path: Path) -> None:
        self.out = out
        self.err = err
        self.log = log
        self.log_path = log_path

    @property
    def is_terminal(self) -> bool:
        """Whether ``err`` is a terminal that can draw progress bars: one that redraws in place (not a file or a
        pipe) and reports a width (a pseudo-terminal without a size, e.g. ``script`` run without a terminal,
        draws tqdm bars as empty lines)."""
        try:
            return self.err.isatty() and os.get_terminal_size(self.err.fileno()).columns > 0
        except (AttributeError, OSError, ValueError):
            return False

    def line(self, text: str) -> None:
        """One line on the console's stdout, and in the log."""
        print(text, file=self.out, flush=True)
        print(text, file=self.log, flush=True)

    def error(self, text: str) -> None:
        """One line (or more) on the console's stderr, and in the log."""
        print(text, file=self.err, flush=True)
        print(text, file=self.log, flush=True)

    def log_traceback(self) -> None:
        """The exception being handled, with its traceback, in the log only."""
        traceback.print_exc(file=self.log)
        self.log.flush()


def _console_stream(stream: TextIO, fd: int) -> tuple[TextIO, bool]:
    """Where ``stream`` (``sys.stdout`` on fd 1 or ``sys.stderr`` on fd 2) writes, kept usable after ``fd`` is
    redirected: a new stream on a duplicate of ``fd`` when ``stream`` writes to it (returned with True: the caller
    closes it), else ``stream`` itself (e.g. a test's capture object, which does not write to ``fd``)."""
    try:
        writes_to_fd = stream.fileno() == fd
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation: a stream without a descriptor
        writes_to_fd = False
    if not writes_to_fd:
        return stream, False
    return open(os.dup(fd), "w", buffering=1, encoding=stream.encoding or "utf-8", errors="replace"), True


@contextlib.contextmanager
def job_console(log_path: str | Path) -> Iterator[Console]:
    """Append everything this process (and its children) prints to ``log_path`` while the block runs; yield the
    :class:`Console` that still reaches the original stdout and stderr. Restored on exit, also on an error."""
    log_path = Path(log_path).resolve()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "a", buffering=1, encoding="utf-8", errors="replace")
    log.write(f"==== {datetime.datetime.now().isoformat(timespec='seconds')} pid {os.getpid()}: "
              f"{' '.join(sys.argv)}\n")
    original = {1: sys.stdout, 2: sys.stderr}
    for stream in original.values():
        stream.flush()
    (out, close_out), (err, close_err) = _console_stream(sys.stdout, 1), _console_stream(sys.stderr, 2)
    saved = {fd: os.dup(fd) for fd in original}
    try:
        for fd in original:
            os.dup2(log.fileno(), fd)
        sys.stdout = sys.stderr = log
        yield Console(out, err, log, log_path)
    finally:
        log.flush()
        sys.stdout, sys.stderr = original[1], original[2]
        for fd, duplicate in saved.items():
            os.dup2(duplicate, fd)
            os.close(duplicate)
        for stream, ours in ((out, close_out), (err, close_err)):
            stream.flush()
            if ours:
                stream.close()
        log.close()
