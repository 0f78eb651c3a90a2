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


#: Python source that makes importing torch, open_clip, timm or torchvision fail.
_BLOCK_TORCH = """
import importlib.abc, sys

class _NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "open_clip", "timm", "torchvision"):
            raise ImportError(f"{name} is blocked in this test")
        return None

sys.meta_path.insert(0, _NoTorch())
"""


def run_without_torch(script: str, timeout: float = 120) -> str:
    """Run ``script`` in a child process where importing torch fails; return its last line.

    The child finds cncad in this checkout's ``src``; it must exit with 0.
    """
    import sys

    src = Path(__file__).resolve().parents[1] / "src"
    done = subprocess.run(
        [sys.executable, "-c", _BLOCK_TORCH + script],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(src)},
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]
