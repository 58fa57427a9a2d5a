"""The one training loop across model families: resume, MSBP, optimizers, --init.

The MLP's resume and run-safety tests are in test_resume.py; these check that the LSTM
tagger and the CNN get the same machinery from the same loop: a run interrupted by
SIGTERM (and then a crash) and resumed ends bit-identical to the run done in one go,
in-process and through a real ``mesimp train`` process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import mesimp.cli.commands  # noqa: F401  (registers the commands)
import pytest
import torch
from mesimp.cli.main import main
from test_resume import DEV, Crash, Fault, assert_runs_identical, assert_same, quiet_train
from test_seqtrain import ewt  # noqa: F401  (the EWT slices fixture)

from mesimp.errors import BadInputError
from mesimp.files.checkpoint import load_checkpoint
from mesimp.simplify.rule import SimplifyConfig
from mesimp.training.config import TrainConfig
from mesimp.training.resume import resume_path
from mesimp.training.runsafety import TrainingInterrupted

SIMP = SimplifyConfig(prune_rate=0.1, points_per_epoch=3, cycle_epochs=1)


def family_config(family: str, data: dict[str, Path], out: Path, **kw: Any) -> TrainConfig:
    """10 steps an epoch, 3 epochs, 2 evaluations an epoch, RUN.last.pt every 4 steps."""
    if family == "lstm-tagger":  # 300 training sentences, 30 a batch
        base = dict(
            train_file=str(data["train"]),
            dev_file=str(data["dev"]),
            test_file=str(data["test"]),
            hidden=[12, 10],
            emb_dim=8,
            batch_size=30,
            lr=1e-2,
        )
    else:  # cnn on the tiny images: 500 training images, 50 a batch
        base = dict(data=str(data["npz"]), dev_size=DEV, hidden=[4, 6], batch_size=50)
    cfg = dict(
        model=family,
        epochs=3,
        evals_per_epoch=2,
        output=str(out),
        seed=3,
        save_every=4,
        keep_last=True,
        **base,
    )
    cfg.update(kw)
    return TrainConfig(**cfg)


CASES = {
    "tagger-unified-mesimp-msbp": ("lstm-tagger", dict(k=4, msbp=0.5, simplify=SIMP)),
    "tagger-topk-adagrad": ("lstm-tagger", dict(k=3, selection="topk", optimizer="adagrad")),
    "tagger-random-sgd-mesimp": (
        "lstm-tagger",
        dict(k=5, selection="random", optimizer="sgd", lr=0.1, simplify=SIMP),
    ),
    "cnn-unified-mesimp": ("cnn", dict(k=2, simplify=SIMP)),
    "cnn-topk-msbp-adagrad": ("cnn", dict(k=3, selection="topk", msbp=0.5, optimizer="adagrad")),
}
# SIGTERM at this global step of the first process, then a crash at this step of the
# resumed one (10 steps an epoch; simplify points at steps 4, 7, 10 of every epoch)
FAULTS = {
    "tagger-unified-mesimp-msbp": (7, 9),
    "tagger-topk-adagrad": (10, 3),
    "tagger-random-sgd-mesimp": (13, 11),
    "cnn-unified-mesimp": (4, 6),
    "cnn-topk-msbp-adagrad": (1, 12),
}


@pytest.fixture(scope="module")
def data(ewt, tiny_npz) -> dict[str, Path]:  # noqa: F811
    train, dev, test = ewt
    return {"train": train, "dev": dev, "test": test, "npz": tiny_npz}


@pytest.fixture(scope="module")
def references(tmp_path_factory, data) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("ref")
    refs = {}
    for name, (family, kw) in CASES.items():
        refs[name] = d / name / "m.pt"
        quiet_train(family_config(family, data, refs[name], **kw))
    return refs


@pytest.mark.parametrize("case", list(CASES))
def test_sigterm_then_crash_then_resume_is_bit_identical(
    case, references, data, tmp_path, monkeypatch
):
    family, kw = CASES[case]
    out = tmp_path / "m.pt"
    last = resume_path(out)
    sig_at, crash_at = FAULTS[case]

    fault = Fault(monkeypatch, sig_at, signal.SIGTERM)
    with pytest.raises(TrainingInterrupted) as e:
        quiet_train(family_config(family, data, out, **kw))
    fault.undo()
    epoch, step = divmod(sig_at - 1, 10)
    assert str(e.value).startswith(f"interrupted by SIGTERM at epoch {epoch + 1} step {step + 1};")
    saved = load_checkpoint(last)["resume"]
    assert (saved["epoch"], saved["step"], saved["global_step"]) == (epoch, step + 1, sig_at)

    fault = Fault(monkeypatch, crash_at, None)
    with pytest.raises(Crash):
        quiet_train(resume=last)
    fault.undo()
    quiet_train(resume=last)
    assert_runs_identical(references[case], out)


def test_the_reference_runs_did_what_their_names_say(references):
    """The resume cases exercise what they claim: meSimp removed units (compacted: the
    checkpoint's widths are narrower than the configured ones, and no mask is left),
    MSBP kept a memory, and the optimizer state is the named optimizer's."""
    for name, (family, kw) in CASES.items():
        last = load_checkpoint(resume_path(references[name]))
        assert last["arch"]["model"] == family
        state = last["resume"]["optimizer"]["state"]
        keys = set().union(*(s.keys() for s in state.values()))
        want = {"adam": "exp_avg", "adagrad": "sum", "sgd": None}[kw.get("optimizer", "adam")]
        assert (want in keys) if want else not keys, (name, keys)
        memory = last["resume"]["msbp_memory"]
        assert memory, name  # the meProp layers
        has_memory = any(m is not None and bool(m.abs().sum() > 0) for m in memory.values())
        if "simplify" not in kw:  # a simplify point (the last step) clears the memory
            assert has_memory == ("msbp" in kw), name
        if "simplify" in kw and kw.get("selection") != "random":
            # (random-k counts are uniform: none falls below the keep rule; it still counts)
            best = torch.load(references[name], weights_only=True)
            masked = [int((~s["mask"]).sum()) for s in best["meprop"]["layers"].values()]
            assert not any(masked), (name, masked)
            cfg = TrainConfig.from_dict(best["train"]["config"])
            widths = best["arch"].get("channels") or best["arch"]["hidden"]
            widths = widths if isinstance(widths, list) else [widths]
            assert sum(widths) < sum(cfg.hidden_sizes()), (name, widths)


# --------------------------------------------------------------------------------------
# a real `mesimp train` process, a real SIGTERM, per family
# --------------------------------------------------------------------------------------
def _cli_options(family: str, data: dict[str, Path]) -> list[str]:
    if family == "lstm-tagger":
        files = ["--train", data["train"], "--dev", data["dev"], "--test", data["test"]]
        return [*files, "--hidden", "12", "--emb-dim", "8", "--batch-size", "30", "--lr", "0.01"]
    return ["--data", data["npz"], "--dev-size", DEV, "--hidden", "4,6"]


@pytest.mark.parametrize("family", ["lstm-tagger", "cnn"])
def test_sigterm_to_a_real_mesimp_train_process(family, data, tmp_path):
    out = tmp_path / "run" / "m.pt"
    opts = ["--model", family, *_cli_options(family, data), "--k", "3", "--simplify"]
    opts += ["--prune-rate", "0.1", "--msbp", "0.5", "--epochs", "40", "--seed", "5"]
    opts += ["--threads", "1", "--save-every", "0"]
    cmd = [sys.executable, "-c", "from mesimp.cli.main import main; main()", "train"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def start(*args: object) -> subprocess.Popen:
        return subprocess.Popen(
            [*cmd, *map(str, args), "--no-progress"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            text=True,
        )

    proc = start(*opts, "-o", out)
    log = out.with_name("m.metrics.jsonl")  # written at the first evaluation
    deadline = time.monotonic() + 120
    while not log.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1].startswith("error: interrupted by SIGTERM at epoch ")
    steps = torch.load(resume_path(out), weights_only=True)["resume"]["global_step"]
    assert 10 <= steps < 400, steps  # stopped while stepping

    proc = start("--resume", resume_path(out))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert not resume_path(out).exists()

    ref = tmp_path / "ref" / "m.pt"  # the same command in one go, in this process
    with pytest.raises(SystemExit) as e:
        main([*map(str, ["train", *opts, "-o", ref]), "--no-progress"])
    assert e.value.code in (0, None)
    a, b = (torch.load(p, weights_only=True) for p in (ref, out))
    assert assert_same(a["state_dict"], b["state_dict"]) > 0
    assert assert_same(a["meprop"], b["meprop"]) > 0
    assert a["train"]["metrics"] == b["train"]["metrics"]


# --------------------------------------------------------------------------------------
# options that apply to every family
# --------------------------------------------------------------------------------------
def test_tagger_msbp_and_adagrad_train_and_change_the_result(data, tmp_path):
    """MSBP and the optimizer reach the tagger's layers: each changes the trained weights,
    and the run stays deterministic for a seed."""
    runs = {}
    for name, kw in {
        "plain": {},
        "msbp": {"msbp": 0.5},
        "adagrad": {"optimizer": "adagrad", "lr": 0.05},
        "msbp-again": {"msbp": 0.5},
    }.items():
        out = tmp_path / name / "m.pt"
        cfg = family_config("lstm-tagger", data, out, k=3, selection="topk", epochs=1, **kw)
        r = quiet_train(cfg)
        assert 0.0 < r["best"]["test_accuracy"] <= 1.0
        runs[name] = torch.load(out, weights_only=True)["state_dict"]
    w = "stack.lstms.0.weight_hh_l0"
    assert not torch.equal(runs["plain"][w], runs["msbp"][w])
    assert not torch.equal(runs["plain"][w], runs["adagrad"][w])
    assert torch.equal(runs["msbp"][w], runs["msbp-again"][w])


def test_tagger_init_fine_tunes_with_its_masks_and_checks_the_vocabulary(data, tmp_path):
    first = tmp_path / "a.pt"  # masked (not compacted): --init carries the masks
    cfg = family_config("lstm-tagger", data, first, k=3, simplify=SIMP, epochs=2, compact=False)
    quiet_train(cfg)
    masks = {n: s["mask"] for n, s in load_checkpoint(first)["meprop"]["layers"].items()}
    assert any(not bool(m.all()) for m in masks.values())
    tuned = tmp_path / "b.pt"
    quiet_train(family_config("lstm-tagger", data, tuned, k=3, epochs=1, init=str(first)))
    after = load_checkpoint(tuned)["meprop"]["layers"]
    assert all(torch.equal(after[n]["mask"], m) for n, m in masks.items())
    # compacted: the checkpoint is at the active widths, and --init trains at them
    small = tmp_path / "small.pt"
    quiet_train(family_config("lstm-tagger", data, small, k=3, simplify=SIMP, epochs=2))
    widths = load_checkpoint(small)["arch"]["hidden"]
    assert sum(widths) < 22  # (equal to the masked run's only in float64)
    quiet_train(family_config("lstm-tagger", data, tmp_path / "s2.pt", epochs=1, init=str(small)))
    assert load_checkpoint(tmp_path / "s2.pt")["arch"]["hidden"] == widths
    # another training file makes another vocabulary: its word ids mean other words
    other = tmp_path / "other.conllu"
    other.write_text(data["dev"].read_text() + data["test"].read_text())
    bad = family_config("lstm-tagger", data, tmp_path / "c.pt", init=str(first))
    bad.train_file = str(other)
    with pytest.raises(BadInputError, match="does not match the data"):
        quiet_train(bad)
    # an image model cannot be the start of a tagger
    cnn = tmp_path / "cnn.pt"
    quiet_train(family_config("cnn", data, cnn, epochs=1))
    with pytest.raises(BadInputError, match="holds a cnn model"):
        quiet_train(family_config("lstm-tagger", data, tmp_path / "d.pt", init=str(cnn)))


def test_evals_per_epoch_applies_to_the_tagger(data, tmp_path):
    out = tmp_path / "m.pt"
    quiet_train(family_config("lstm-tagger", data, out, epochs=1, evals_per_epoch=5))
    log = out.with_name("m.metrics.jsonl").read_text().splitlines()
    assert sum('"event": "eval"' in line for line in log) == 5


# --------------------------------------------------------------------------------------
# a user's own model and data through the same loop
# --------------------------------------------------------------------------------------
def _own(seed: int = 0) -> tuple[torch.nn.Module, Any]:
    from mesimp.data.tasks import Task

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(600, 12, generator=g)
    y = (x[:, :3].sum(1) > 0).long() + (x[:, 3] > 1).long()  # 3 classes, learnable
    task = Task("mine", x[:400], y[:400], x[400:500], y[400:500], x[500:], y[500:], arch={})
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Linear(12, 32),
        torch.nn.ReLU(),
        torch.nn.Linear(32, 24),
        torch.nn.LayerNorm(24),  # a graph the MLP builder would not make
        torch.nn.ReLU(),
        torch.nn.Linear(24, 3),
    )
    return net, task


def test_a_users_model_and_task_train_simplify_and_resume_in_the_one_loop(tmp_path, monkeypatch):
    def cfg(out: Path) -> TrainConfig:
        return TrainConfig(
            k=6, simplify=SIMP, epochs=3, batch_size=40, evals_per_epoch=2, lr=1e-2,
            output=str(out), save_every=4, keep_last=True, seed=4,
        )  # fmt: skip

    ref = tmp_path / "ref" / "m.pt"
    net, task = _own()
    r = quiet_train(cfg(ref), task=task, model=net)
    assert r["model"] == "custom" and r["best"]["test_accuracy"] > 0.6
    best = load_checkpoint(ref)
    assert set(best["meprop"]["layers"]) == {"0", "2"}  # the output layer stays plain
    # simplified and compacted, the layer a LayerNorm reads too (the norm is mask-aware)
    assert best["state_dict"]["0.weight"].shape[0] < 32
    assert best["state_dict"]["2.weight"].shape[0] == best["state_dict"]["3.weight"].shape[0] < 24
    assert set(best["arch"]["compacted"]) == {"0", "2"}  # how to compact the model again
    # interrupted and resumed with the same model and task: the same run
    out = tmp_path / "run" / "m.pt"
    net2, task2 = _own()
    fault = Fault(monkeypatch, 11, signal.SIGTERM)
    with pytest.raises(TrainingInterrupted):
        quiet_train(cfg(out), task=task2, model=net2)
    fault.undo()
    net3, _ = _own(seed=9)  # other initial weights: the resume loads the run's
    quiet_train(resume=resume_path(out), task=task2, model=net3)
    assert_runs_identical(ref, out)


def test_old_module_paths_still_import_with_a_deprecation_warning():
    import importlib
    import sys

    import mesimp.simplify.checkpoint_shrink as new

    for name in ("mesimp.checkpoint_shrink", "mesimp.seqtrain"):
        sys.modules.pop(name, None)
    with pytest.warns(DeprecationWarning, match="moved to mesimp.simplify.checkpoint_shrink"):
        old = importlib.import_module("mesimp.checkpoint_shrink")
    assert old is new and old.shrink_checkpoint is new.shrink_checkpoint
    with pytest.warns(DeprecationWarning, match="mesimp.training.sequence"):
        from mesimp.seqtrain import train_lstm  # noqa: F401  (the README's old example)
