"""int8 weight formats side by side: accuracy, agreement with fp32, and speed-up.

    python -m benchmarks.int8_modes [--mlp A.pt ...] [--tagger T.pt ...] [--data DIR]
        [--conllu FILE] [--repeat N] [--json FILE]

Defaults: the checkpoints ``make demo`` writes (``models/fmnist-dense.pt``,
``models/fmnist-small-ft.pt``, ``models/tagger-dense.pt``, ``models/tagger-small.pt``).
Every checkpoint is exported fp32 and once per int8 mode (``mesimp.deploy.int8``; ``u8`` is
refused for LSTM models), with no agreement threshold so that a bad mode shows its
number instead of failing. Then, per checkpoint, its fp32 file and all its int8 files
are timed interleaved in one ``mesimp.bench`` run at batch 1 and 256, 1 thread; the
speed-up is the fp32 P50 latency over the int8 one (taggers: tokens/s ratio). Prints
one Markdown table with the CPU's VNNI flags and the u8s8 probe above it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from mesimp.data import find_image_data
from mesimp.deploy.bench import bench, machine_info
from mesimp.deploy.export import export_onnx
from mesimp.deploy.int8 import INT8_MODES, probe_u8s8_exact
from mesimp.files.atomic import atomic_write_text

EWT_TEST = Path(__file__).resolve().parents[2] / "shared/data/ud-english-ewt/en_ewt-ud-test.conllu"
DEFAULT_MLP = ["models/fmnist-dense.pt", "models/fmnist-small-ft.pt"]
DEFAULT_TAGGER = ["models/tagger-dense.pt", "models/tagger-small.pt"]
BATCHES = [1, 256]


def cpu_flags() -> list[str]:
    """The x86 flags that decide which int8 kernel onnxruntime picks."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), [])
    except OSError:
        return []
    return [f for f in ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni") if f in flags]


def one_model(ckpt: str, tmp: Path, family: str, source: str, repeat: int | None) -> list[dict]:
    """Export ``ckpt`` fp32 + every mode, bench them together; one row per int8 mode."""
    kw: dict[str, Any] = {"conllu": source} if family == "tagger" else {"data": source}
    stem = Path(ckpt).stem
    fp32 = export_onnx(ckpt, tmp / f"{stem}.onnx", **kw)
    exports = {}
    for mode, spec in INT8_MODES.items():
        if family == "tagger" and not spec.lstm:
            continue
        exports[mode] = export_onnx(
            ckpt,
            tmp / f"{stem}.{mode}.onnx",
            int8=True,
            int8_mode=mode,
            min_agreement=0.0,
            **kw,
        )
    paths = [fp32["path"], *(r["path"] for r in exports.values())]
    r = bench(
        paths,
        batch_sizes=BATCHES,
        threads=[1],
        repeat=repeat,
        progress=False,
        **({"conllu": source} if family == "tagger" else {"data": source}),
    )
    speedup = {(row["model"], row["batch_size"]): row["speedup"] for row in r["results"]}
    rows = []
    for mode, e in exports.items():
        rows.append(
            {
                "model": stem,
                "mode": mode,
                "fp32_accuracy": fp32["fp32_accuracy"],
                "int8_accuracy": e["int8_accuracy"],
                "agreement": e["int8_agreement"],
                **{f"speedup_b{b}": speedup[(e["path"], b)] for b in BATCHES},
            }
        )
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mlp", nargs="*", default=DEFAULT_MLP)
    p.add_argument("--tagger", nargs="*", default=DEFAULT_TAGGER)
    p.add_argument("--data", default=None, help="image data (default: the usual places)")
    p.add_argument("--conllu", default=str(EWT_TEST), help="tagger check sentences")
    p.add_argument("--repeat", type=int, default=None, help="timed runs (default: auto)")
    p.add_argument("--json", default=None, help="also write the rows as JSON here")
    a = p.parse_args()
    data = str(find_image_data(a.data))
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="int8-modes-") as tmp:
        for ckpt in a.mlp:
            rows += one_model(ckpt, Path(tmp), "mlp", data, a.repeat)
        for ckpt in a.tagger:
            rows += one_model(ckpt, Path(tmp), "tagger", a.conllu, a.repeat)
    m = machine_info()
    print(f"CPU: {m['cpu_model']}; flags: {', '.join(cpu_flags()) or 'none of interest'}")
    print(f"onnxruntime {m['onnxruntime']}; u8s8 kernel exact here: {probe_u8s8_exact()}\n")
    print("| model | mode | fp32 acc | int8 acc | agreement | P50 speed-up b=1 | b=256 |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['model']} | {r['mode']} | {r['fp32_accuracy']:.4f} | {r['int8_accuracy']:.4f}"
            f" | {r['agreement']:.4f} | {r['speedup_b1']:.2f}x | {r['speedup_b256']:.2f}x |"
        )
    if a.json:
        doc = {"machine": m, "cpu_flags": cpu_flags(), "rows": rows}
        atomic_write_text(a.json, json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
