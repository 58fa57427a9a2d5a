"""The benchmark suite (``python -m benchmarks.run``): the quick run end to end, and the
checks that stop an incomplete result from being written up as a clean one.

The quick suite trains every row on tiny subsets (about 15 s on 2 cores); it runs
twice here, once with Torch-Pruning available (if installed) and once as if it were
not, since CI need not have it.
"""

from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

# benchmarks/ is a folder of the repository, not an installed package; pytest puts only
# tests/ on sys.path (a `pythonpath = ["."]` in the pytest config would make this moot).
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import run as bench_run  # noqa: E402
from benchmarks.suite import tp  # noqa: E402
from benchmarks.suite.claims import beats, no_loss  # noqa: E402
from benchmarks.suite.config import EWT  # noqa: E402
from benchmarks.suite.report import PLOTS, build_report  # noqa: E402
from benchmarks.suite.results import (  # noqa: E402
    EXPECTED,
    OK,
    IncompleteResults,
    bad_run,
    check_results,
    new_row,
    ok_run,
)
from mesimp.nn import kernels  # noqa: E402

FMNIST = Path("/usr/share/datasets/fashion-mnist")


def _strict_json(path: Path) -> Any:
    def refuse(name: str) -> None:
        raise ValueError(f"{path}: non-standard JSON constant {name}")

    return json.loads(path.read_text(), parse_constant=refuse)


