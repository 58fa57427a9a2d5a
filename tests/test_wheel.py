"""The package as a user gets it: ``python -m build`` makes an sdist and a wheel that
``twine check`` passes, and the wheel, installed into a fresh virtual environment, runs
the ``mesimp`` command: ``--help`` and a tiny train → shrink → export.

The fresh environment takes its dependencies (torch, onnxruntime, ...) from this one
through a ``.pth`` path line instead of downloading them again: a path line adds that
directory to ``sys.path`` after the environment's own site-packages and runs none of its
``.pth`` files, so mesimp's editable install there is not seen, and the test checks that
``mesimp`` is imported from the wheel. The wheel is built without the compiled kernels
(``MESIMP_BUILD_KERNELS=0``, the build a machine without torch gets): it must run on the
pure-Python path and say how to build them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    """The sdist and the wheel, built once per session from this checkout."""
    out = tmp_path_factory.mktemp("dist")
    env = {**os.environ, "MESIMP_BUILD_KERNELS": "0"}
    # --no-isolation: build from the installed setuptools, no download; both from the tree
    _run(
        [sys.executable, "-m", "build", "--no-isolation", "--sdist", "--wheel", "-o", str(out)],
        cwd=ROOT,
        env=env,
    )
    return out


def test_build_and_twine_check(dist):
    wheels, sdists = list(dist.glob("*.whl")), list(dist.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1
    r = _run([sys.executable, "-m", "twine", "check", "--strict", *map(str, wheels + sdists)])
    assert r.stdout.count("PASSED") == 2
    with zipfile.ZipFile(wheels[0]) as z:
        names = set(z.namelist())
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    # the CLI installs as mesimp.cli, the kernels' sources travel for the first-use build
    assert "mesimp/cli/main.py" in names and "mesimp/csrc/kernels.cpp" in names
    assert not any(n.startswith(("cli/", "tests/")) for n in names)
    from mesimp._version import __version__

    assert f"Version: {__version__}\n" in meta
    for field in ("Requires-Python: >=3.10", "License-Expression: MIT", "Project-URL: "):
        assert field in meta, field
    for extra in ("hf", "bench", "dev", "docs"):
        assert f"Provides-Extra: {extra}\n" in meta, extra
    # the long description is the README, rendered as Markdown
    assert "Description-Content-Type: text/markdown" in meta and "## Quickstart" in meta


def _tiny_npz(path: Path) -> Path:
    """A tiny 784-feature image task (two classes, well apart) in the .npz layout."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, size=400).astype(np.uint8)
    x = rng.integers(0, 60, size=(400, 28, 28)).astype(np.uint8)
    x[y == 1, :14] += 150
    np.savez(path, x_train=x[:300], y_train=y[:300], x_test=x[300:], y_test=y[300:])
    return path


def test_wheel_installs_and_runs(dist, tmp_path):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    py = venv / "bin" / "python"
    wheel = next(dist.glob("*.whl"))
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(py),
            "install",
            "-q",
            "--no-deps",
            "--no-compile",
            str(wheel),
        ]
    )
    site = Path(
        _run(
            [str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]
        ).stdout.strip()
    )
    (site / "zz_deps_from_test_env.pth").write_text(sysconfig.get_path("purelib") + "\n")
    env = {
        **os.environ,
        "MESIMP_BUILD_KERNELS": "0",  # no first-use build: the Python path, with its message
        "MESIMP_CACHE_DIR": str(tmp_path / "cache"),  # and no kernels cached by another run
        "PYTHONPATH": "",
    }
    mesimp = str(venv / "bin" / "mesimp")

    # the console script, in its own process beside the driver below (two cores)
    help_proc = subprocess.Popen(
        [mesimp, "--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    # train -> shrink -> export through the installed CLI, in one process of the fresh
    # environment (one torch import instead of three; each step is the console entry point)
    data = _tiny_npz(tmp_path / "tiny.npz")
    steps = [
        ["train", "--data", data, "--hidden", "32", "--k", "8", "--simplify", "--prune-rate",
         "0.05", "--epochs", "2", "--dev-size", "100", "--threads", "1", "-o", "tiny.pt"],
        ["shrink", "tiny.pt", "--data", data],
        ["export", "tiny.small.pt", "--onnx", "--data", data],
    ]  # fmt: skip
    driver = tmp_path / "driver.py"
    driver.write_text(_DRIVER)
    r = _run(
        [str(py), str(driver), json.dumps([[str(a) for a in s] for s in steps])],
        env=env,
        cwd=tmp_path,
    )
    help_out, help_err = help_proc.communicate(timeout=120)
    assert help_proc.returncode == 0, help_err[-2000:]
    assert "Usage: mesimp" in help_out and "shrink" in help_out and "export" in help_out
    out = json.loads(r.stdout.splitlines()[-1])
    assert out["mesimp_file"].startswith(str(site)), out["mesimp_file"]  # the wheel's mesimp
    train, shrink, export = out["results"]
    assert train["kernel"] == "python"
    assert "python -m mesimp.nn.build" in r.stderr  # says how to get the compiled kernels
    assert shrink["max_abs_diff"] <= 1e-5
    assert export["max_abs_diff"] <= 1e-4 and (tmp_path / "tiny.small.onnx").is_file()


_DRIVER = """
import contextlib, io, json, sys
import mesimp
from mesimp.cli.main import main

results = []
for args in json.loads(sys.argv[1]):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        try:
            main(args + ["--json"])
        except SystemExit as e:
            if e.code not in (None, 0):
                sys.exit(f"mesimp {args[0]} exited {e.code}: {buf.getvalue()}")
    results.append(json.loads(buf.getvalue()))
print(json.dumps({"mesimp_file": mesimp.__file__, "results": results}))
"""
