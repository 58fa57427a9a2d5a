"""Resume and crash safety: exact resume after SIGTERM/SIGINT or a crash at any step, the
non-finite guard, config conflicts on --resume, and a real ``mesimp train`` subprocess
stopped with SIGTERM.

"Exact" means bit-identical on CPU: every tensor of the final best checkpoint and of the
final resume checkpoint (weights, counters, masks, optimizer state, RNG states, MSBP
memory) and every metrics record, wall-clock fields aside.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import DEV, read_jsonl
from mesimp.cli.main import main as cli_main

import mesimp.training.loop as loop_module
from mesimp.errors import BadInputError, CheckpointError, MesimpError
from mesimp.files.checkpoint import (
    NonFiniteError,
    load_checkpoint,
    make_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from mesimp.simplify.rule import SimplifyConfig
from mesimp.training.loop import (
    TrainConfig,
    TrainingDiverged,
    TrainingInterrupted,
    resume_config,
    resume_path,
    train,
)

WALL_CLOCK = {"elapsed_s", "train_time_s", "output"}  # output: each run writes elsewhere


def config(data: Path, out: Path, **kw: Any) -> TrainConfig:
    """784-32-32-10 on the tiny data: 10 steps of 50 per epoch, 3 epochs, 2 evals per epoch,
    a resume checkpoint every 4 steps (and at evaluations), kept at the end to compare."""
    cfg: dict[str, Any] = dict(
        data=str(data),
        hidden=32,
        layers=2,
        epochs=3,
        batch_size=50,
        dev_size=DEV,
        evals_per_epoch=2,
        output=str(out),
        seed=3,
        save_every=4,
        keep_last=True,
    )
    cfg.update(kw)
    return TrainConfig(**cfg)


def quiet_train(cfg: TrainConfig | None = None, **kw) -> dict:
    return train(cfg, progress=False, log=lambda _m: None, **kw)


class Fault:
    """Patches ``F.cross_entropy`` (called once per training step) to act at call ``at``:
    send ``signum`` to this process (the real signal path) or raise ``Crash``.

    The compiled one-call step (``mesimp.nn.fused``) computes its loss without
    ``F.cross_entropy``, so its entry point counts as that call; where it does not apply,
    the step's ``F.cross_entropy`` call that follows is not counted again."""

    def __init__(self, monkeypatch, at: int, signum: int | None = None) -> None:
        self.calls, self.at, self.signum = 0, at, signum
        self.counted = False  # the one-call step counted this step already
        real = F.cross_entropy
        real_step = loop_module.fused_train_step

        def act():
            self.calls += 1
            if self.calls == self.at:
                if self.signum is None:
                    raise Crash(f"crash at call {self.at}")
                os.kill(os.getpid(), self.signum)

        def patched(*a, **k):
            if self.counted:
                self.counted = False
            else:
                act()
            return real(*a, **k)

        def patched_step(*a, **k):
            act()
            done = real_step(*a, **k)
            self.counted = done is None
            return done

        monkeypatch.setattr(F, "cross_entropy", patched)
        monkeypatch.setattr(loop_module, "fused_train_step", patched_step)

        def undo():
            monkeypatch.setattr(F, "cross_entropy", real)
            monkeypatch.setattr(loop_module, "fused_train_step", real_step)

        self.undo = undo


class Crash(Exception):
    pass


