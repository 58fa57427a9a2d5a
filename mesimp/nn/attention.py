"""``MultiheadAttention``: ``nn.MultiheadAttention`` whose heads and stream can shrink apart.

``torch.nn.MultiheadAttention`` ties the width of its q/k/v projections to the width
of the stream it reads (``embed_dim``): removing a head, or a channel of the stream,
breaks it. This module computes what it computes (self- and cross-attention, the same
masks, dropout, ``batch_first``, ``need_weights``) with the in-projection as an
``nn.Linear`` ``in_proj`` of ``3 * num_heads * head_dim`` rows and ``out_proj`` reading
``num_heads * head_dim`` columns, so ``head_dim`` stays while heads and the stream
shrink. Its ``state_dict`` has ``nn.MultiheadAttention``'s keys (``in_proj_weight``,
``in_proj_bias``, ``out_proj.weight``, ``out_proj.bias``) and layouts, so weights move
both ways. ``meprop_`` swaps it in (sharing the parameters) so that its projections
can become meProp layers; a shrunk model keeps it (plain PyTorch ops, exportable to
ONNX); ``to_torch()`` gives back ``nn.MultiheadAttention`` when the widths allow.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mesimp.errors import BadInputError

__all__ = ["MultiheadAttention"]


class MultiheadAttention(nn.Module):
    """Multi-head attention with an ``nn.Linear`` in-projection (see the module doc)."""

    # read by torch's TransformerEncoderLayer fast-path check: False keeps it off (its
    # fused kernel reads in_proj_weight, which this module does not have)
    _qkv_same_embed_dim = False

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        batch_first: bool = False,
        head_dim: int | None = None,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        if head_dim is None:
            if embed_dim % num_heads:
                raise BadInputError(f"embed_dim {embed_dim} is not a multiple of {num_heads}")
            head_dim = embed_dim // num_heads
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.dropout, self.batch_first = dropout, batch_first
        width = num_heads * head_dim
        kw = {"device": device, "dtype": dtype}
        self.in_proj = nn.Linear(embed_dim, 3 * width, bias=bias, **kw)
        self.out_proj = nn.Linear(width, embed_dim, bias=bias, **kw)
        self._register_state_dict_hook(_torch_keys)
        self._register_load_state_dict_pre_hook(_own_keys)

    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention) -> MultiheadAttention:
        """Wrap a ``nn.MultiheadAttention``, sharing its parameters (no copy)."""
        if not mha._qkv_same_embed_dim:
            raise BadInputError("key/value widths differ from the query's (kdim/vdim)")
        if mha.bias_k is not None or mha.add_zero_attn:
            raise BadInputError("add_bias_kv and add_zero_attn are not supported")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.embed_dim, new.num_heads, new.head_dim = mha.embed_dim, mha.num_heads, mha.head_dim
        new.dropout, new.batch_first = mha.dropout, mha.batch_first
        w = mha.in_proj_weight
        new.in_proj = nn.Linear(w.shape[1], w.shape[0], bias=mha.in_proj_bias is not None)
        new.in_proj.weight, new.in_proj.bias = w, mha.in_proj_bias
        new.out_proj = nn.Linear(
            mha.out_proj.in_features, mha.out_proj.out_features, bias=mha.out_proj.bias is not None
        )
        new.out_proj.weight, new.out_proj.bias = mha.out_proj.weight, mha.out_proj.bias
        new._register_state_dict_hook(_torch_keys)
        new._register_load_state_dict_pre_hook(_own_keys)
        new.train(mha.training)
        return new

    def to_torch(self) -> nn.Module:
        """``nn.MultiheadAttention`` sharing these parameters, when the heads fill the
        stream (``num_heads * head_dim == embed_dim``); else this module itself."""
        width = self.num_heads * self.head_dim
        if width != self.embed_dim or self.in_proj.in_features != self.embed_dim:
            return self
        mha = nn.MultiheadAttention(
            self.embed_dim,
            self.num_heads,
            dropout=self.dropout,
            bias=self.in_proj.bias is not None,
            batch_first=self.batch_first,
            device="meta",
        )
        mha.in_proj_weight, mha.in_proj_bias = self.in_proj.weight, self.in_proj.bias
        mha.out_proj.weight, mha.out_proj.bias = self.out_proj.weight, self.out_proj.bias
        mha.train(self.training)
        return mha

    @property
    def in_proj_weight(self) -> torch.Tensor:
        return self.in_proj.weight

    @property
    def in_proj_bias(self) -> torch.Tensor | None:
        return self.in_proj.bias

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        self_attn = query is key and key is value  # before the reshapes make three tensors
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if not self.batch_first or unbatched:  # [L, N, E] -> [N, L, E]
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        if self_attn:
            key = value = query  # the same reshapes of one tensor: the one-GEMM path
        q, k, v = self._project(query, key, value)
        n, length, s = q.shape[0], q.shape[1], k.shape[1]
        h, d = self.num_heads, self.head_dim
        q, k, v = (t.reshape(n, -1, h, d).transpose(1, 2) for t in (q, k, v))
        mask = _additive_mask(attn_mask, key_padding_mask, is_causal, n, h, length, s, q)
        p = self.dropout if self.training else 0.0
        if need_weights:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(d)
            if mask is not None:
                scores = scores + mask
            weights = scores.softmax(-1)
            out = F.dropout(weights, p, training=p > 0) @ v
            weights = weights.mean(1) if average_attn_weights else weights
        else:
            out, weights = (
                F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p),
                None,
            )
        out = self.out_proj(out.transpose(1, 2).reshape(n, length, h * d))
        if not self.batch_first or unbatched:
            out = out.transpose(0, 1)
        if unbatched:
            out = out.squeeze(1)
            weights = weights.squeeze(0) if weights is not None else None
        return out, weights

    def _project(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> tuple:
        if query is key and key is value:  # self-attention: one GEMM (meProp's, if swapped)
            return self.in_proj(query).chunk(3, dim=-1)
        w, b = self.in_proj.weight, self.in_proj.bias
        biases = b.chunk(3) if b is not None else (None, None, None)
        inputs = (query, key, value)
        return tuple(
            F.linear(x, wi, bi) for x, wi, bi in zip(inputs, w.chunk(3), biases, strict=True)
        )

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
            f"head_dim={self.head_dim}, batch_first={self.batch_first}"
        )


def _additive_mask(
    attn_mask: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    is_causal: bool,
    n: int,
    h: int,
    length: int,
    s: int,
    like: torch.Tensor,
) -> torch.Tensor | None:
    """``nn.MultiheadAttention``'s masks (bool: True = may not attend; float: added) as
    one float mask ``[N | 1, H | 1, L, S]``."""
    if attn_mask is None and is_causal:
        attn_mask = torch.ones(length, s, dtype=torch.bool, device=like.device).triu(1)
    mask = None
    if attn_mask is not None:
        m = _as_float(attn_mask, like)
        mask = m.view(n, h, length, s) if m.dim() == 3 else m.view(1, 1, length, s)
    if key_padding_mask is not None:
        kp = _as_float(key_padding_mask, like).view(n, 1, 1, s)
        mask = kp if mask is None else mask + kp
    return mask


def _as_float(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=like.dtype, device=like.device).masked_fill(
            mask, float("-inf")
        )
    return mask.to(like.dtype)


def _torch_keys(module: nn.Module, state: dict, prefix: str, _meta: Any) -> None:
    """``in_proj.weight`` -> ``in_proj_weight``: nn.MultiheadAttention's key names."""
    for part in ("weight", "bias"):
        key = f"{prefix}in_proj.{part}"
        if key in state:
            state[f"{prefix}in_proj_{part}"] = state.pop(key)


def _own_keys(state: dict, prefix: str, *_args: Any) -> None:
    for part in ("weight", "bias"):
        key = f"{prefix}in_proj_{part}"
        if key in state:
            state[f"{prefix}in_proj.{part}"] = state.pop(key)
