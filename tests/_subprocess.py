"""Running the examples and README commands as a user would: in a child process.

``OMP_NUM_THREADS=1``: on a busy 2-core machine torch's OpenMP workers otherwise wait on
each other and an example that takes 20 s alone took over a minute. ``MPLBACKEND=Agg``
keeps matplotlib off any display.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path


def run_checked(command: Sequence[str], cwd: Path, timeout: float) -> str:
    """Run ``command``, assert that it exits with 0, and return its stdout."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env.setdefault("MPLBACKEND", "Agg")
    start = time.perf_counter()
    done = subprocess.run(
        list(command),
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    elapsed = time.perf_counter() - start
    assert done.returncode == 0, (
        f"{' '.join(command)} failed after {elapsed:.1f} s:\n"
        f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    )
    return done.stdout