def assert_same(a: Any, b: Any, where: str = "") -> int:
    """Recursive equality; tensors with ``torch.equal``; returns the tensors compared."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, where
        assert torch.equal(a, b), where
        return 1
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        return sum(assert_same(a[k], b[k], f"{where}.{k}") for k in a if k not in WALL_CLOCK)
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        pairs = enumerate(zip(a, b, strict=True))
        return sum(assert_same(x, y, f"{where}[{i}]") for i, (x, y) in pairs)
    assert a == b or (a != a and b != b), (where, a, b)  # NaN == NaN here
    return 0


def assert_runs_identical(ref: Path, other: Path) -> None:
    for name in (ref.name, resume_path(ref).name):
        a = torch.load(ref.with_name(name), weights_only=True)
        b = torch.load(other.with_name(name), weights_only=True)
        assert assert_same(a, b, name) > 0
    rec_a, rec_b = (read_jsonl(p.with_name(p.stem + ".metrics.jsonl")) for p in (ref, other))
    for rec in rec_a + rec_b:
        rec.pop("elapsed_s", None)
    assert rec_a == rec_b and any(r["event"] == "eval" for r in rec_a)


CASES = {
    "unified-msbp-mesimp": dict(
        k=8,
        selection="unified",
        msbp=0.5,
        simplify=SimplifyConfig(prune_rate=0.1, points_per_epoch=3, cycle_epochs=1),
    ),
    "topk-msbp": dict(k=8, selection="topk", msbp=0.8),
    "random-mesimp": dict(
        k=6, selection="random", simplify=SimplifyConfig(prune_rate=0.12, points_per_epoch=2)
    ),
    "dense-dropout-adagrad": dict(k=0, dropout=0.2, optimizer="adagrad", lr=0.01),
    "topk-dense-update": dict(k=8, selection="topk", sparse_update=False),
    # the cubic schedule on a compacted run: resumed, the model is rebuilt at its
    # compacted widths, and the target must stay a fraction of the starting ones
    "unified-cubic-warmup": dict(
        k=8,
        simplify=SimplifyConfig(
            points_per_epoch=2,
            cycle_epochs=0,
            warmup_epochs=1,
            schedule="cubic",
            target=0.25,
            target_epoch=3,
        ),
    ),
}
# SIGTERM at this global step of the first process, then a crash at this step of the
# resumed one (10 steps an epoch; simplify points at steps 4, 7, 10 or 5, 10)
FAULTS = {
    "unified-msbp-mesimp": (7, 9),  # at a simplify point of epoch 1 / epoch 2 step 6
    "topk-msbp": (10, 3),  # the last step of epoch 1 / epoch 2 step 3
    "random-mesimp": (13, 11),  # epoch 2 step 3 / epoch 3 step 4
    "dense-dropout-adagrad": (1, 6),  # the very first step / epoch 1 step 7
    "topk-dense-update": (19, 2),  # epoch 2 step 9 / the first step of epoch 3
    "unified-cubic-warmup": (16, 6),  # after the first cubic point (15) / epoch 3 step 2
}


@pytest.fixture(scope="module")
def references(tmp_path_factory, tiny_npz) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("ref")
    refs = {}
    for name, kw in CASES.items():
        refs[name] = d / name / "m.pt"
        quiet_train(config(tiny_npz, refs[name], **kw))
    return refs


@pytest.mark.parametrize("case", list(CASES))
def test_sigterm_then_crash_then_resume_is_bit_identical(
    case, references, tmp_path, tiny_npz, monkeypatch
):
    out = tmp_path / "m.pt"
    last = resume_path(out)
    sig_at, crash_at = FAULTS[case]
    before = signal.getsignal(signal.SIGTERM)

    fault = Fault(monkeypatch, sig_at, signal.SIGTERM)
    with pytest.raises(TrainingInterrupted) as e:
        quiet_train(config(tiny_npz, out, **CASES[case]))
    fault.undo()
    epoch, step = divmod(sig_at - 1, 10)
    assert str(e.value) == (
        f"interrupted by SIGTERM at epoch {epoch + 1} step {step + 1}; "
        f"resume with: mesimp train --resume {last}"
    )
    assert e.value.exit_code == 143
    assert signal.getsignal(signal.SIGTERM) is before  # handlers restored
    saved = load_checkpoint(last)["resume"]
    assert (saved["epoch"], saved["step"], saved["global_step"]) == (epoch, step + 1, sig_at)

    # resume, and crash somewhere later: no save at the crash, so the next resume replays
    # steps from the last periodic save (every 4 steps, and at evaluations)
    fault = Fault(monkeypatch, crash_at, None)
    with pytest.raises(Crash):
        quiet_train(resume=last)
    fault.undo()
    assert signal.getsignal(signal.SIGTERM) is before

    r = quiet_train(resume=last)
    assert r["checkpoint"] == str(out)
    assert_runs_identical(references[case], out)


@pytest.fixture
def sigint_delivered():
    """SIGINT handled as in a terminal: a background job (``make test &``, a script's
    ``&``) starts with SIGINT ignored, and ``train()`` leaves an ignored signal ignored
    (by design), so the test would see no signal at all."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_sigint_at_the_first_step_and_twice_in_a_row(
    references, tmp_path, tiny_npz, monkeypatch, sigint_delivered
):
    out = tmp_path / "m.pt"
    before = signal.getsignal(signal.SIGINT)
    for at in (1, 1):  # stop at step 1, resume, stop at the next step, resume to the end
        fault = Fault(monkeypatch, at, signal.SIGINT)
        with pytest.raises(TrainingInterrupted) as e:
            if resume_path(out).exists():
                quiet_train(resume=out)  # RUN.pt finds RUN.last.pt next to it
            else:
                quiet_train(config(tiny_npz, out, **CASES["topk-msbp"]))
        fault.undo()
        assert e.value.exit_code == 130 and "SIGINT" in str(e.value)
        assert signal.getsignal(signal.SIGINT) is before
    assert load_checkpoint(resume_path(out))["resume"]["global_step"] == 2
    quiet_train(resume=resume_path(out))
    assert_runs_identical(references["topk-msbp"], out)


