"""The Ray instance an entry point runs on: the configured or submitted cluster, else a fresh local one."""
from __future__ import annotations

import contextlib
import os
from typing import Iterator


@contextlib.contextmanager
def ray_session(address: str | None) -> Iterator[None]:
    """Join ``address`` (a config's ``ray.address``), else the cluster ``RAY_ADDRESS`` names (inside ``ray job
    submit``), else start a fresh local instance ("local": never whatever cluster /tmp/ray last recorded).
    An instance already up in this process is used as it is; one started here is shut down on exit."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address or os.environ.get("RAY_ADDRESS") or "local")
    try:
        yield
    finally:
        if started_here:
            ray.shutdown()
