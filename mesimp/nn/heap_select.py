"""The C# reference's per-example top-k, ``TopNHeap.GetAbsTop``, vectorised.

lancopku/meSimp ``src/nnmnist/Common/TopNHeap.cs:26-52`` picks a row's k indices with a
min-heap: it loads columns ``0..k-1`` into the heap (``MakeHeap``: ``ShiftDown`` from
``k >> 1`` down to 0, the smaller child taken, the left one on a tie, a swap only when
the parent is strictly larger), then lets every later column ``i >= k`` replace the root
when ``|g[i]| > root`` (strictly). Whatever is in the heap at the end is selected, and
``Record.Store`` counts every one of those k indices as a hit (``Record.cs:30-38``).

When a row has at least k nonzero entries this is the ordinary top-k. When it has fewer
(ReLU zeros, masked units: meSimp at widths near k), the k slots are all the nonzero
columns *plus* ``k - nnz`` zero-gradient columns, always taken from ``0..k-1``. Which
ones depends only on the zero pattern, not on the values:

* heapifying moves a zero up along the path a positive parent sinks through (the
  zero child; the left one if both are zero), so the zeros of columns ``0..k-1`` form
  the top of the heap, and their order of eviction is the *preorder* of heap
  positions ``0..k-1`` (parent, then left subtree, then right subtree), skipping the
  nonzero positions;
* every nonzero column ``i >= k`` evicts the zero at the root, the next in that order.

So the zeros kept are the ``k - nnz`` zero columns of ``0..k-1`` *last* in preorder.
``heap_topk`` builds one key per entry (``|g|`` for a nonzero entry; for a zero in
``0..k-1``, its preorder rank shifted below 0; ``-inf`` for a zero beyond) and takes
``topk`` of it: one call for the whole batch. Tested against a line-by-line port of the
heap (``tests/test_reference_simplify.py``). The one case where it can differ is a tie
between *nonzero* values at the k-th place, which ``topk`` breaks its own way (measure
zero for float gradients); the gradient is the same either way.
"""

from __future__ import annotations

from functools import lru_cache

import torch

__all__ = ["heap_preorder_rank", "heap_topk"]


@lru_cache(maxsize=64)
def _preorder_rank(k: int) -> tuple[int, ...]:
    """``rank[p]``: the position of heap node p (children 2p+1, 2p+2) in a preorder walk
    of the complete binary tree of k nodes."""
    rank = [0] * k
    stack, order = [0] if k > 0 else [], 0
    while stack:
        p = stack.pop()
        rank[p] = order
        order += 1
        for c in (2 * p + 2, 2 * p + 1):  # left is popped first
            if c < k:
                stack.append(c)
    return tuple(rank)


def heap_preorder_rank(k: int, device: torch.device | str | None = None) -> torch.Tensor:
    return torch.tensor(_preorder_rank(k), dtype=torch.long, device=device)


def heap_topk(score: torch.Tensor, k: int) -> torch.Tensor:
    """``[N, k]`` indices the C# ``TopNHeap`` selects from each row of ``score`` (``|g|``,
    >= 0, masked units 0). ``k`` must not exceed the row length (the C# code throws)."""
    n = score.shape[-1]
    if not 0 < k <= n:
        raise ValueError(f"heap top-k needs 0 < k <= {n}, got {k}")
    neg_inf = torch.tensor(float("-inf"), dtype=score.dtype, device=score.device)
    # a zero in column c < k ranks by its preorder position: the last ones are kept
    zero_key = heap_preorder_rank(k, score.device).to(score.dtype) - (k + 1)
    key = torch.where(score > 0, score, neg_inf)
    head = key[..., :k]
    key[..., :k] = torch.where(head == neg_inf, zero_key, head)
    return key.topk(k, dim=-1, sorted=False).indices
