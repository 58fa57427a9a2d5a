"""``mesimp train`` under data parallelism: 2 CPU processes (gloo), as ``torchrun`` runs it.

The workers get torchrun's environment (``WORLD_SIZE``, ``RANK``, ``MASTER_*``) and call
the same ``train()`` as a single process; ``Distributed.from_env`` joins the group.
Checked: rank 0 writes alone, every rank holds the same masks, a run interrupted on one
rank stops on both and resumes bit-identical, 2 processes x batch 25 with per-example
selection decide the same masks as 1 process x batch 50, and ``mesimp train --nproc 2``
(a real torchrun) writes an ordinary checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from test_resume import DEV, assert_runs_identical, quiet_train

from mesimp.errors import BadInputError
from mesimp.files.checkpoint import load_checkpoint
from mesimp.simplify.rule import SimplifyConfig
from mesimp.training.config import TrainConfig
from mesimp.training.resume import resume_path
from mesimp.training.runsafety import TrainingInterrupted


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(data: Path, out: Path, **kw: Any) -> TrainConfig:
    """784-32-32-10 on the tiny data (500 training images): per rank 250, 10 steps of 25."""
    cfg: dict[str, Any] = dict(
        data=str(data),
        dev_size=DEV,
        hidden=32,
        epochs=3,
        batch_size=25,
        evals_per_epoch=2,
        output=str(out),
        seed=3,
        save_every=4,
        keep_last=True,
        k=6,
        selection="random",
        msbp=0.5,
        dropout=0.1,
        simplify=SimplifyConfig(prune_rate=0.12, points_per_epoch=3, cycle_epochs=1),
    )
    cfg.update(kw)
    return TrainConfig(**cfg)


def _worker(rank: int, world: int, port: int, job: dict[str, Any]) -> None:
    os.environ.update(
        WORLD_SIZE=str(world),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    replaced: list[str] = []  # every file this rank wrote (atomic writes end in os.replace)
    real_replace = os.replace

    def replace(src, dst, *a, **k):
        replaced.append(str(dst))
        return real_replace(src, dst, *a, **k)

    os.replace = replace
    calls = 0
    real_ce = F.cross_entropy

    def ce(*a, **k):  # SIGTERM to this rank only, at its training step `stop_at`
        nonlocal calls
        calls += 1
        if rank == job.get("stop_rank") and calls == job.get("stop_at"):
            os.kill(os.getpid(), signal.SIGTERM)
        return real_ce(*a, **k)

    F.cross_entropy = ce
    outcome: dict[str, Any] = {}
    try:
        cfg = TrainConfig.from_dict(job["config"]) if job.get("config") else None
        r = quiet_train(cfg, resume=job.get("resume"))
        outcome["result"] = r["best"]
    except TrainingInterrupted as e:
        outcome["interrupted"] = str(e)
    finally:
        os.replace = real_replace
        F.cross_entropy = real_ce
    outcome["wrote"] = replaced
    torch.save(outcome, f"{job['report']}.{rank}")


def run_two(tmp_path: Path, **job: Any) -> list[dict[str, Any]]:
    report = tmp_path / "reports" / f"report-{_free_port()}"
    report.parent.mkdir(exist_ok=True)
    job["report"] = str(report)
    mp.spawn(_worker, args=(2, _free_port(), job), nprocs=2, join=True)
    return [torch.load(f"{report}.{r}", weights_only=False) for r in (0, 1)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_npz) -> tuple[Path, list[dict[str, Any]]]:
    d = tmp_path_factory.mktemp("ddp-ref")
    out = d / "run" / "m.pt"
    return out, run_two(d, config=_config(tiny_npz, out).to_dict())


def test_rank_zero_writes_alone_and_the_checkpoint_is_ordinary(uninterrupted):
    out, (r0, r1) = uninterrupted
    assert r1["wrote"] == []
    assert {Path(p).name for p in r0["wrote"]} == {"m.pt", "m.metrics.jsonl", "m.last.pt"}
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.last.pt", "m.metrics.jsonl", "m.pt"]
    assert r0["result"] == r1["result"]  # the same model on both ranks, evaluated alike
    ckpt = torch.load(out, weights_only=True)  # an ordinary mesimp checkpoint
    assert ckpt["format"] == "mesimp.checkpoint" and "resume" not in ckpt


def test_every_rank_compacts_to_the_same_widths(uninterrupted):
    out, _ = uninterrupted
    ckpt = load_checkpoint(resume_path(out))
    r = ckpt["resume"]
    assert r["world_size"] == 2 and len(r["ranks"]) == 2
    a, b = r["ranks"]
    assert a["masks"].keys() == b["masks"].keys() and a["masks"]
    # both ranks removed the same units: the same (smaller) widths, nothing left masked
    assert all(torch.equal(a["masks"][n], b["masks"][n]) for n in a["masks"])
    assert all(bool(m.all()) for m in a["masks"].values())
    assert sum(ckpt["arch"]["hidden_sizes"]) < 64  # meSimp removed units from 32 + 32
    records = [json.loads(line) for line in out.with_name("m.metrics.jsonl").open()]
    assert any(rec["event"] == "compact" for rec in records)


def test_a_signal_to_one_rank_stops_both_and_the_resume_is_bit_identical(
    uninterrupted, tmp_path, tiny_npz
):
    ref, _ = uninterrupted
    out = tmp_path / "run" / "m.pt"
    cfg = _config(tiny_npz, out).to_dict()
    first = run_two(tmp_path, config=cfg, stop_rank=1, stop_at=6)
    assert all("interrupted" in r for r in first), first
    assert first[0]["interrupted"].startswith(
        "interrupted by a signal to another process at epoch 1 step 6;"
    )
    assert first[1]["interrupted"].startswith("interrupted by SIGTERM at epoch 1 step 6;")
    assert first[1]["wrote"] == []
    # the resume state holds each rank's own RNG stream, MSBP memory and counts
    a, b = load_checkpoint(resume_path(out))["resume"]["ranks"]
    assert not torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    for name, mem in a["msbp_memory"].items():
        assert mem is not None and not torch.equal(mem, b["msbp_memory"][name]), name
        assert not torch.equal(a["counters"][name]["hits"], b["counters"][name]["hits"]), name
    second = run_two(tmp_path, resume=str(resume_path(out)))
    assert all("result" in r for r in second)
    assert_runs_identical(ref, out)


def test_a_two_process_run_resumes_only_under_two_processes(uninterrupted, tmp_path):
    ref, _ = uninterrupted
    copy = tmp_path / "m.last.pt"
    copy.write_bytes(resume_path(ref).read_bytes())
    with pytest.raises(BadInputError, match="had 2 process"):
        quiet_train(resume=copy)


def test_two_processes_decide_the_masks_of_one_process_over_the_same_global_batches(
    tmp_path, tiny_npz
):
    """Per-example top-k: an example's selection depends on its own gradient only, so 2
    ranks x 25 examples count what 1 process x 50 counts (DistributedSampler's shards of
    one permutation make the same global batches)."""
    kw = dict(selection="topk", msbp=0.0, dropout=0.0, keep_last=False, epochs=2, compact=False)
    kw["sparse_update"] = False  # what DDP runs (dense updates) on both sides
    two = tmp_path / "two" / "m.pt"
    run_two(tmp_path, config=_config(tiny_npz, two, **kw).to_dict())
    one = tmp_path / "one" / "m.pt"
    quiet_train(_config(tiny_npz, one, batch_size=50, **kw))
    a, b = (load_checkpoint(p) for p in (two, one))
    masks = {n: s["mask"] for n, s in a["meprop"]["layers"].items()}
    assert any(not bool(m.all()) for m in masks.values())
    assert all(torch.equal(masks[n], s["mask"]) for n, s in b["meprop"]["layers"].items())
    for name, w in a["state_dict"].items():  # the same training, up to summation order
        assert torch.allclose(w, b["state_dict"][name], atol=1e-4), name


def test_cli_nproc_runs_torchrun_and_prints_one_result(tmp_path, tiny_npz):
    out = tmp_path / "m.pt"
    cmd = [sys.executable, "-c", "from mesimp.cli.main import main; main()", "train"]
    cmd += ["--nproc", "2", "--data", str(tiny_npz), "--dev-size", str(DEV), "--hidden", "16"]
    cmd += ["--k", "4", "--simplify", "--epochs", "1", "--batch-size", "25", "-o", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*cmd, "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)  # one JSON document: rank 1 printed nothing
    assert doc["checkpoint"] == str(out) and doc["config"]["sparse_update"] is False
    assert "2 processes: dense updates" in proc.stderr
    assert load_checkpoint(out)["arch"]["model"] == "mlp"


def test_nproc_inside_torchrun_is_refused(monkeypatch):
    from mesimp.training.distributed import relaunch, torchrun_command

    assert torchrun_command(2, ["train", "--k", "4"])[-5:] == [
        "-m",
        "mesimp.cli",
        "train",
        "--k",
        "4",
    ]
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(BadInputError, match="already a torchrun process"):
        relaunch(2, ["train"])
    with pytest.raises(BadInputError, match="--nproc must be >= 1"):
        torchrun_command(0, ["train"])
