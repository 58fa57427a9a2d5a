"""Build the optional compiled meProp kernels (mesimp/_C, see mesimp/nn/kernels.py).

Everything else is in pyproject.toml. The extension is built at install time against the
torch already in the environment (the Makefile installs torch first, then
``pip install --no-build-isolation -e .``), so its ABI is exactly that torch's. Where torch
is not importable here (``pip install .`` with pip's default build isolation) or the build
fails, the package installs without it and mesimp compiles the same sources on first use
into a per-user cache (``mesimp.nn.build``, which says why torch is not a build
requirement), or runs the pure-Python path where that cannot happen either.
"""

from __future__ import annotations

import os
import sys

from setuptools import setup


def _ext_modules() -> tuple[list, dict]:
    if os.environ.get("MESIMP_BUILD_KERNELS", "1") == "0":
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:  # an isolated build without torch: the Python path only
        print(
            "mesimp: torch not importable at build time (build isolation); the meProp "
            "kernels compile on first use instead (python -m mesimp.nn.build)",
            file=sys.stderr,
        )
        return [], {}

    class OptionalBuild(BuildExtension):
        """A compiler error leaves the package installed without the kernels."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as e:  # noqa: BLE001 - any build failure means "no kernels"
                print(f"mesimp: compiled kernels not built ({e}); Python path", file=sys.stderr)

    # -O3 and a portable ISA: no -march=native. The hot loops carry GCC target_clones
    # (AVX2 picked at run time); -ffp-contract=off keeps every ISA's results bit-equal;
    # -fno-math-errno lets sqrt vectorize (nothing reads errno). The same flags as the
    # first-use build's (mesimp/nn/build.py's CFLAGS; tests/test_isa_bits.py checks).
    ext = CppExtension(
        "mesimp._C",
        ["mesimp/csrc/kernels.cpp", "mesimp/csrc/lstm_kernels.cpp"],
        depends=["mesimp/csrc/select.h"],
        extra_compile_args=["-O3", "-ffp-contract=off", "-fno-math-errno"],
    )
    return [ext], {"build_ext": OptionalBuild.with_options(use_ninja=False)}


ext_modules, cmdclass = _ext_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
