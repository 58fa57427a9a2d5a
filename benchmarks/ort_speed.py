"""Dense vs shrunk in onnxruntime: speed-up against the MAC ratio, fp32 and int8.

    python -m benchmarks.ort_speed --dense DENSE.pt --small SMALL.pt [--quick]
        [--batch-sizes 1,32,256,4096] [--threads 1,2] [--json FILE]

Exports both checkpoints (fp32 and int8) to a temp dir, then times all four ONNX
models interleaved in one ``mesimp.bench`` run. For each precision, batch size and
thread count it prints the shrunk model's speed-up over the dense one (ratio of P50
latencies), the MAC ratio, their quotient and the project's bar: speed-up >= 0.9 x
MAC ratio at batch >= 256 and >= 0.6 x at batch 1 (other batch sizes: no bar).
Exits with status 1 when any row FAILs.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from mesimp.data import find_image_data
from mesimp.deploy.bench import bench
from mesimp.deploy.export import export_onnx
from mesimp.files.atomic import atomic_write_text


def bar(batch: int) -> float | None:
    if batch >= 256:
        return 0.9
    return 0.6 if batch == 1 else None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dense", required=True)
    p.add_argument("--small", required=True)
    p.add_argument("--data", default=None)
    p.add_argument("--batch-sizes", default="1,32,256,4096")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--repeat", type=int, default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--quick", action="store_true", help="batch 1 and 256, 1 thread, 20 runs")
    a = p.parse_args()
    sizes = [int(b) for b in a.batch_sizes.split(",")]
    threads = [int(t) for t in a.threads.split(",")]
    repeat = a.repeat
    if a.quick:
        sizes, threads, repeat = [1, 256], [1], 20
    data = str(find_image_data(a.data))  # default locations when --data is not given
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for name, ckpt in (("dense", a.dense), ("small", a.small)):
            for int8 in (False, True):
                out = Path(tmp) / f"{name}{'.int8' if int8 else ''}.onnx"
                export_onnx(ckpt, out, int8=int8, data=data)
                paths[(name, int8)] = str(out)
        order = [
            paths[("dense", False)],
            paths[("small", False)],
            paths[("dense", True)],
            paths[("small", True)],
        ]
        res = bench(order, data=data, batch_sizes=sizes, threads=threads, repeat=repeat)
    p50 = {(r["model"], r["batch_size"], r["threads"]): r["p50_ms"] for r in res["results"]}
    macs = {m["path"]: m["macs"] for m in res["models"]}
    acc = {m["path"]: m.get("accuracy") for m in res["models"]}
    rows = []
    print(
        "| precision | batch | threads | dense P50 ms | shrunk P50 ms | speed-up | MAC ratio "
        "| speed-up / MAC ratio | bar | verdict |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for int8 in (False, True):
        d, s = paths[("dense", int8)], paths[("small", int8)]
        ratio = macs[d] / macs[s]
        for t in threads:
            for b in sizes:
                sp = p50[(d, b, t)] / p50[(s, b, t)]
                need = bar(b)
                verdict = "" if need is None else ("PASS" if sp >= need * ratio else "FAIL")
                rows.append(
                    {
                        "int8": int8,
                        "batch": b,
                        "threads": t,
                        "speedup": sp,
                        "mac_ratio": ratio,
                        "verdict": verdict,
                    }
                )
                print(
                    f"| {'int8' if int8 else 'fp32'} | {b} | {t} | {p50[(d, b, t)]:.4f} | "
                    f"{p50[(s, b, t)]:.4f} | {sp:.2f}x | {ratio:.2f}x | {sp / ratio:.2f} | "
                    f"{'' if need is None else f'>= {need}'} | {verdict} |"
                )
    print(
        "\naccuracy: "
        + ", ".join(f"{Path(k).name} {v:.4f}" for k, v in acc.items() if v is not None)
    )
    if a.json:
        atomic_write_text(a.json, json.dumps({"rows": rows, "bench": res}, indent=2))
    failed = sum(r["verdict"] == "FAIL" for r in rows)
    checked = sum(bool(r["verdict"]) for r in rows)
    print(f"\nbar: {checked - failed}/{checked} rows PASS")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
