"""Attention heads as units: how each attention class lays out its heads, and its pruner.

An attention block is a leaf of the dependency graph (``mesimp.simplify.leaves``): the
tracer sees its input channels (the stream its q/k/v projections read) and its output
channels (the stream its output projection writes, or, when that projection lives
outside the block as in BERT, the concatenated heads). Inside, mesimp knows the
layout (``HeadLayout``): query head h is rows ``h*D .. h*D+D-1`` of the query
projection (plus an offset in a fused ``qkv``), kv head g the same rows of the key and
value projections, and the output projection reads head h in the same columns.

Units (``head_units``):

* ``heads``: one unit per head when every head has its own k and v (plain multi-head
  attention): its q, k and v rows and its output-projection columns;
* under grouped-query attention (``num_kv_heads < num_heads``, query head h uses kv
  head ``h // R`` with ``R = num_heads / num_kv_heads``): ``kv_heads``, one unit per kv
  head (its k and v rows and its R query heads), and ``q_heads``, one unit per slot j
  of a kv group (query heads ``g*R + j`` of every group g), so every kv head keeps the
  same number of query heads, as ``repeat_kv`` needs.

Rotary embeddings act within a head (``head_dim`` is never pruned), so they are
untouched. After a prune the attributes that hold head counts (``num_heads``,
``num_key_value_groups``, ``all_head_size``, ...) are updated.

Supported: Hugging Face's attention modules with separate q/k/v projections and a
``head_dim``/``attention_head_size`` attribute (BERT, RoBERTa, DistilBERT, ViT, Llama,
Mistral, Qwen, ...), GPT-2's ``Conv1D`` attention, and timm's ``Attention`` (fused qkv).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from mesimp.nn.attention import MultiheadAttention
from mesimp.nn.conv1d import is_conv1d
from mesimp.simplify.leaves import Conv1DPruner, LeafPruner

__all__ = [
    "AttentionPruner",
    "HeadLayout",
    "head_layout",
    "prune_heads",
    "prune_in",
    "prune_out",
]

_QKV_NAMES = (
    ("q_proj", "k_proj", "v_proj"),
    ("query", "key", "value"),
    ("q_lin", "k_lin", "v_lin"),
)
_O_NAMES = ("o_proj", "out_proj", "out_lin")
_HEAD_DIM = ("head_dim", "attention_head_size", "dim_per_head")
_H_ATTRS = ("num_heads", "num_attention_heads", "n_heads", "n_head")
_KV_ATTRS = ("num_key_value_heads", "num_kv_heads")


@dataclass
class HeadLayout:
    """Where the heads of one attention block live (names relative to the block)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    q: tuple[str, int]  # (projection, first row of query head 0)
    k: tuple[str, int]
    v: tuple[str, int]
    readers: tuple[str, ...]  # projections reading the block's input stream
    o: str | None  # the output projection, when inside the block
    unsupported: str | None = None  # why its heads cannot be units, if so

    @property
    def group_size(self) -> int:
        """Query heads per kv head (R)."""
        return self.num_heads // self.num_kv_heads

    def q_rows(self, heads: Sequence[int]) -> list[int]:
        return _rows(self.q[1], heads, self.head_dim)

    def kv_rows(self, part: str, kv_heads: Sequence[int]) -> list[int]:
        offset = (self.k if part == "k" else self.v)[1]
        return _rows(offset, kv_heads, self.head_dim)

    def o_cols(self, heads: Sequence[int]) -> list[int]:
        return _rows(0, heads, self.head_dim)


def _rows(offset: int, heads: Sequence[int], d: int) -> list[int]:
    return [offset + h * d + i for h in heads for i in range(d)]


def _linear_like(m: object) -> bool:
    return isinstance(m, nn.Linear) or (isinstance(m, nn.Module) and is_conv1d(m))


def _out_width(m: nn.Module) -> int:
    return int(m.nf) if is_conv1d(m) else int(m.out_features)


def head_layout(module: nn.Module) -> HeadLayout | None:
    """The head layout of an attention block, or None if ``module`` is not one mesimp
    knows. A known block whose heads cannot be units has ``unsupported`` set."""
    if isinstance(module, MultiheadAttention):
        h, d = module.num_heads, module.head_dim
        return HeadLayout(
            h, h, d, ("in_proj", 0), ("in_proj", h * d), ("in_proj", 2 * h * d), ("in_proj",),
            "out_proj",
        )  # fmt: skip
    if type(module).__name__ == "Attention" and _linear_like(getattr(module, "qkv", None)):
        return _timm_layout(module)
    if type(module).__name__ == "GPT2Attention" and is_conv1d(getattr(module, "c_attn", None)):
        return _gpt2_layout(module)
    for names in _QKV_NAMES:
        mods = [getattr(module, n, None) for n in names]
        if all(_linear_like(m) for m in mods):
            return _separate_layout(module, names, mods)
    return None


