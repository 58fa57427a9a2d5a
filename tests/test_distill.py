"""Knowledge distillation (``--distill``): the loss against a float64 reference computed
by hand, the padding mask, and the training loop's use of it."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import read_jsonl, train_tiny

from mesimp.errors import BadInputError, MesimpError
from mesimp.files.checkpoint import load_checkpoint
from mesimp.training.config import TrainConfig
from mesimp.training.distill import kd_loss


def reference_kd(student: list[list[float]], teacher: list[list[float]], t: float) -> float:
    """T^2 * mean over rows of sum_c p_t(c) * (log p_t(c) - log p_s(c)), in Python floats."""

    def log_softmax(row: list[float]) -> list[float]:
        z = [v / t for v in row]
        m = max(z)
        lse = m + math.log(sum(math.exp(v - m) for v in z))
        return [v - lse for v in z]

    total = 0.0
    for s, q in zip(student, teacher, strict=True):
        ls, lt = log_softmax(s), log_softmax(q)
        total += sum(math.exp(b) * (b - a) for a, b in zip(ls, lt, strict=True))
    return t * t * total / len(student)


def test_kd_loss_matches_the_hand_computed_reference():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(5, 7, generator=g, dtype=torch.float64) * 3
    q = torch.randn(5, 7, generator=g, dtype=torch.float64) * 3
    for temp in (1.0, 2.0, 4.0):
        got = kd_loss(s, q, temp).item()
        assert got == pytest.approx(reference_kd(s.tolist(), q.tolist(), temp), rel=1e-12)
    assert kd_loss(s, s, 4.0).item() == pytest.approx(0.0, abs=1e-12)


def test_kd_loss_averages_only_the_kept_tokens():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    q = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    keep = torch.tensor([[True, True, False], [True, False, False]])
    rows = [(0, 0), (0, 1), (1, 0)]
    want = reference_kd(
        [s[i, j].tolist() for i, j in rows], [q[i, j].tolist() for i, j in rows], 2.0
    )
    assert kd_loss(s, q, 2.0, keep).item() == pytest.approx(want, rel=1e-12)


def test_kd_loss_refuses_other_shapes_in_one_line():
    with pytest.raises(BadInputError, match="do not match") as e:
        kd_loss(torch.zeros(2, 10), torch.zeros(2, 5), 2.0)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("kw", "msg"),
    [
        (dict(distill_alpha=0.0), "--distill-alpha must be in"),
        (dict(distill_alpha=1.5), "--distill-alpha must be in"),
        (dict(distill_temperature=0.0), "--distill-temperature must be > 0"),
        (dict(teacher="t.pt", model="parser"), "--distill: not with"),
    ],
)
def test_impossible_distillation_settings(kw, msg):
    with pytest.raises(BadInputError, match=msg):
        TrainConfig(**kw)


def test_a_student_equal_to_its_teacher_learns_nothing_at_alpha_1(tmp_path, tiny_npz):
    """alpha = 1: the loss is the KD term alone; a student that starts as its teacher has
    zero loss and zero gradient (up to rounding: SGD, since Adam would scale rounding
    noise up to full steps), so every weight stays where it was."""
    teacher = tmp_path / "dense.pt"
    train_tiny(tiny_npz, teacher, k=0)
    out = tmp_path / "student.pt"
    r = train_tiny(
        tiny_npz, out, k=0, init=str(teacher), teacher=str(teacher), distill_alpha=1.0,
        optimizer="sgd", lr=0.5, epochs=2,
    )  # fmt: skip
    assert r["step_path"] == "python"  # the one-call step has no teacher
    a, b = load_checkpoint(teacher)["state_dict"], load_checkpoint(out)["state_dict"]
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)
    losses = [
        e["train_loss"]
        for e in read_jsonl(out.with_suffix(".metrics.jsonl"))
        if e["event"] == "eval"
    ]
    assert losses and max(losses) < 1e-6
    train_tiny(tiny_npz, tmp_path / "ce.pt", k=0, init=str(teacher), optimizer="sgd", lr=0.5)
    c = load_checkpoint(tmp_path / "ce.pt")["state_dict"]
    assert any(not torch.allclose(a[k], c[k], rtol=0, atol=1e-4) for k in a)  # CE moves it
    plain = tmp_path / "plain.pt"
    mixed = tmp_path / "mixed.pt"
    train_tiny(tiny_npz, plain, k=0, init=str(teacher), dropout=0.2)
    train_tiny(tiny_npz, mixed, k=0, init=str(teacher), dropout=0.2, teacher=str(teacher))
    p, m = load_checkpoint(plain)["state_dict"], load_checkpoint(mixed)["state_dict"]
    assert any(not torch.equal(p[k], m[k]) for k in p)  # the teacher's term moved it


def test_a_missing_teacher_is_a_one_line_error(tmp_path, tiny_npz):
    with pytest.raises(MesimpError) as e:
        train_tiny(tiny_npz, tmp_path / "m.pt", k=0, teacher=str(tmp_path / "missing.pt"))
    assert "\n" not in str(e.value) and "missing.pt" in str(e.value)
