"""The arc-standard transition system (Nivre 2004; Chen & Manning 2014's parser).

A configuration is a stack (``0`` = ROOT at its bottom), a buffer of the words not read
yet (``1..n``, consumed from the front) and the arcs built so far. Transitions:

* ``SHIFT``: move the buffer's front word onto the stack;
* ``LEFT-ARC(l)``: the top ``s1`` becomes the head of the word below it, ``s2``, with
  label ``l``; ``s2`` leaves the stack (never ROOT);
* ``RIGHT-ARC(l)``: ``s2`` becomes the head of ``s1`` with label ``l``; ``s1`` leaves.

Parsing ends when the buffer is empty and only ROOT is on the stack. The *static
oracle* (:func:`oracle`) gives the one transition sequence that builds a gold tree: LEFT-ARC
as soon as ``s2``'s head is ``s1``, RIGHT-ARC once ``s1``'s head is ``s2`` and all of
``s1``'s own dependents are attached, else SHIFT. It exists exactly for *projective*
trees (:func:`is_projective`); training skips the others and counts them.

Transition ids: ``0`` = SHIFT, ``1..L`` = LEFT-ARC(label i-1), ``L+1..2L`` =
RIGHT-ARC(label i-L-1), for the ``L`` labels of the label list in use.

Children are kept per head in attachment order, which in arc-standard is also an
order by position: left dependents attach nearest first (so the leftmost is the last
one attached), right dependents attach left to right (the rightmost is the last).
"""

from __future__ import annotations

from collections.abc import Sequence

from mesimp.errors import DataError

__all__ = [
    "SHIFT",
    "Configuration",
    "check_tree",
    "is_projective",
    "n_transitions",
    "oracle",
    "transition_name",
]

SHIFT = 0


def n_transitions(n_labels: int) -> int:
    """SHIFT plus a LEFT-ARC and a RIGHT-ARC per label."""
    return 1 + 2 * n_labels


def transition_name(t: int, labels: Sequence[str]) -> str:
    """``SHIFT``, ``LEFT-ARC(nsubj)``, ``RIGHT-ARC(obj)``: for messages and tests."""
    n = len(labels)
    if t == SHIFT:
        return "SHIFT"
    if 1 <= t <= n:
        return f"LEFT-ARC({labels[t - 1]})"
    return f"RIGHT-ARC({labels[t - n - 1]})"


class Configuration:
    """One sentence's parser state. Words are 1..n; 0 is ROOT.

    ``heads[i]``/``labels[i]`` (index 0 unused) are ``-1`` until word ``i`` is
    attached; ``left[i]``/``right[i]`` are its attached dependents in attachment order.
    """

    __slots__ = ("n", "stack", "next", "heads", "labels", "left", "right")

    def __init__(self, n: int) -> None:
        self.n = n
        self.stack: list[int] = [0]
        self.next = 1  # the buffer is next..n
        self.heads = [-1] * (n + 1)
        self.labels = [-1] * (n + 1)
        self.left: list[list[int]] = [[] for _ in range(n + 1)]
        self.right: list[list[int]] = [[] for _ in range(n + 1)]

    @property
    def terminal(self) -> bool:
        return self.next > self.n and len(self.stack) == 1

    def legal(self, n_labels: int) -> tuple[bool, bool, bool]:
        """Whether SHIFT, LEFT-ARC and RIGHT-ARC are allowed (any label).

        A RIGHT-ARC from ROOT waits for the end of the buffer, so a decoded tree has
        one word attached to ROOT (as in UD); the oracle never needs more for a
        single-rooted gold tree.
        """
        depth = len(self.stack)
        shift = self.next <= self.n
        left = depth > 2
        right = depth > 2 or (depth == 2 and not shift)
        return shift, left and n_labels > 0, right and n_labels > 0

    def apply(self, t: int, n_labels: int) -> None:
        """Apply transition ``t`` (no legality check beyond what would corrupt state)."""
        if t == SHIFT:
            if self.next > self.n:
                raise DataError("SHIFT with an empty buffer")
            self.stack.append(self.next)
            self.next += 1
            return
        if len(self.stack) < 2:
            raise DataError("an arc transition with fewer than two items on the stack")
        s1, s2 = self.stack[-1], self.stack[-2]
        if t <= n_labels:  # LEFT-ARC: s1 -> s2
            if s2 == 0:
                raise DataError("LEFT-ARC would give ROOT a head")
            self._attach(s1, s2, t - 1, left=True)
            del self.stack[-2]
        else:  # RIGHT-ARC: s2 -> s1
            self._attach(s2, s1, t - n_labels - 1, left=False)
            self.stack.pop()

    def _attach(self, head: int, dep: int, label: int, left: bool) -> None:
        self.heads[dep] = head
        self.labels[dep] = label
        (self.left if left else self.right)[head].append(dep)