def _head_dim(module: nn.Module) -> int | None:
    for attr in _HEAD_DIM:
        v = getattr(module, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def _separate_layout(module: nn.Module, names: tuple[str, ...], mods: list) -> HeadLayout | None:
    d = _head_dim(module)
    if d is None:
        return None
    q, k, v = (_out_width(m) for m in mods)
    o = next((n for n in _O_NAMES if _linear_like(getattr(module, n, None))), None)
    why = None
    if q % d or k % d or k != v or (q // d) % max(k // d, 1):
        why = f"q/k/v widths {q}/{k}/{v} are not whole heads of {d}"
    return HeadLayout(
        num_heads=q // d,
        num_kv_heads=max(k // d, 1),
        head_dim=d,
        q=(names[0], 0),
        k=(names[1], 0),
        v=(names[2], 0),
        readers=names,
        o=o,
        unsupported=why,
    )


def _timm_layout(module: nn.Module) -> HeadLayout:
    h, d = int(module.num_heads), int(module.head_dim)
    why = None
    if not isinstance(getattr(module, "norm", nn.Identity()), nn.Identity):
        why = "its scale norm normalises over all heads"
    elif getattr(module, "gate", None) is not None:
        why = "it has a gate projection"
    elif not isinstance(getattr(module, "q_norm", nn.Identity()), (nn.Identity, nn.LayerNorm)):
        why = "its q/k norms are not per-head LayerNorms"
    return HeadLayout(
        h, h, d, ("qkv", 0), ("qkv", h * d), ("qkv", 2 * h * d), ("qkv",), "proj", why
    )


def _gpt2_layout(module: nn.Module) -> HeadLayout:
    h, d = int(module.num_heads), int(module.head_dim)
    why = "cross-attention" if getattr(module, "is_cross_attention", False) else None
    if getattr(module, "reorder_and_upcast_attn", False):
        why = why or "reorder_and_upcast_attn"
    return HeadLayout(
        h, h, d, ("c_attn", 0), ("c_attn", h * d), ("c_attn", 2 * h * d), ("c_attn",), "c_proj", why
    )


# -- pruning the pieces ------------------------------------------------------------------
def _pruner(m: nn.Module) -> Any:
    if is_conv1d(m):
        return Conv1DPruner()
    import torch_pruning as tp

    return tp.pruner.function.PrunerBox[tp.ops.module2type(m)]


def prune_out(m: nn.Module, idxs: Sequence[int]) -> None:
    """Remove output features ``idxs`` of a Linear-like module, in place."""
    if idxs:
        _pruner(m).prune_out_channels(m, sorted(int(i) for i in idxs))


def prune_in(m: nn.Module, idxs: Sequence[int]) -> None:
    """Remove input features ``idxs`` of a Linear-like module, in place."""
    if idxs:
        _pruner(m).prune_in_channels(m, sorted(int(i) for i in idxs))


def _set_counts(module: nn.Module, layout: HeadLayout, heads: int, kv_heads: int) -> None:
    """Write the new head counts into every attribute that holds one."""
    d = layout.head_dim
    for attr in _H_ATTRS:
        if isinstance(getattr(module, attr, None), int):
            setattr(module, attr, heads)
    for attr in _KV_ATTRS:
        if isinstance(getattr(module, attr, None), int):
            setattr(module, attr, kv_heads)
    if isinstance(getattr(module, "num_key_value_groups", None), int):
        module.num_key_value_groups = heads // kv_heads
    for attr in ("all_head_size", "attn_dim", "split_size", "inner_dim"):
        if isinstance(getattr(module, attr, None), int):
            setattr(module, attr, heads * d)


def prune_heads(module: nn.Module, drop_q: Sequence[int], drop_kv: Sequence[int] = ()) -> None:
    """Remove query heads ``drop_q`` and kv heads ``drop_kv`` (with nothing else: the
    caller drops a kv head's query heads as well), in place."""
    layout = head_layout(module)
    if layout is None or layout.unsupported:
        raise ValueError(f"{type(module).__name__}: heads are not prunable")
    drop_q, drop_kv = sorted(set(drop_q)), sorted(set(drop_kv))
    if not drop_q and not drop_kv:
        return
    subs = {n: getattr(module, n) for n in {layout.q[0], layout.k[0], layout.v[0]}}
    rows: dict[str, list[int]] = {n: [] for n in subs}
    rows[layout.q[0]] += layout.q_rows(drop_q)
    rows[layout.k[0]] += layout.kv_rows("k", drop_kv)
    rows[layout.v[0]] += layout.kv_rows("v", drop_kv)
    for name, idxs in rows.items():
        prune_out(subs[name], idxs)
    if layout.o is not None:
        prune_in(getattr(module, layout.o), layout.o_cols(drop_q))
    _set_counts(module, layout, layout.num_heads - len(drop_q), layout.num_kv_heads - len(drop_kv))


class AttentionPruner(LeafPruner):
    """Torch-Pruning's view of an attention leaf: input channels are the stream its
    q/k/v projections read; output channels are the stream its output projection
    writes (inside) or the concatenated heads (BERT: the projection is outside)."""

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        layout = head_layout(layer)
        for name in layout.readers:
            prune_in(getattr(layer, name), idxs)
        if isinstance(getattr(layer, "embed_dim", None), int) and layout.o is not None:
            layer.embed_dim = self.get_in_channels(layer)  # the stream it reads
        return layer

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        layout = head_layout(layer)
        if layout.o is not None:
            prune_out(getattr(layer, layout.o), idxs)
            return layer
        # heads are the output: whole heads only (mesimp's head units guarantee it)
        d = layout.head_dim
        heads = sorted({int(i) // d for i in idxs})
        if len(heads) * d != len(set(idxs)):
            raise ValueError(f"{type(layer).__name__}: pruning part of a head")
        prune_heads(layer, heads, heads if layout.num_kv_heads == layout.num_heads else ())
        return layer

    def get_in_channels(self, layer: nn.Module) -> int:
        layout = head_layout(layer)
        first = getattr(layer, layout.readers[0])
        return int(first.weight.shape[0] if is_conv1d(first) else first.in_features)

    def get_out_channels(self, layer: nn.Module) -> int:
        layout = head_layout(layer)
        if layout.o is not None:
            return _out_width(getattr(layer, layout.o))
        return layout.num_heads * layout.head_dim
