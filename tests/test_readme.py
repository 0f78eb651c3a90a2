"""Everything the README tells a user to run is run here.

* The ```python block runs as it is, as a script in a temporary working directory.
* The ```bash commands: each must be one this file knows how to check, so that a new
  command in the README fails until it gets a check here.
  - ``pip install -e ".[dev]"`` is what ``.ci/run`` does before the tests; re-installing
    from inside the test run would change the environment under it, so the test checks
    that ``.ci/run`` runs exactly this installation.
  - ``cncad demo`` takes about a minute with its defaults; it is run through the installed
    console script with the smaller options that ``cncad demo --help`` offers (fewer
    epochs, images and pixels), which exercise every step: data generation, training,
    the metric table, saving and the heatmap panels.
  - ``python -m pytest`` cannot run itself; ``--collect-only`` checks that the whole
    suite imports and is found from the repository root.
* ``mkdocs build --strict``, named in the text, is run by tests/test_docs.py.
* The quickstart on the documentation's home page must be the README's snippet.
* Every relative link and image of the README points to an existing file.
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

from _subprocess import run_checked

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def code_blocks(path: Path, language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(path.read_text()) if lang == language]


def shell_commands(path: Path) -> list[str]:
    commands = []
    for block in code_blocks(path, "bash"):
        for line in block.splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def test_readme_has_the_expected_blocks() -> None:
    assert len(code_blocks(README, "python")) == 1
    assert shell_commands(README) == ['pip install -e ".[dev]"', "cncad demo", "python -m pytest"]


def test_readme_python_snippet_runs(tmp_path: Path) -> None:
    (snippet,) = code_blocks(README, "python")
    # Run as a script, as a user pasting it would; the epilogue only reports on the result.
    epilogue = "\nprint('loaded', type(detector).__name__, detector.epochs_trained)\n"
    script = tmp_path / "readme_snippet.py"
    script.write_text(snippet + epilogue)
    printed = run_checked([sys.executable, str(script)], cwd=tmp_path, timeout=120)
    metrics = ("'I-AUROC'", "'P-AUROC'", "'AUPRO'", "'I-AP'", "'P-AP'", "'I-F1max'", "'P-F1max'")
    assert all(name in printed for name in metrics), printed  # the mean metrics dict
    assert re.search(r"^tensor\(\[\d+\.\d+\]\) torch\.Size\(\[1, 64, 64\]\)$", printed, re.M)
    assert "loaded CNCDetector 5" in printed  # the reloaded detector, trained for 5 epochs
    assert (tmp_path / "model.cnc").is_file()
    assert (tmp_path / "runs" / "last.ckpt").is_file()
    assert sorted(p.name for p in (tmp_path / "cncad_data").iterdir()) == [
        "bolt_like",
        "carpet_like",
    ]


def test_docs_home_quickstart_is_the_readme_snippet() -> None:
    assert code_blocks(ROOT / "docs" / "index.md", "python") == code_blocks(README, "python")
    home_commands = shell_commands(ROOT / "docs" / "index.md")
    assert set(home_commands) <= set(shell_commands(README))


def test_install_command_is_what_ci_runs() -> None:
    assert 'pip install -e ".[dev]"' in shell_commands(README)
    ci = (ROOT / ".ci" / "run").read_text()
    installs = [line for line in ci.splitlines() if re.search(r"\bpip install\b", line)]
    assert any(shlex.split(line)[-2:] == ["-e", ".[dev]"] for line in installs), installs


def _cncad_command() -> list[str]:
    script = Path(sys.executable).with_name("cncad")
    return [str(script)] if script.exists() else [sys.executable, "-m", "cncad"]


def test_cncad_demo_runs_small(tmp_path: Path) -> None:
    assert "cncad demo" in shell_commands(README)
    out = tmp_path / "demo"
    small = ["--epochs", "2", "--train-images", "8", "--image-size", "56", "--data-size", "64"]
    stdout = run_checked(
        [*_cncad_command(), "demo", "--out", str(out), *small, "--heatmaps", "1", "--quiet"],
        cwd=tmp_path,
        timeout=120,
    )
    assert re.search(r"^Mean(\s+[0-9.]+){7}\s+24$", stdout, re.MULTILINE), stdout
    assert (out / "model.cnc").is_file()
    panels = sorted(p.name for p in (out / "heatmaps").glob("*.png"))
    assert len(panels) == 2  # one defective image and one normal image
    assert "training loss: first epoch" in stdout


def test_pytest_command_collects_the_suite() -> None:
    assert "python -m pytest" in shell_commands(README)
    stdout = run_checked([sys.executable, "-m", "pytest", "--collect-only", "-q"], ROOT, 300)
    count = re.search(r"^(\d+) tests? collected", stdout, re.MULTILINE)
    assert count and int(count.group(1)) > 50, stdout[-2000:]
    assert "tests/test_readme.py::test_pytest_command_collects_the_suite" in stdout


def test_readme_links_and_images_exist() -> None:
    text = README.read_text()
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [t for t in targets if not re.match(r"[a-z]+://", t)]
    assert "docs/images/demo_panel.png" in local
    missing = [t for t in local if not (ROOT / t).exists()]
    assert not missing, f"README links to missing files: {missing}"