def _run_quick(out: Path) -> tuple[int, dict[str, Any]]:
    if not FMNIST.is_dir():
        pytest.skip(f"Fashion-MNIST not found under {FMNIST}")
    if not EWT.is_dir():  # ../shared/data: a clone outside the workspace has none
        pytest.skip(f"UD English EWT not found under {EWT}")
    rc = bench_run.main(["--quick", "--out", str(out)])
    return rc, _strict_json(out / "results.json")


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[int, Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("quick")
    rc, results = _run_quick(out)
    return rc, out, results


def _rows(results: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(r["section"], r["key"]): r for r in results["rows"]}


def test_quick_run_writes_every_row_with_finite_numbers(quick):
    rc, out, results = quick
    assert rc == 0, results.get("problems")
    assert results["problems"] == []
    assert check_results(results) == []
    rows = _rows(results)
    for section, keys in EXPECTED.items():
        for key in keys:
            assert (section, key) in rows, f"{section}/{key} missing"
    for row in results["rows"]:
        where = f"{row['section']}/{row['key']}"
        if row["status"] != OK:
            assert row["reason"], f"{where}: {row['status']} without a reason"
        for run in row["runs"]:
            if run["status"] == OK:
                for name in ("test_accuracy", "params", "train_time_s", "time_ratio"):
                    assert math.isfinite(run[name]), f"{where} seed {run['seed']}: {name}"
                assert 0.0 <= run["test_accuracy"] <= 1.0
                assert all(w > 0 for w in run["widths"])
            else:
                assert run["reason"], f"{where} seed {run['seed']}"
        for b in row.get("backward") or []:
            assert math.isfinite(b["ratio"]) and b["ratio"] > 0, where
    # the rows that must have run (not skipped) in any environment
    for key in ("dense", "meprop_unified", "random_k", "msbp", "mesimp", "dense_same"):
        assert rows[("mlp", key)]["status"] == OK, key
    for key in ("dense", "meprop", "mesimp", "dense_same"):
        assert rows[("lstm", key)]["status"] == OK, key
    # meSimp really shrank, and the same-size baselines use its widths
    ms = rows[("mlp", "mesimp")]["runs"][0]["widths"]
    assert sum(ms) < 2 * results["config"]["mlp"]["hidden"]
    assert rows[("mlp", "dense_same")]["runs"][0]["widths"] == ms
    # onnxruntime numbers for the shrunk MLP and the shrunk tagger
    for key in ("fp32_b1", "fp32_b256", "int8_b1", "int8_b256"):
        assert rows[("mlp", "mesimp")]["ort"][key] > 0
        assert rows[("lstm", "mesimp")]["ort"][key] > 0


def test_quick_run_writes_the_report_and_plots(quick):
    _, out, results = quick
    text = (out / "RESULTS.md").read_text()
    assert text.startswith("# Benchmark results (QUICK MODE")
    assert "INCOMPLETE" not in text
    for heading in ("## Project goals", "## A. MLP", "## B. LSTM", "## The papers' claims"):
        assert heading in text
    assert "--quick" in text and "## Machine" in text
    for c in results["verdicts"]["claims"]:
        assert c["title"] in text
    if results["plots"].get("note"):
        assert "Not drawn" in text
    else:
        for name in PLOTS.values():
            assert (out / name).stat().st_size > 1000
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_torch_pruning_rows(quick):
    _, _, results = quick
    rows = _rows(results)
    mlp_tp, lstm_tp = rows[("mlp", "tp")], rows[("lstm", "tp")]
    if not tp.available():
        assert mlp_tp["status"] == lstm_tp["status"] == "skipped"
        return
    # exact widths: the pruned MLP has the meSimp widths of the same seed
    ms = rows[("mlp", "mesimp")]["runs"][0]["widths"]
    assert mlp_tp["status"] == OK and mlp_tp["runs"][0]["widths"] == ms
    # the LSTM attempt is a result either way, never a crash
    assert lstm_tp["status"] in (OK, "failed")
    if lstm_tp["status"] == "failed":
        assert "torch-pruning" in lstm_tp["reason"]


def test_quick_run_without_torch_pruning(tmp_path, monkeypatch):
    monkeypatch.setattr(tp, "available", lambda: False)
    rc, results = _run_quick(tmp_path)
    assert rc == 0, results["problems"]
    rows = _rows(results)
    for section in ("mlp", "lstm"):
        row = rows[(section, "tp")]
        assert row["status"] == "skipped"
        assert "pip install '.[bench]'" in row["reason"]


def test_quick_refuses_to_write_into_benchmarks(capsys):
    before = {p: p.stat().st_mtime_ns for p in bench_run.BENCH_DIR.iterdir() if p.is_file()}
    assert bench_run.main(["--quick"]) == 2
    assert bench_run.main(["--quick", "--out", str(bench_run.BENCH_DIR / "other.md")]) == 2
    assert "never writes into benchmarks/" in capsys.readouterr().err
    after = {p: p.stat().st_mtime_ns for p in bench_run.BENCH_DIR.iterdir() if p.is_file()}
    assert after == before


# -- the completeness check fails when it should ---------------------------------------------
def test_report_refuses_a_nan(quick):
    results = copy.deepcopy(quick[2])
    row = _rows(results)[("mlp", "mesimp")]
    row["runs"][0]["test_accuracy"] = float("nan")
    with pytest.raises(IncompleteResults, match="mlp/mesimp: seed 1: test_accuracy"):
        build_report(results)
    text = build_report(results, strict=False)
    assert "**INCOMPLETE RESULTS**" in text


def test_report_refuses_a_missing_row(quick):
    results = copy.deepcopy(quick[2])
    results["rows"] = [r for r in results["rows"] if r["key"] != "msbp"]
    with pytest.raises(IncompleteResults) as e:
        build_report(results)
    assert e.value.problems == ["mlp/msbp: row missing"]


def test_report_refuses_a_missing_seed_and_silent_skips(quick):
    results = copy.deepcopy(quick[2])
    results["config"]["seeds"] = [1, 2]
    problems = check_results(results)
    assert any("mlp/dense: runs for seeds [1], expected [1, 2]" == p for p in problems)
    results = copy.deepcopy(quick[2])
    row = _rows(results)[("lstm", "meprop")]
    row.update(status="skipped", reason="", runs=[])
    assert check_results(results) == ["lstm/meprop: status skipped without a reason"]
    results = copy.deepcopy(quick[2])
    _rows(results)[("mlp", "dense")]["backward"][0]["ratio"] = float("inf")
    assert check_results(results) == ["mlp/dense: backward ratio 'training' = inf"]


def test_a_diverged_run_is_a_result_with_its_epoch():
    results = {"config": {"seeds": [1], "sections": ["mlp"]}, "rows": []}
    for key in EXPECTED["mlp"]:
        row = new_row("mlp", key, "m")
        if key == "meprop_topk":
            row["runs"] = [bad_run(1, "diverged", "loss is nan at epoch 1 step 7", epoch=1)]
            row.update(status="diverged", reason="1/1 seeds diverged")
        else:
            row["runs"] = [ok_run(1, 0.8, [10, 10], 100, 1.0)]
            row["runs"][0]["time_ratio"] = 1.0
            row["ort_note"] = "n/a"
        results["rows"].append(row)
    assert check_results(results) == []
    del results["rows"][1]["runs"][0]["reason"]
    assert check_results(results) == ["mlp/meprop_topk: seed 1: diverged without a reason"]


# -- verdicts are computed from the numbers ---------------------------------------------------
def _row(accs: list[float], status: str = OK) -> dict[str, Any]:
    row = new_row("mlp", "dense", "m")
    if status == OK:
        row["runs"] = [ok_run(i, a, [5], 10, 1.0) for i, a in enumerate(accs)]
    else:
        row["runs"] = [bad_run(i, status, "nan", 1) for i, _ in enumerate(accs)]
        row.update(status=status, reason="all diverged")
    return row


def test_no_loss_and_beats_follow_the_numbers():
    dense = _row([0.880, 0.882, 0.881])
    assert no_loss(_row([0.880, 0.881, 0.880]), dense)["holds"] is True
    assert no_loss(_row([0.850, 0.851, 0.852]), dense)["holds"] is False
    assert no_loss(_row([0.1, 0.1, 0.1], status="diverged"), dense)["holds"] is False
    noisy = _row([0.86, 0.90, 0.86])  # -0.8 pt on average, but the seeds spread 4 pt
    assert no_loss(noisy, dense)["holds"] is None
    assert beats(_row([0.90, 0.901, 0.902]), dense)["holds"] is True
    assert beats(dense, _row([0.90, 0.901, 0.902]))["holds"] is False
    assert beats(dense, _row([0.880, 0.883, 0.879]))["holds"] is None
    assert beats(dense, _row([0.1], status="diverged"))["holds"] is True


def _paper_runs(rows: dict[str, list[float]], widths: dict[str, list[int]]) -> list[dict]:
    return [
        {"row": name, "seed": i + 1, "test": acc, "widths": widths.get(name, [500, 500])}
        for name, accs in rows.items()
        for i, acc in enumerate(accs)
    ]


def test_paper_tasks_section_judges_the_runs_file(tmp_path):
    from benchmarks.suite import paper_tasks

    mnist = paper_tasks.TASKS[0]
    runs = _paper_runs(
        {
            "ref dense": [0.983, 0.984, 0.983],
            "ref topk80": [0.983, 0.983, 0.984],  # no loss
            "ref topk20": [0.92, 0.93, 0.91],  # a clear loss
            "ref meSimp topk160 r0.1": [0.983, 0.984, 0.984],
        },
        {"ref meSimp topk160 r0.1": [150, 140]},  # 29 % kept, under the paper's 30.8 %
    )
    (tmp_path / mnist.runs_file).write_text(json.dumps(runs))
    md = paper_tasks.section_md(tmp_path)
    lines = {ln.split(" | ")[1]: ln for ln in md.splitlines() if ln.startswith("| meProp")}
    assert lines["ref top-80 vs ref dense (the paper's)"].endswith("| holds |")
    assert lines["ref top-20 vs ref dense"].endswith("| does not hold |")
    simp = next(ln for ln in md.splitlines() if "the C# code (paper: 30.8% kept)" in ln)
    assert "kept 29.00%" in simp and simp.endswith("| holds |")
    assert "| ref dense | 98.33 ± 0.06 | 3 | 500-500 | 98.20 |" in md
    assert "unified" not in md.split("| claim |")[0]  # rows never run are not listed
    # a failed seed is counted as such, not averaged
    runs.append({"row": "ref topk80", "seed": 4, "test": None, "error": "diverged"})
    (tmp_path / mnist.runs_file).write_text(json.dumps(runs))
    assert "(1 failed)" in paper_tasks.section_md(tmp_path)


def test_paper_tasks_section_names_the_command_of_a_task_not_run(tmp_path):
    from benchmarks.suite import paper_tasks

    md = paper_tasks.section_md(tmp_path)
    assert "Not run yet: `python -m benchmarks.mnist_paper`." in md


def test_render_needs_results_json(tmp_path, capsys):
    assert bench_run.main(["--render", "--out", str(tmp_path)]) == 2
    assert "--render needs" in capsys.readouterr().err


def test_timing_restores_the_kernel_mode():
    """The timing runners switch the kernel mode (compiled vs Python variants); the suite
    trains in the same process afterwards, which must run in the caller's mode."""
    from benchmarks import lstm_speed, meprop_speed
    from mesimp.nn import kernels

    before = kernels.mode()
    try:
        kernels.set_kernels("auto")

        def run(n: int) -> float:
            kernels.set_kernels("python")
            return float(n)

        assert lstm_speed.interleaved({"a": run}, rounds=2, iters=1, warmup=1) == {"a": [1.0, 1.0]}
        assert kernels.mode() == "auto"
        model, batches = meprop_speed.make_mlp(), meprop_speed._Batches(2, 0)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for runner in (
            meprop_speed.backward_runner(model, batches, "python"),
            meprop_speed.step_runner(model, opt, batches, "python"),
        ):
            runner(1)
            assert kernels.mode() == "auto"
    finally:
        kernels.set_kernels(before)


def test_bar_runs_judges_each_bar_on_the_median(tmp_path, monkeypatch):
    """benchmarks.bar_runs: a bar is met where the median over the runs reaches its target
    (equal counts), a missing value (no kernels) is never met, the 2-thread bars divide by
    the same run's 1-thread value; one real quick run end to end."""
    from benchmarks import bar_runs

    key = "backward/1"
    runs = [{"values": {key: v}, "loadavg": 1.0} for v in (4.0, 5.0, 6.0)]
    text = bar_runs.markdown(runs)
    assert (
        "| backward, loss.backward() (1 thread) | ≥ 5.0 | 4.00 | 5.00 | 6.00 | 5.00 | yes |" in text
    )
    runs[1]["values"][key] = 4.9
    assert "| 4.90 | **no** |" in bar_runs.markdown(runs)
    assert "| per-example top-k backward (1 thread) | ≥ 3.0 | n/a | n/a | n/a | n/a | n/a |" in text

    out = tmp_path / "bar.json"
    monkeypatch.chdir(REPO)  # the children run ``-m benchmarks.*`` from here
    args = ["--runs", "1", "--quick", "--dropin-hidden", "32,64", "--json", str(out)]
    assert bar_runs.main(args) == 0
    data = _strict_json(out)
    (got,) = data["runs"]
    values = got["values"]
    for _, name, _ in bar_runs.bars((32, 64)):
        if kernels.available() or "dropin" in name:
            assert values[name] is not None and values[name] > 0, name
    one, two = values["backward/1"], values["backward/2"]
    if one is not None:
        assert values["backward/2÷1"] == pytest.approx(two / one)
    # which CPU the runs belong to: ratios from two machines must not be pooled
    assert data["meta"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert isinstance(data["meta"]["cpu_model"], str) and data["meta"]["cpu_model"]


@pytest.mark.skipif(not kernels.available(), reason="mesimp._C is not built")
def test_step_overhead_times_the_op_it_says(tmp_path):
    """benchmarks.step_overhead: its "op alone" runner really trains (the same op and
    arguments as train_step: it ends on train_step's exact weights), the report's
    differences are the best rounds' differences, and a real quick run writes all four
    variants."""
    from benchmarks import step_overhead as so
    from benchmarks.meprop_speed import _Batches, kernel_mode, make_mlp, meprop_copy
    from mesimp.nn.fused import train_step
    from mesimp.training.optim import RowSparseAdam

    torch.manual_seed(0)
    base = make_mlp()
    a, b = (meprop_copy(base, 20, "unified", fused=True) for _ in range(2))
    opt_a, opt_b = RowSparseAdam(a.parameters()), RowSparseAdam(b.parameters())
    batches_a, batches_b = _Batches(8, 0), _Batches(8, 0)
    so.op_runner(a, opt_a, batches_a)(3)  # 1 train_step to build the arguments, then 3 ops
    with kernel_mode("cpp"):
        for _ in range(4):
            train_step(b, *batches_b.next(), opt_b)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(a[0].weight, base[0].weight)
    assert float(opt_a.state[a[0].weight]["step"]) == 4

    times = {
        "dense": [3e-3, 2.9e-3],
        "train_step": [1.1e-3],
        "op alone": [1e-3],
        "gemm floor": [0.9e-3],
    }
    text = so.markdown(times)
    assert "| op alone | 1.000 | 2.90x |" in text
    assert "Python checks: 100 µs" in text and "beyond its GEMMs: 100 µs" in text

    out = tmp_path / "so.json"
    assert so.main(["--rounds", "1", "--iters", "2", "--batch-size", "8", "--json", str(out)]) == 0
    data = _strict_json(out)
    assert set(data["step_s"]) == set(so.VARIANTS)
    assert all(len(v) == 1 and v[0] > 0 for v in data["step_s"].values())
    assert data["meta"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()


def test_conv_speed_quick_run_writes_every_part(tmp_path):
    """benchmarks.conv_speed --quick: one resnet18 stage, both variants and the three parts
    of the meProp backward, timed and written."""
    from benchmarks import conv_speed

    out = tmp_path / "conv.json"
    assert conv_speed.main(["--quick", "--ks", "0.125", "--json", str(out)]) == 0
    data = _strict_json(out)
    (r,) = data["threads"]["1"]
    assert (r["channels"], r["k"]) == (512, 64)
    assert set(r["backward_s"]) == {"dense", "meprop"} and r["backward"]["min"] > 0
    assert set(r["parts_s"]) == {"scores + top-k", "gather dy[:, S]", "conv backward on S"}
