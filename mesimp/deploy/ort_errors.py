"""Errors from onnx, torch.onnx and onnxruntime as one line for the user.

Export and bench both turn third-party failures into mesimp's one-line errors. The
libraries' messages are long (an onnxruntime error starts with ``[ONNXRuntimeError] :
1 : FAIL : file.cc:42 void f(args...)``; an exporter may dump a whole graph), and
onnxruntime's exception types share no base class to catch. The helpers for both live
here, so neither module has to import the other for them.
"""

from __future__ import annotations

import re

__all__ = ["one_line", "ort_errors", "ort_message"]

_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : (?:\S+:\d+ [^()]*\([^()]*\) )?")


def one_line(e: BaseException, limit: int = 200) -> str:
    """The first non-blank line of ``e``'s message (its type name if none), cut to ``limit``."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return (lines[0] if lines else type(e).__name__)[:limit]


def ort_message(e: BaseException) -> str:
    """onnxruntime's error, one line, without its ``[ONNXRuntimeError] : 1 : FAIL :
    file.cc:42 void f(args...)`` prefix."""
    return _ORT_PREFIX.sub("", one_line(e, 2000), count=1)[:200] or type(e).__name__


def ort_errors() -> tuple[type[BaseException], ...]:
    """onnxruntime's own error types (Fail, InvalidArgument, RuntimeException, ...): they
    derive from Exception directly, with no common base to catch instead."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    return tuple(
        v
        for v in vars(state).values()
        if isinstance(v, type) and issubclass(v, Exception) and v.__module__ == state.__name__
    )
