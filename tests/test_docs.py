"""The documentation: every ```python block in docs/*.md and README.md runs
(each in its own interpreter, with a timeout), and docs/gen_api.py renders the
API reference. Blocks fenced as ```python no-run are shown, not run (kept for
signatures and for code that blocks forever, such as reactor.run())."""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import List, Tuple

import pytest

import netpoll

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md")) + [ROOT / "README.md"]
FENCE = re.compile(r"^```python([^\n]*)\n(.*?)^```", re.M | re.S)
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(
    p for p in (str(Path(netpoll.__file__).resolve().parent.parent),
                os.environ.get("PYTHONPATH")) if p))


def _blocks() -> List[Tuple[str, str]]:
    out = []
    for page in PAGES:
        if not page.exists():
            continue
        text = page.read_text()
        for m in FENCE.finditer(text):
            if "no-run" in m.group(1):
                continue
            line = text.count("\n", 0, m.start()) + 1
            out.append((f"{page.relative_to(ROOT)}:{line}", m.group(2)))
    return out


BLOCKS = _blocks()


def test_docs_exist() -> None:
    names = {p.name for p in DOCS.glob("*.md")}
    assert {"index.md", "getting-started.md", "api.md", "design.md",
            "comparison.md"} <= names, names
    assert len(BLOCKS) >= 10


@pytest.mark.parametrize("where,code", BLOCKS, ids=[w for w, _ in BLOCKS])
def test_code_sample_runs(where: str, code: str, tmp_path: Path) -> None:
    # A sample that makes test certificates with trustme needs it installed
    # (it has no wheels for free-threaded CPython yet); nothing else may be missing.
    if "import trustme" in code and importlib.util.find_spec("trustme") is None:
        pytest.skip(f"{where} needs trustme")
    script = tmp_path / "sample.py"
    script.write_text(code)
    try:
        r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=ENV,
                           capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{where}: still running after {e.timeout} s")
    assert r.returncode == 0, (f"{where} failed:\n{code}\n--- stdout\n{r.stdout}\n"
                              f"--- stderr\n{r.stderr}")


def _gen_api():
    spec = importlib.util.spec_from_file_location("gen_api", DOCS / "gen_api.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_api_reference_generates_and_covers_all_names() -> None:
    text = _gen_api().render()
    committed = (DOCS / "api.md").read_text()
    for name in netpoll.__all__:
        assert f"`{name}" in text, name
        assert f"`{name}" in committed, f"docs/api.md lacks {name}: run python docs/gen_api.py"
    # .ci/lint runs `python docs/gen_api.py --check` for an exact comparison.


def test_markdown_links_resolve() -> None:
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target:
                continue
            assert (page.parent / target).exists(), f"{page.name}: broken link {target}"
