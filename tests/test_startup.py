"""Fast start-up: ``--help``, argument errors and ``import cncad`` leave torch unimported.

Each check runs in a fresh interpreter, since this one has imported torch already. How long
start-up takes is measured in the benchmarks, not asserted here.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from cncad.checkpoint import CHECKPOINT_NAME
from cncad.cli import _CHECKPOINT_NAME

HEAVY = ("torch", "open_clip", "timm")

# Printed by the child: the heavy modules it has imported, one per line.
_REPORT_HEAVY = f"""
import sys
print("heavy:", *[name for name in {HEAVY!r} if name in sys.modules])
"""


def _python(*code: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run the ``code`` blocks, one after the other, in a new interpreter.

    ``env`` is added to the environment, from which ``torchrun``'s variables are removed.
    """
    environment = {**os.environ, **env}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        if name not in env:
            environment.pop(name, None)
    return subprocess.run(
        [sys.executable, "-c", "".join(textwrap.dedent(block) for block in code)],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _heavy_modules(stdout: str) -> list[str]:
    """The module names after ``heavy:`` on the child's last line of stdout."""
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("heavy:"), stdout
    return last.split()[1:]


@pytest.mark.parametrize(
    ("argv", "status"),
    [
        (["--help"], 0),
        (["fit", "--help"], 0),
        (["predict", "--help"], 0),
        (["fit"], 2),  # DATA missing: argparse's usage error
        (["fit", "data", "--epochs", "-1"], 2),
        (["nonsense"], 2),
    ],
)
def test_help_and_argument_errors_import_no_torch(argv: list[str], status: int) -> None:
    done = _python(
        f"""
        from cncad.cli import main
        try:
            main({argv!r})
        except SystemExit as error:
            print("status:", error.code)
        """,
        _REPORT_HEAVY,
    )
    assert done.returncode == 0, done.stderr
    assert f"status: {status}" in done.stdout
    assert _heavy_modules(done.stdout) == []


def test_import_cncad_is_lazy_until_a_name_is_used() -> None:
    done = _python(
        """
        import sys
        import cncad
        print("version:", cncad.__version__)
        print("before:", "torch" in sys.modules)
        from cncad import CNCDetector
        print("after:", "torch" in sys.modules, CNCDetector.__module__)
        """
    )
    assert done.returncode == 0, done.stderr
    assert "before: False" in done.stdout
    assert "after: True cncad.detector" in done.stdout


def test_lazy_names_are_cached_and_listed() -> None:
    import cncad

    for name in cncad.__all__:
        assert name in dir(cncad)
        value = getattr(cncad, name)
        assert vars(cncad)[name] is value  # the next look-up skips __getattr__
    with pytest.raises(AttributeError, match="no attribute 'nonsense'"):
        _ = cncad.nonsense


def test_moved_names_still_warn() -> None:
    with pytest.warns(DeprecationWarning, match="import it from cncad.metrics"):
        from cncad import image_auroc  # noqa: F401


@pytest.mark.parametrize(("rank", "is_main"), [("0", True), ("1", False), (None, True)])
def test_rank_is_read_from_the_environment_without_torch(rank: str | None, is_main: bool) -> None:
    env = {"RANK": rank} if rank is not None else {}
    done = _python(
        """
        from cncad.cli import _is_main_process
        print("main:", _is_main_process())
        """,
        _REPORT_HEAVY,
        **env,
    )
    assert done.returncode == 0, done.stderr
    assert f"main: {is_main}" in done.stdout
    assert _heavy_modules(done.stdout) == []


def test_checkpoint_name_copy_matches_the_file_format() -> None:
    assert _CHECKPOINT_NAME == CHECKPOINT_NAME


def test_python_m_cncad_help_exits_0() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "cncad", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "usage: cncad" in done.stdout
