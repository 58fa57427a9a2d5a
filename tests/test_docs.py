"""The documentation is tested: the site builds with ``--strict`` (a broken link, a missing
anchor or a reference mkdocstrings/mkdocs-click cannot resolve fails it), the code of
"Getting started" and "Your own model" runs as written, and the README stays short and
says each fact in one place."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import run_main

from mesimp.data import load_idx

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
FMNIST = Path("/usr/share/datasets/fashion-mnist")

_FENCE = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```[ \t]*$", re.M | re.S)
_SNIPPET = re.compile(r'^--8<-- "([^":]+):([\w-]+)"[ \t]*$', re.M)


def _section(path: Path, name: str) -> str:
    """A pymdownx.snippets section (``--8<-- [start:NAME]`` ... ``[end:NAME]``) of a file."""
    text = path.read_text()
    start, end = rf"--8<-- \[start:{name}\][^\n]*\n", rf"^[^\n]*--8<-- \[end:{name}\]"
    m = re.search(start + "(.*?)" + end, text, re.M | re.S)
    assert m, f"{path.name} has no snippet section {name!r}"
    return m.group(1)


def page_text(name: str) -> str:
    """A docs page as the site renders it: snippet sections expanded."""
    text = (DOCS / name).read_text()
    return _SNIPPET.sub(lambda m: _section(ROOT / m.group(1), m.group(2)), text)


def code_blocks(text: str, lang: str) -> list[tuple[str | None, str]]:
    """The top-level fenced blocks of one language: (title or None, code)."""
    out = []
    for m in _FENCE.finditer(text):
        if m.group(1) == lang:
            title = re.search(r'title="([^"]+)"', m.group(2))
            out.append((title.group(1) if title else None, m.group(3)))
    return out


def source_pages() -> list[Path]:
    """README.md and the docs pages written here (not the links to other files: the
    front page is the README, the changelog and benchmark write-ups live elsewhere)."""
    pages = [ROOT / "README.md"]
    pages += [p for p in sorted(DOCS.rglob("*.md")) if not p.is_symlink()]
    return pages


def test_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


@pytest.mark.parametrize("fact", ["s7", "weights_only", "--nproc", "--reference"])
def test_each_fact_lives_on_one_page(fact):
    """Move, don't duplicate: a few facts of the old 1,884-line README, each on one page."""
    where = [p.relative_to(ROOT).as_posix() for p in source_pages() if fact in p.read_text()]
    assert len(where) == 1, f"{fact!r} is on {where}"


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)


@pytest.fixture(scope="module", autouse=True)
def site_build(tmp_path_factory):
    """``mkdocs build --strict``, started when this module starts and checked by the last
    test: it runs in its own process beside the code blocks' tests (two cores)."""
    site = tmp_path_factory.mktemp("site")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**_env(), "NO_MKDOCS_2_WARNING": "1"},
    )
    yield proc, site
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


def _write_idx(path: Path, array: np.ndarray) -> None:
    """An uncompressed IDX file of uint8 data (the format ``mesimp.data`` reads)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


@pytest.fixture(scope="module")
def small_fmnist(tmp_path_factory) -> Path:
    """An IDX directory of real Fashion-MNIST, small: the first 5,500 training images (the
    default dev split takes 5,000 of them, so 500 train) and 500 test images."""
    d = tmp_path_factory.mktemp("fmnist")
    for stem, n in (("train", 5500), ("t10k", 500)):
        for kind in ("images-idx3", "labels-idx1"):
            src = FMNIST / f"{stem}-{kind}-ubyte.gz"
            if not src.is_file():
                pytest.skip(f"real Fashion-MNIST not found under {FMNIST}")
            _write_idx(d / f"{stem}-{kind}-ubyte", load_idx(src)[:n])
    return d


def test_getting_started_commands_run(small_fmnist, tmp_path, monkeypatch, capsys):
    """Every ``mesimp`` line of "Getting started" (the README's quickstart) runs as written,
    in order, on a small real Fashion-MNIST: its default search finds it through
    $MESIMP_DATA, and the one explicit data path points there too."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MESIMP_DATA", str(small_fmnist))
    text = page_text("getting-started.md")
    lines = [
        line.split("#")[0].strip()
        for _, code in code_blocks(text, "bash")
        for line in code.replace("\\\n", " ").splitlines()
        if line.startswith("mesimp ")
    ]
    assert len(lines) >= 8, lines
    for line in lines:
        args = line.replace(str(FMNIST), str(small_fmnist)).split()[1:]
        code, out, err = run_main(capsys, *args)
        assert code == 0, f"{line}\n{err[-2000:]}"
    models = tmp_path / "models"
    for name in ("mesimp.small.pt", "mesimp.widths.png", "k20.onnx", "mesimp.ft.int8.onnx"):
        assert (models / name).is_file(), name