def check_tree(heads: Sequence[int], where: str = "sentence") -> None:
    """Refuse (``DataError``, one line) heads that do not form a tree rooted at 0.

    ``heads[i-1]`` is the head of word ``i``: an integer in ``0..n``, no word its own
    head, every word reaching 0 (no cycle), and at least one word on ROOT.
    """
    n = len(heads)
    for i, h in enumerate(heads, start=1):
        if not 0 <= h <= n:
            raise DataError(f"{where}: HEAD {h} of word {i} is outside 0..{n}")
        if h == i:
            raise DataError(f"{where}: word {i} is its own head")
    state = [0] * (n + 1)  # 0 unseen, 1 on the current path, 2 reaches ROOT
    state[0] = 2
    for start in range(1, n + 1):
        path = []
        i = start
        while state[i] == 0:
            state[i] = 1
            path.append(i)
            i = heads[i - 1]
        if state[i] == 1:
            raise DataError(f"{where}: the heads form a cycle through word {i}; not a tree")
        for j in path:
            state[j] = 2


def is_projective(heads: Sequence[int]) -> bool:
    """True when every arc's span is covered by its head's subtree (ROOT at 0 included):
    each word strictly between a head and its dependent is a descendant of that head.
    ``heads`` must form a tree (:func:`check_tree`)."""
    for d, h in enumerate(heads, start=1):
        if h == 0:  # ROOT dominates every word
            continue
        for k in range(min(h, d) + 1, max(h, d)):
            if not _dominates(heads, h, k):
                return False
    return True


def _dominates(heads: Sequence[int], h: int, k: int) -> bool:
    """Whether ``h`` is an ancestor of ``k`` (``h`` a word, not ROOT)."""
    while k != 0:
        k = heads[k - 1]
        if k == h:
            return True
    return False


def oracle(heads: Sequence[int], labels: Sequence[int], n_labels: int) -> list[int]:
    """The static arc-standard oracle's transition ids for a projective gold tree.

    ``heads[i-1]``/``labels[i-1]``: word ``i``'s head (0 = ROOT) and label id
    (``0..n_labels-1``). Raises ``DataError`` when no sequence exists (a non-projective
    tree); check :func:`is_projective` first to skip such sentences.
    """
    n = len(heads)
    pending = [0] * (n + 1)  # dependents not attached yet, per head
    for h in heads:
        pending[h] += 1
    c = Configuration(n)
    out: list[int] = []
    while not c.terminal:
        st = c.stack
        if len(st) >= 2:
            s1, s2 = st[-1], st[-2]
            if s2 != 0 and heads[s2 - 1] == s1:
                t = 1 + labels[s2 - 1]
                pending[s1] -= 1
                c.apply(t, n_labels)
                out.append(t)
                continue
            if heads[s1 - 1] == s2 and pending[s1] == 0:
                t = 1 + n_labels + labels[s1 - 1]
                pending[s2] -= 1
                c.apply(t, n_labels)
                out.append(t)
                continue
        if c.next > n:
            raise DataError("no arc-standard transition sequence builds this tree (non-projective)")
        c.apply(SHIFT, n_labels)
        out.append(SHIFT)
    return out