def test_finished_run_removes_its_resume_checkpoint_unless_kept(tmp_path, tiny_npz):
    out = tmp_path / "m.pt"
    for name in (".m.last.pt.k9x2ab_1.tmp", ".m.pt.0a1b2c3d.tmp"):  # litter of a kill -9
        (tmp_path / name).write_bytes(b"half a checkpoint")
    r = quiet_train(config(tiny_npz, out, epochs=1, keep_last=False, k=4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.metrics.jsonl", "m.pt"]
    with pytest.raises(CheckpointError, match="no training state"):
        quiet_train(resume=out)

    kept = quiet_train(config(tiny_npz, out, epochs=1, k=4))
    assert kept["best"] == r["best"]
    ck = load_checkpoint(resume_path(out))
    assert ck["resume"]["complete"] and ck["resume"]["global_step"] == 10
    # a finished run resumes to the same summary without training a step
    again = quiet_train(resume=resume_path(out))
    assert again["best"] == kept["best"] and again["final"] == kept["final"]
    # the resume checkpoint is an ordinary checkpoint: info/shrink tools can read it
    model = model_from_checkpoint(ck)
    assert [m.out_features for m in model if isinstance(m, torch.nn.Linear)] == [32, 32, 10]


def test_a_second_process_on_the_same_output_is_refused(tmp_path, tiny_npz):
    fcntl = pytest.importorskip("fcntl")
    out = tmp_path / "m.pt"
    fd = os.open(tmp_path / ".m.pt.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running `mesimp train` does
    (tmp_path / ".m.pt.12345678.tmp").write_bytes(b"another writer's file in flight")
    try:
        with pytest.raises(MesimpError, match="another running 'mesimp train'") as e:
            quiet_train(config(tiny_npz, out, k=4, epochs=1))
        assert "\n" not in str(e.value) and e.value.exit_code == 1
        assert (tmp_path / ".m.pt.12345678.tmp").exists()  # not touched
    finally:
        os.close(fd)  # the process "ends": its lock goes with it
    quiet_train(config(tiny_npz, out, k=4, epochs=1, keep_last=False))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.metrics.jsonl", "m.pt"]


# --------------------------------------------------------------------------------------
# --resume with other options
# --------------------------------------------------------------------------------------
@pytest.fixture
def interrupted(tmp_path, tiny_npz, monkeypatch) -> Path:
    out = tmp_path / "m.pt"
    fault = Fault(monkeypatch, 5, signal.SIGTERM)
    with pytest.raises(TrainingInterrupted):
        quiet_train(config(tiny_npz, out, k=8))
    fault.undo()
    return resume_path(out)


def test_resume_config_checkpoint_wins_and_conflicts_are_refused(interrupted, tiny_npz):
    cfg = resume_config(interrupted, {"epochs": 3, "k": 8, "hidden": [32], "threads": 1})
    assert cfg.epochs == 3 and cfg.threads == 1 and cfg.save_every == 4
    cfg = resume_config(interrupted, {"save_every": 2, "keep_last": False})
    assert cfg.save_every == 2 and not cfg.keep_last  # runtime options may change

    with pytest.raises(BadInputError) as e:
        resume_config(interrupted, {"epochs": 5, "lr": 0.1, "simplify": True, "prune_rate": 0.2})
    msg = str(e.value)
    assert "\n" not in msg
    for part in ("--epochs 5 (the run has 3)", "--lr 0.1", "--simplify True", "--prune-rate"):
        assert part in msg

    # the Python API: a config given with resume= must agree with the checkpoint's
    with pytest.raises(BadInputError, match="epochs=4"):
        quiet_train(
            config(tiny_npz, interrupted.with_name("m.pt"), k=8, epochs=4), resume=interrupted
        )


def test_cli_resume_refuses_conflicting_options_in_one_line(interrupted, capsys):
    def run(*args) -> tuple[int, str, str]:
        with pytest.raises(SystemExit) as e:
            cli_main([str(a) for a in args])
        cap = capsys.readouterr()
        return e.value.code, cap.out, cap.err

    code, out, err = run("train", "--resume", interrupted, "--epochs", "9", "--no-progress")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: --resume ") and "--epochs 9" in err

    code, out, err = run("train", "--resume", interrupted.with_name("nope.pt"))
    assert code == 2 and err.count("\n") == 1 and "no such file" in err

    code, out, err = run(
        "train", "--resume", interrupted, "--k", "8", "--threads", "1", "--no-progress", "--json"
    )
    assert code == 0, err
    assert json.loads(out)["checkpoint"] == str(interrupted.with_name("m.pt"))
    assert load_checkpoint(interrupted)["resume"]["complete"]  # keep_last from the run


def test_resume_with_other_data_is_refused(interrupted, tmp_path, fmnist_small):
    other = tmp_path / "other.npz"
    np.savez(other, **{k: v[::-1].copy() for k, v in fmnist_small.items()})
    cfg = TrainConfig.from_dict(load_checkpoint(interrupted)["train"]["config"])
    cfg.data = str(other)
    with pytest.raises(BadInputError, match="data"):
        quiet_train(cfg, resume=interrupted)  # data differs from the checkpoint's config
    ck = load_checkpoint(interrupted)
    ck["train"]["config"]["data"] = str(other)  # the run's own config names other data
    save_checkpoint(interrupted, ck)
    with pytest.raises(BadInputError, match="differs"):
        quiet_train(resume=interrupted)


def test_old_train_configs_without_new_fields_still_load():
    old = TrainConfig(k=8).to_dict()
    for key in ("save_every", "keep_last"):
        del old[key]
    old["some_future_field"] = 1
    cfg = TrainConfig.from_dict(old)
    assert cfg.k == 8 and cfg.save_every == 1000 and not cfg.keep_last


# --------------------------------------------------------------------------------------
# non-finite guard
# --------------------------------------------------------------------------------------
class _NanGrad(torch.autograd.Function):
    """Identity forward (a finite loss), NaN backward: only the gradient check sees it."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


@pytest.mark.parametrize(
    "kind, at, message, kept",
    [
        ("loss", 7, "loss is nan at epoch 1 step 7", 5),
        ("grad", 10, "the gradient of 0.weight holds NaN/Inf at epoch 1 step 10", 8),
        # gradients are checked every 10th step: in between, NaN weights give a NaN loss
        ("grad", 7, "loss is nan at epoch 1 step 8", 5),
    ],
    ids=["loss", "grad-checked", "grad-between-checks"],
)
def test_nan_stops_training_keeps_good_checkpoints_and_the_run_resumes(
    kind, at, message, kept, references, tmp_path, tiny_npz, monkeypatch
):
    out = tmp_path / "m.pt"
    real, calls = F.cross_entropy, [0]

    def poisoned(*a, **k):
        calls[0] += 1
        loss = real(*a, **k)
        if calls[0] == at:  # RUN.last.pt is written at steps 4, 5 (eval), 8, 10 (eval)...
            return loss * float("nan") if kind == "loss" else _NanGrad.apply(loss)
        return loss

    monkeypatch.setattr(F, "cross_entropy", poisoned)
    # the poison is in F.cross_entropy, which the one-call compiled step does not call:
    # take the step through loss.backward() (the same bits: test_kernels.py); the
    # compiled step's own guards are tested in test_kernels.py
    monkeypatch.setattr(loop_module, "fused_train_step", lambda *a, **k: None)
    with pytest.raises(TrainingDiverged) as e:
        quiet_train(config(tiny_npz, out, **CASES["topk-msbp"]))
    monkeypatch.setattr(F, "cross_entropy", real)
    monkeypatch.undo()
    msg = str(e.value)
    assert "\n" not in msg and e.value.exit_code == 1
    assert message in msg and "try a lower --lr" in msg
    assert f"{out} (best on dev), {resume_path(out)} (epoch 1 step {kept})" in msg

    for path in (out, resume_path(out)):  # the last good checkpoints, finite
        ck = torch.load(path, weights_only=True)
        assert all(torch.isfinite(v).all() for v in ck["state_dict"].values())
    assert load_checkpoint(resume_path(out))["resume"]["global_step"] == kept
    # a transient fault: resuming from the last good state reproduces the clean run
    quiet_train(resume=resume_path(out))
    assert_runs_identical(references["topk-msbp"], out)


def test_huge_learning_rate_diverges_without_writing_nan(tmp_path, tiny_npz):
    out = tmp_path / "m.pt"
    with pytest.raises(TrainingDiverged, match=r"diverged: .* at epoch 1 step \d+"):
        quiet_train(config(tiny_npz, out, k=0, optimizer="sgd", lr=1e6, save_every=1))
    ck = load_checkpoint(resume_path(out))
    assert all(torch.isfinite(v).all() for v in ck["state_dict"].values())
    assert not list(tmp_path.glob(".*.tmp"))


def test_save_checkpoint_refuses_nonfinite_tensors(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    arch = {"model": "mlp", "in_features": 3, "hidden_sizes": [], "out_features": 2}
    path = tmp_path / "m.pt"
    save_checkpoint(path, make_checkpoint(model, arch))
    good = path.read_bytes()

    with torch.no_grad():
        model[0].weight[1, 2] = float("nan")
    with pytest.raises(NonFiniteError, match=r"state_dict\.0\.weight"):
        save_checkpoint(path, make_checkpoint(model, arch))
    ck = make_checkpoint(torch.nn.Sequential(torch.nn.Linear(3, 2)), arch)
    ck["resume"] = {"optimizer": {"state": {0: {"exp_avg_sq": torch.tensor([1.0, float("inf")])}}}}
    with pytest.raises(NonFiniteError, match=r"resume\.optimizer\.state\.0\.exp_avg_sq"):
        save_checkpoint(path, ck)
    assert path.read_bytes() == good and os.listdir(tmp_path) == ["m.pt"]
    ck["state_dict"]["huge"] = torch.full((4,), 3e38)  # sums overflow, values are finite
    ck["resume"] = {}
    save_checkpoint(path, ck)
    save_checkpoint(tmp_path / "nan.pt", make_checkpoint(model, arch), allow_nonfinite=True)


# --------------------------------------------------------------------------------------
# a real process, a real SIGTERM
# --------------------------------------------------------------------------------------
def test_sigterm_to_a_real_mesimp_train_process(tmp_path, tiny_npz):
    """Stop ``mesimp train`` with SIGTERM once it is stepping, resume it in a new process,
    and compare with the same run done in one go (in this process: one thread both)."""
    out = tmp_path / "run" / "m.pt"
    opts = ["--data", tiny_npz, "--dev-size", DEV, "--hidden", "64,64", "--k", "8"]
    opts += ["--epochs", "60", "--seed", "5", "--threads", "1", "--save-every", "0"]
    cmd = [sys.executable, "-c", "from mesimp.cli.main import main; main()", "train"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def start(*args) -> subprocess.Popen:
        return subprocess.Popen(
            [*cmd, *map(str, args), "--no-progress"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            text=True,
        )

    proc = start(*opts, "-o", out)
    log = out.with_name("m.metrics.jsonl")  # written at the first evaluation (step 10)
    deadline = time.monotonic() + 60
    while not log.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err
    assert errors[0].startswith("error: interrupted by SIGTERM at epoch ")
    assert errors[0].endswith(f"; resume with: mesimp train --resume {resume_path(out)}")
    state = torch.load(resume_path(out), weights_only=True)  # loads, plain torch
    assert 10 <= state["resume"]["global_step"] < 600  # stopped while stepping

    proc = start("--resume", resume_path(out), "--json")
    stdout, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert json.loads(stdout)["checkpoint"] == str(out)
    assert not resume_path(out).exists()  # a finished run removes it

    ref = tmp_path / "ref" / "m.pt"
    quiet_train(
        TrainConfig(
            data=str(tiny_npz),
            dev_size=DEV,
            hidden=[64, 64],
            k=8,
            epochs=60,
            seed=5,
            threads=1,
            save_every=0,
            output=str(ref),
        )
    )
    a, b = (torch.load(p, weights_only=True) for p in (ref, out))
    assert assert_same(a, b) > 0
    rec_a, rec_b = (read_jsonl(p.with_name("m.metrics.jsonl")) for p in (ref, out))
    for rec in rec_a + rec_b:
        rec.pop("elapsed_s", None)
    assert rec_a == rec_b
