"""bench's results for people: a plain-text table, a Markdown report, a plot.

These read only the ``bench --json`` object (``mesimp.deploy.bench``), so they work on
a saved result too. One column list serves the table and the Markdown; a column shows
up when some row has its field (``mode`` and ``tok/s`` for taggers, ``accuracy`` with
``--data``). Files are written atomically.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mesimp.deploy.ort_errors import one_line
from mesimp.errors import BadInputError, MesimpError
from mesimp.files.atomic import atomic_path, atomic_write_text, check_writable

__all__ = ["format_table", "plot", "to_markdown", "write_markdown"]

_COLUMNS = (
    ("model", "model", "{}"),
    ("mode", "mode", "{}"),  # taggers only: decode (batch 1) or batch
    ("batch", "batch_size", "{:d}"),
    ("thr", "threads", "{:d}"),
    ("p50 ms", "p50_ms", "{:.4f}"),
    ("p90 ms", "p90_ms", "{:.4f}"),
    ("p99 ms", "p99_ms", "{:.4f}"),
    ("ex/s", "throughput", "{:,.0f}"),
    ("tok/s", "tokens_per_s", "{:,.0f}"),  # taggers only
    ("speedup", "speedup", "{:.2f}x"),
    ("MAC ratio", "mac_ratio", "{:.2f}x"),
    ("accuracy", "accuracy", "{:.4f}"),
    ("UAS", "uas", "{:.4f}"),  # parsers only
    ("LAS", "las", "{:.4f}"),
)


def _short_names(result: dict[str, Any]) -> dict[str, str]:
    """Model path -> file name (or the full path when two models share a name)."""
    paths = [m["path"] for m in result.get("models", [])] or [r["model"] for r in result["results"]]
    names = {p: Path(p).name for p in paths}
    if len(set(names.values())) < len(names):
        return {p: p for p in paths}
    return names


def _cells(result: dict[str, Any]) -> tuple[list[str], list[list[str]], list[bool]]:
    names = _short_names(result)
    cols = [c for c in _COLUMNS if any(c[1] in r for r in result["results"])]
    header = [c[0] for c in cols]
    rows = []
    for r in result["results"]:
        row = []
        for _, key, fmt in cols:
            v = r.get(key)
            if v is None:
                row.append("-")
            elif key == "model":
                row.append(names.get(v, v))
            else:
                row.append(fmt.format(v))
        rows.append(row)
    numeric = [c[1] not in ("model", "mode") for c in cols]
    return header, rows, numeric


def format_table(result: dict[str, Any]) -> str:
    """The results as an aligned plain-text table (one row per model, batch, threads)."""
    header, rows, numeric = _cells(result)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.rjust(w) if num else c.ljust(w)
            for c, w, num in zip(cells, widths, numeric, strict=True)
        ).rstrip()

    out = [line(header), line(["-" * w for w in widths])]
    prev = None
    for r, src in zip(rows, result["results"], strict=True):
        key = (src["batch_size"], src["threads"])
        if prev is not None and key != prev:
            out.append("")
        prev = key
        out.append(line(r))
    return "\n".join(out)


def to_markdown(result: dict[str, Any]) -> str:
    header, rows, numeric = _cells(result)
    lines = [
        "# onnxruntime CPU benchmark",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---:" if n else ":---" for n in numeric) + "|",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    tagger = any("tokens_per_s" in r for r in result["results"])
    if tagger:
        cfg = result.get("config") or {}
        note = (
            "Latency: wall time of one `session.run` (nearest-rank percentiles): one "
            "sentence at batch 1 (decode), one padded batch of length-bucketed sentences "
            f"otherwise; {cfg.get('sentences', '?')} sentences, {cfg.get('tokens', '?')} "
            "tokens; tok/s = real tokens / total timed time; speedup = tok/s relative to "
            "the first model; MAC ratio relative to the first model."
        )
    else:
        note = (
            "Latency: wall time of one `session.run` (nearest-rank percentiles); "
            "throughput = batch size / p50 latency; speedup and MAC ratio are relative to "
            "the first model."
        )
    lines += ["", note, "", "## Models", ""]
    unit = "token" if tagger else "example"
    for m in result.get("models", []):
        extra = f", hidden sizes {m['hidden_sizes']}" if m.get("hidden_sizes") else ""
        acc = f", test accuracy {m['accuracy']:.4f}" if m.get("accuracy") is not None else ""
        lines.append(f"- `{m['path']}`: {m['macs']:,} MACs/{unit}{extra}{acc}")
    mach = result.get("machine") or {}
    if mach:
        lines += ["", "## Machine", ""]
        lines += [f"- {k}: {v}" for k, v in mach.items()]
    return "\n".join(lines) + "\n"


def write_markdown(result: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write the results as a Markdown report (atomically)."""
    return atomic_write_text(path, to_markdown(result))


def plot(result: dict[str, Any], path: str | os.PathLike) -> Path:
    """Throughput and p50 latency vs batch size (log-log), one color per model and one
    line style per thread count; written atomically as an image (format from the suffix)."""
    check_writable(path)
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise MesimpError(
            "plotting needs matplotlib: pip install 'mesimp[plot]' (or pip install matplotlib)"
        ) from e

    names = _short_names(result)
    rows = result["results"]
    # taggers report tokens/s; MLPs and row classifiers examples/s
    rate, rate_label = (
        ("tokens_per_s", "tokens/s")
        if any("tokens_per_s" in r for r in rows)
        else ("throughput", "throughput (examples/s, at p50)")
    )
    models = list(dict.fromkeys(r["model"] for r in rows))
    thread_counts = sorted({r["threads"] for r in rows})
    batches = sorted({r["batch_size"] for r in rows})
    styles = ["-", "--", ":", "-."]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for mi, model in enumerate(models):
        for ti, t in enumerate(thread_counts):
            pts = sorted(
                (r["batch_size"], r[rate], r["p50_ms"])
                for r in rows
                if r["model"] == model and r["threads"] == t
            )
            if not pts:
                continue
            b, thr, lat = zip(*pts, strict=True)
            label = f"{names.get(model, model)}, {t} thr"
            kw = {"color": f"C{mi}", "linestyle": styles[ti % len(styles)], "marker": "o"}
            axes[0].plot(b, thr, label=label, **kw)
            axes[1].plot(b, lat, label=label, **kw)
    for ax, ylabel in zip(axes, (rate_label, "p50 latency (ms)"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("onnxruntime CPU benchmark")
    fig.tight_layout()
    dest = Path(path)
    fmt = dest.suffix.lstrip(".").lower() or "png"
    try:
        with atomic_path(dest) as tmp:
            fig.savefig(tmp, format=fmt, dpi=120)
    except ValueError as e:  # unknown image format
        raise BadInputError(f"cannot write a plot as {dest.name}: {one_line(e)}") from e
    finally:
        plt.close(fig)
    return dest
