"""The compiled kernels give the same bits on every x86-64 ISA.

Their hot loops carry GCC ``target_clones("avx2", "default")`` and are compiled with
``-ffp-contract=off``, so the AVX2 clone and the baseline one must agree to the bit (no
fused multiply-adds, the same order of operations). This builds the kernels a second
time without the clones (``-DMESIMP_NO_CLONES``: what a CPU without AVX2 runs), trains
the same seeded scenario (tests/isa_scenario.py: MLPs with every selection, masks, MSBP,
Adam and Adagrad on both compiled paths; the LSTM's unified backward) on each build in
its own process, and compares every weight, counter, memory and optimizer state. On a
CPU without AVX2 both builds run the baseline code and the test holds trivially.
"""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mesimp.nn import kernels

SCENARIO = Path(__file__).with_name("isa_scenario.py")

pytestmark = [
    pytest.mark.skipif(not kernels.available(), reason="mesimp._C is not built"),
    pytest.mark.skipif(platform.machine() != "x86_64", reason="the ISA clones are x86-64 only"),
]


def _run(out: Path, *extra: str) -> tuple[Path, dict[str, torch.Tensor]]:
    """The library the scenario ran on, and its tensors."""
    subprocess.run([sys.executable, str(SCENARIO), str(out), *extra], check=True)
    got = torch.load(out, weights_only=True)
    return Path(got["library"]), got["tensors"]


def test_the_builds_use_setup_pys_flags():
    """The first-use build (and so the baseline one here) compiles with setup.py's flags,
    so that they differ from the installed build only by the clones."""
    from mesimp.nn.build import CFLAGS

    setup = (Path(__file__).resolve().parents[1] / "setup.py").read_text()
    assert f"extra_compile_args={CFLAGS!r}".replace("'", '"') in setup


def test_the_baseline_build_gives_the_dispatched_builds_bits(tmp_path):
    lib_dispatched, dispatched = _run(tmp_path / "dispatched.pt")
    if b".avx2" not in lib_dispatched.read_bytes():
        pytest.skip("the installed kernels have no ISA clones (not built by GCC)")
    lib_baseline, baseline = _run(tmp_path / "baseline.pt", str(tmp_path / "build"))
    # the second run took the baseline build, which has no clones
    assert lib_baseline.is_relative_to(tmp_path / "build")
    assert b".avx2" not in lib_baseline.read_bytes()
    assert dispatched.keys() == baseline.keys()
    hits = [n for n in dispatched if "/hits" in n]
    assert len(hits) == 24 and all(dispatched[n].sum() > 0 for n in hits)  # it trained
    assert sum("/memory" in n for n in dispatched) == 12  # the MSBP layers kept memories
    differ = [n for n in dispatched if not torch.equal(dispatched[n], baseline[n])]
    assert not differ, f"{len(differ)} of {len(dispatched)} tensors differ: {differ[:5]}"
