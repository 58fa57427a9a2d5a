"""Knowledge distillation (Hinton et al. 2015) for the fine-tune of a simplified model.

A shrunk or shrinking network recovers faster when it also matches a trained
teacher's softened outputs (the dense model, or the model before the shrink): the
teacher's probabilities on the wrong classes carry what the hard labels do not. The loss
is ``(1 - alpha) * task loss + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))``;
the ``T^2`` keeps the soft term's gradient on the hard term's scale.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mesimp.errors import BadInputError
from mesimp.files.checkpoint import load_checkpoint, model_from_checkpoint

__all__ = ["kd_loss", "load_teacher"]


def kd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """``T^2 * KL(p_teacher || p_student)`` on temperature-softened logits, averaged over
    the rows (examples, or tokens where ``keep`` is true: a tagger's real words)."""
    if student.shape != teacher.shape:
        raise BadInputError(
            f"the teacher's outputs {tuple(teacher.shape)} do not match the model's "
            f"{tuple(student.shape)}: distill from a model of the same task"
        )
    s = student.reshape(-1, student.shape[-1])
    t = teacher.reshape(-1, teacher.shape[-1]).detach()
    if keep is not None:
        rows = keep.reshape(-1)
        s, t = s[rows], t[rows]
    log_p_s = F.log_softmax(s / temperature, dim=-1)
    log_p_t = F.log_softmax(t / temperature, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    return temperature**2 * kl.mean()


def load_teacher(path: str | Path, device: torch.device) -> nn.Module:
    """A frozen model from a mesimp checkpoint, in eval mode (no dropout in its targets)."""
    model = model_from_checkpoint(load_checkpoint(path)).to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
