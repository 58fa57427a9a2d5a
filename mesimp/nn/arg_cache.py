"""Kernel arguments kept until what they were built from changes.

The compiled paths take per-call arguments built in Python: a stack's layers with
their configs, counters, masks and MSBP memories; an optimizer's state tensors.
Rebuilding them at every call cost ~0.1 ms of a ~1.2 ms ``train_step`` (784-500-500-10,
k=20, b=50): little in a tight loop, but by then the step's GEMMs have evicted that
Python working set from the CPU caches. So they are built once and reused while
their *key* is unchanged.

A key is a flat tuple of every object the arguments were read from, compared by
identity (:func:`same`). It holds those objects, so their ids cannot be reused while
it lives; every value a builder reads is itself in the key, so a changed value is a
different object and the key no longer matches. An entry is therefore never stale;
at worst it is rebuilt needlessly (an equal value assigned anew). What a key cannot
see is in-place mutation of a container it does not list the contents of, so a
builder lists the contents (a config's fields, not just the config).
"""

from __future__ import annotations

import operator


def same(a: tuple | None, b: tuple) -> bool:
    """Whether keys ``a`` and ``b`` hold the same objects, in the same order."""
    return a is not None and len(a) == len(b) and all(map(operator.is_, a, b))
