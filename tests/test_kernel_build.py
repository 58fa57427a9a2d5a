"""Every install path gets the kernels or says that it did not (mesimp.nn.build, kernels).

An install that did not compile ``mesimp._C`` (pip's build isolation hides torch from
setup.py) compiles the same sources on first use into a per-user cache and loads them from
there afterwards; where that cannot happen, a run on the Python path warns exactly once,
with the command that builds them. The first-use build is tested for real, in a
subprocess that cannot see the installed library (one compile, ~1 min on 2 cores).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mesimp.nn import build, kernels
from mesimp.nn.meprop import MePropConfig
from mesimp.nn.swap import meprop_

# a process that cannot see the installed mesimp._C (find_spec returns None for it), then
# trains two steps of a drop-in model and prints where its kernels came from
RUN = textwrap.dedent(
    """
    import json, sys, warnings
    sys.modules["mesimp._C"] = None
    warnings.simplefilter("always")
    import torch, torch.nn.functional as F
    from torch import nn
    from mesimp.nn import kernels
    from mesimp.nn.meprop import MePropConfig
    from mesimp.nn.swap import meprop_
    m = meprop_(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)),
                MePropConfig(k=4, selection="unified"))
    opt = torch.optim.AdamW(m.parameters())
    with warnings.catch_warnings(record=True) as seen:
        for _ in range(2):
            opt.zero_grad()
            F.cross_entropy(m(torch.randn(5, 8)), torch.tensor([0, 1, 2, 0, 1])).backward()
            opt.step()
    info = kernels.info()
    info["warnings"] = [str(w.message) for w in seen if w.category is RuntimeWarning]
    print(json.dumps(info))
    """
)


def _run(cache: Path, **env: str) -> tuple[dict, str]:
    full = {**os.environ, "MESIMP_CACHE_DIR": str(cache), **env}
    full.pop("MESIMP_KERNELS", None)
    p = subprocess.run(
        [sys.executable, "-c", RUN], env=full, capture_output=True, text=True, check=True
    )
    return json.loads(p.stdout.strip().splitlines()[-1]), p.stderr


@pytest.mark.skipif(build.compiler() is None, reason="no C++ compiler")
def test_a_first_use_build_compiles_once_then_loads_from_the_cache(tmp_path):
    first, log = _run(tmp_path)
    assert first["path"] == "cpp" and first["source"] == "built now", first
    assert "compiling the meProp kernels" in log and first["warnings"] == []
    lib = Path(first["library"])
    assert lib.parent == tmp_path / "kernels" / f"torch-{torch.__version__}-{build.build_key()}"
    assert build.abi_of(lib) == kernels.ABI
    again, log = _run(tmp_path)
    assert (again["source"], again["library"]) == ("cache", first["library"])
    assert "compiling" not in log


def test_no_build_means_one_warning_with_the_command(tmp_path):
    """Nothing installed or cached and first-use builds off: the Python path, and exactly
    one RuntimeWarning over the whole run, naming the command that fixes it."""
    got, _ = _run(tmp_path, MESIMP_BUILD_KERNELS="0")
    assert got["path"] == "python" and not got["loaded"]
    assert len(got["warnings"]) == 1, got["warnings"]
    assert kernels.build_command() in got["warnings"][0]
    assert "MESIMP_BUILD_KERNELS=0" in got["warnings"][0]


def test_one_warning_in_process(monkeypatch):
    """The same in this process (kernels made absent): several layers, steps and models
    warn once; the Python mode (a choice) and float64 tensors (not the kernels' dtype) do
    not warn at all."""
    monkeypatch.setattr(kernels, "_loaded", False)
    monkeypatch.setattr(kernels, "_load_error", "mesimp._C is not built")
    monkeypatch.setattr(kernels, "_warned", False)
    monkeypatch.setattr(kernels, "_mode", "python")

    def train(dtype: torch.dtype) -> None:
        seq = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        m = meprop_(seq, MePropConfig(k=2, selection="unified"))
        m = m.to(dtype)
        for _ in range(3):
            F.cross_entropy(
                m(torch.randn(4, 6, dtype=dtype)), torch.tensor([0, 1, 1, 0])
            ).backward()

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        train(torch.float32)  # mode python: chosen, no warning
        monkeypatch.setattr(kernels, "_mode", "auto")
        train(torch.float64)
        assert seen == []
        train(torch.float32)
        train(torch.float32)
    assert len(seen) == 1 and kernels.build_command() in str(seen[0].message)


def test_the_build_key_follows_the_sources_and_flags(tmp_path, monkeypatch):
    key = build.build_key()
    assert build.build_key() == key and build.build_key(["-DX"]) != key
    fake = tmp_path / "csrc"
    fake.mkdir()
    for name in (*build.SOURCES, *build.HEADERS):
        (fake / name).write_bytes((build.csrc() / name).read_bytes())
    monkeypatch.setattr(build, "csrc", lambda: fake)
    assert build.build_key() == key
    (fake / "select.h").write_text("// changed\n", encoding="utf-8")
    assert build.build_key() != key


def test_the_build_command_without_a_compiler_is_one_line(tmp_path):
    env = {
        **os.environ,
        "CXX": str(tmp_path / "no-such-compiler"),
        "MESIMP_CACHE_DIR": str(tmp_path),
    }
    p = subprocess.run(
        [sys.executable, "-m", "mesimp.nn.build", "--force"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert p.returncode == 1
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "no-such-compiler" in lines[0]


def test_info_env_reports_the_path(tmp_path):
    """``mesimp info --env --json``: versions and the kernels' state, the JSON the README
    documents; the text form names the path."""
    from click.testing import CliRunner
    from mesimp.cli.main import cli

    r = CliRunner().invoke(cli, ["info", "--env", "--json"])
    assert r.exit_code == 0, r.output
    got = json.loads(r.output)
    assert got["torch"] == torch.__version__
    assert got["kernels"]["path"] == kernels.kernel_name()
    assert set(got["kernels"]) >= {"mode", "path", "library", "source", "error", "build_command"}
    text = CliRunner().invoke(cli, ["info", "--env"])
    assert text.exit_code == 0 and f"meProp path: {kernels.kernel_name()}" in text.output
    bad = CliRunner().invoke(cli, ["info"])
    assert bad.exit_code == 2 and "--env" in bad.output