def _run_page_python(page: str, tmp_path: Path, monkeypatch) -> dict:
    """Run a page's Python blocks as a reader would: blocks with a ``title`` are files
    (written under tmp_path, which is on sys.path), the others one script, in order."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    script = []
    for title, code in code_blocks(page_text(page), "python"):
        if title:
            (tmp_path / title).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / title).write_text(code)
        else:
            script.append(code)
    assert script, f"{page} has no Python to run"
    namespace: dict = {"__name__": "__main__"}
    before = set(sys.modules)
    try:
        exec(compile("\n".join(script), page, "exec"), namespace)  # noqa: S102
    finally:
        for name in set(sys.modules) - before:
            if name.split(".")[0] in {"mypkg"}:
                del sys.modules[name]
    return namespace


def test_getting_started_python_runs(tmp_path, monkeypatch):
    ns = _run_page_python("getting-started.md", tmp_path, monkeypatch)
    grad = ns["model"][0].weight.grad
    # meProp: the hidden layer's weight gradient is zero outside k=20 rows
    assert int((grad.abs().sum(dim=1) > 0).sum()) == 20


def test_your_model_page_runs(tmp_path, monkeypatch):
    ns = _run_page_python("your-model.md", tmp_path, monkeypatch)
    small, model = ns["small"], ns["model"]
    assert (tmp_path / "small.onnx").is_file() and (tmp_path / "small.pt").is_file()
    # meSimp removed units, and the small model is a plain PyTorch module
    n_small = sum(p.numel() for p in small.parameters())
    assert n_small < sum(p.numel() for p in ns["MyNet"]().parameters())
    assert all(type(m).__module__.startswith("torch.nn") for m in small.body)
    assert isinstance(model, torch.nn.Module)


def test_every_benchmark_write_up_is_in_the_site():
    """The write-ups stay beside their scripts in benchmarks/; the site shows each through
    a link in docs/benchmarks/ (and its nav in mkdocs.yml)."""
    nav = (ROOT / "mkdocs.yml").read_text()
    for md in sorted((ROOT / "benchmarks").glob("*.md")):
        link = DOCS / "benchmarks" / md.name
        hint = f"ln -s ../../benchmarks/{md.name} docs/benchmarks/ and add it to mkdocs.yml's nav"
        assert link.is_symlink() and link.resolve() == md.resolve(), hint
        assert f"benchmarks/{md.name}" in nav, hint


def test_site_builds_strict(site_build):
    proc, site = site_build
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert "WARNING" not in stderr, stderr[-3000:]
    # the generated references are there, not just the pages around them
    cli = (site / "cli" / "index.html").read_text()
    assert "--nproc" in cli and "--int8-mode" in cli and "mesimp shrink" in cli
    # click's unwrapped paragraphs (the examples) stay code, as --help prints them
    assert "<code>Examples:" in cli and "<code>Typical pipeline:" in cli
    api = (site / "api" / "index.html").read_text()
    for name in ("mesimp.Simplifier", "mesimp.meprop_", "mesimp.shrink", "mesimp.export_onnx"):
        assert f'id="{name}"' in api, name
    assert (site / "benchmarks" / "RESULTS" / "index.html").is_file()
