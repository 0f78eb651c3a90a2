"""The documentation site: it builds without warnings and documents every public name.

The site is built once per test session, with ``mkdocs build --strict`` (the command of
``.ci/run`` and the README), into a temporary folder; the tests then read the HTML.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from html import unescape
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

pytest.importorskip("mkdocs")
pytest.importorskip("mkdocstrings")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    out = tmp_path_factory.mktemp("site")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-6000:]
    assert not re.search(r"^(WARNING|ERROR)\b", log, re.MULTILINE), log[-6000:]
    yield out
    shutil.rmtree(out, ignore_errors=True)


def _public_modules() -> dict[str, ModuleType]:
    import cncad

    names = ["cncad"] + [
        info.name
        for info in pkgutil.walk_packages(cncad.__path__, "cncad.")
        # __main__: importing it runs the command; _name: private helpers
        if not info.name.endswith("__main__") and not info.name.rsplit(".", 1)[-1].startswith("_")
    ]
    return {name: importlib.import_module(name) for name in names}


def _ids(pages: Path) -> set[str]:
    found: set[str] = set()
    for page in pages.rglob("*.html"):
        found |= set(re.findall(r'id="(cncad[\w.]*)"', page.read_text()))
    return found


def test_every_module_has_an_api_page() -> None:
    directives = set()
    for page in (DOCS / "api").glob("*.md"):
        directives |= set(re.findall(r"^::: ([\w.]+)", page.read_text(), re.MULTILINE))
    assert set(_public_modules()) <= directives


def test_every_public_name_is_rendered(site: Path) -> None:
    ids = _ids(site / "api")
    modules = _public_modules()
    missing = []
    for module_name, module in modules.items():
        if module_name not in ids:
            missing.append(module_name)
        for name in getattr(module, "__all__", ()):
            if name == "__version__":
                continue
            obj = getattr(module, name)
            if inspect.isclass(obj) or inspect.isfunction(obj) or hasattr(obj, "__wrapped__"):
                # documented once, where it is defined
                where = {f"{obj.__module__}.{obj.__qualname__}"}
            else:
                # a constant: on the page of any module that exports this very object
                where = {
                    f"{other_name}.{name}"
                    for other_name, other in modules.items()
                    if name in getattr(other, "__all__", ()) and getattr(other, name) is obj
                }
            if not where & ids:
                missing.append(f"{module_name}.{name}")
    assert not missing, f"not in the API reference: {missing}"


def test_top_level_page_lists_every_reexport() -> None:
    import cncad

    page = (DOCS / "api" / "cncad.md").read_text()
    listed = set(re.findall(r"\[`(\w+)`\]\[", page))
    assert set(cncad.__all__) - {"__version__"} == listed


def test_architecture_diagram_links_resolve(site: Path) -> None:
    page = site / "architecture" / "index.html"
    html = page.read_text()
    start = html.index('<div class="cnc-diagram">')
    svg = html[start : html.index("</svg>", start)]
    links = [unescape(h) for h in re.findall(r'<a href="([^"]+)"', svg)]
    assert len(links) >= 20, "every box links to its module and its equation"
    for link in links:
        path, _, anchor = link.partition("#")
        target = (page.parent / path / "index.html").resolve() if path else page
        assert target.is_file(), link
        if anchor:
            assert f'id="{anchor}"' in target.read_text(), link
    modules = {link for link in links if "/api/" in link or link.startswith("../api/")}
    equations = {link for link in links if link.startswith("#eq-")}
    assert len(modules) >= 9 and len(equations) >= 8


def test_compose_page_embeds_the_example(site: Path) -> None:
    html = unescape(re.sub(r"<[^>]+>", "", (site / "compose" / "index.html").read_text()))
    source = (ROOT / "examples" / "compose_rd.py").read_text()
    for line in ("class CNNReverseDistillation(nn.Module):", "def main(argv"):
        assert line in source and line in html


FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
PAGES_WITH_SNIPPETS = ("index.md", "guide.md", "compose.md", "architecture.md")


@pytest.mark.parametrize("page", PAGES_WITH_SNIPPETS)
def test_python_snippets_compile_and_import(page: str) -> None:
    """Snippets that need real data are not run, but they must parse and import."""
    blocks = [body for lang, body in FENCE.findall((DOCS / page).read_text()) if lang == "python"]
    for body in blocks:
        if body.startswith("--8<--"):
            continue  # an included file, run by tests/test_examples.py
        tree = compile(body, page, "exec", flags=ast.PyCF_ONLY_AST)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module.startswith("cncad"):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(module, alias.name), f"{page}: {node.module}.{alias.name}"


@pytest.mark.parametrize(
    "module", ["cncad.files", "cncad.checkpoint", "cncad.training", "cncad.data.sampling"]
)
def test_docstring_examples_run(module: str) -> None:
    import doctest

    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# A line that griffe's Google parser reads as a section or admonition title ("Examples:").
SECTION_TITLE = re.compile(r"^(\s*)(\w[\w -]*):\s*$")


def _docstrings_with_prompts() -> Iterator[tuple[str, str]]:
    for path in sorted((ROOT / "src" / "cncad").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node, clean=True)
                if doc and ">>>" in doc:
                    yield f"{path.relative_to(ROOT)}:{getattr(node, 'name', '<module>')}", doc


def test_docstring_prompts_sit_in_examples_sections() -> None:
    """``>>>`` lines render as code only inside a Google ``Examples:`` section.

    Under any other title (``Example:`` is an admonition to griffe) or in free text they
    are markdown, where ``>>>`` is a nested blockquote and the lines run together.
    """
    found = 0
    for where, doc in _docstrings_with_prompts():
        title = None
        for line in doc.splitlines():
            if match := SECTION_TITLE.match(line):
                title = match.group(2)
            elif line.strip() and not line.startswith(" "):
                title = None  # back at the docstring's own text
            if line.lstrip().startswith(">>>"):
                found += 1
                assert title == "Examples", f"{where}: '>>>' under {title!r}, not 'Examples:'"
    assert found >= 20


def test_api_pages_show_prompts_as_code(site: Path) -> None:
    inside = outside = 0
    for page in sorted((site / "api").rglob("*.html")):
        text = page.read_text()
        assert "<blockquote>" not in text, f"{page}: a docstring line rendered as a quote"
        for block in re.split(r"(<pre\b.*?</pre>)", text, flags=re.DOTALL):
            count = block.count("&gt;&gt;&gt;")
            if block.startswith("<pre"):
                inside += count
            else:
                outside += count
    assert outside == 0 and inside >= 20
