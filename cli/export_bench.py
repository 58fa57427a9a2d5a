"""``mesimp export`` and ``mesimp bench``: parse, call the library, print."""

from __future__ import annotations

import click
from mesimp.cli.main import IntList, cli, emit_json


@cli.command(short_help="Export a checkpoint to one verified ONNX file (optionally int8).")
@click.argument("path", type=click.Path())
@click.option("--onnx", "to_onnx", is_flag=True, help="Export to ONNX (the only format).")
@click.option(
    "-o",
    "--output",
    type=click.Path(),
    default=None,
    help="Output file. Default: IN.onnx (IN.int8.onnx with --int8).",
)
@click.option("--opset", type=int, default=18, show_default=True, help="ONNX opset.")
@click.option(
    "--int8",
    is_flag=True,
    help="Dynamic int8 quantization (onnxruntime quantize_dynamic); reports int8 "
    "test accuracy next to fp32.",
)
@click.option(
    "--int8-mode",
    type=click.Choice(["s7", "u8", "s8"]),
    default="s7",
    show_default=True,
    help="Weight format for --int8. s7: int8 weights in 7 bits, exact on every x86-64 CPU. "
    "u8: uint8 weights, exact everywhere (not for LSTM models). s8: full 8-bit int8, "
    "exact only on CPUs with VNNI (elsewhere onnxruntime's u8s8 kernel saturates).",
)
@click.option(
    "--min-agreement",
    type=float,
    default=0.95,
    show_default=True,
    help="With --int8: write the file only if its predictions agree with fp32's on at "
    "least this fraction of the check data (0 accepts any).",
)
@click.option(
    "--data",
    type=click.Path(),
    default=None,
    help="Image data for the parity check and accuracy of MLPs and lstm-rows models "
    "(default: the usual locations).",
)
@click.option(
    "--conllu",
    type=click.Path(),
    default=None,
    help="lstm-tagger: CoNLL-U sentences for the parity check and token accuracy, encoded "
    "with the checkpoint's vocabulary (default: the test file recorded at training if it "
    "exists, else random word ids). parser: the same, its oracle features for parity and "
    "its first 500 sentences parsed for UAS/LAS.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the export report as JSON.")
def export(path, to_onnx, output, opset, int8, int8_mode, min_agreement, data, conllu, as_json):
    """Export IN.pt to a single ONNX file with a dynamic batch axis.

    The file passes onnx.checker (full_check), and onnxruntime's outputs on real test
    images are compared with PyTorch's (max_abs_diff <= 1e-4, else nothing is written).
    metadata_props record the mesimp version, hidden_sizes and the checkpoint's sha256.

    LSTM checkpoints (lstm-tagger, lstm-rows) get one ONNX LSTM node per layer and
    dynamic batch and sequence axes: a tagger maps int64 words [batch, seq] to logits
    [batch, seq, tags] and is checked on --conllu sentences; --int8 turns each LSTM into
    DynamicQuantizeLSTM.

    \b
    Examples:
      mesimp export models/mlp.pt --onnx                 # -> models/mlp.onnx
      mesimp export models/mlp.small.pt --onnx --int8    # -> models/mlp.small.int8.onnx
      mesimp export models/tagger.pt --onnx --int8 --conllu en_ewt-ud-test.conllu
    """
    from mesimp.deploy.export import export_onnx
    from mesimp.errors import BadInputError

    if not to_onnx:
        raise BadInputError("say which format: --onnx (the only one supported)")
    r = export_onnx(
        path,
        output,
        opset=opset,
        int8=int8,
        int8_mode=int8_mode,
        min_agreement=min_agreement,
        data=data,
        conllu=conllu,
    )
    if as_json:
        emit_json(r)
        return
    what = "token accuracy" if r.get("model") == "lstm-tagger" else "accuracy"
    acc = f"fp32 {what} {r['fp32_accuracy']:.4f}" if r.get("fp32_accuracy") is not None else ""
    if r.get("int8"):
        if r.get("int8_accuracy") is not None:
            acc += f", int8 {what} {r['int8_accuracy']:.4f}"
        acc += f"{', ' if acc else ''}int8 agreement {r['int8_agreement']:.4f}"
        acc += f" (mode {r['int8_mode']})"
    layers = f"{r['lstm_nodes']} LSTM node(s), " if "lstm_nodes" in r else ""
    click.echo(
        f"wrote {r['path']} ({r['size_bytes']:,} bytes, opset {r['opset']}); "
        f"{layers}hidden {r['hidden_sizes']}; max_abs_diff {r['max_abs_diff']:.2e} "
        f"on {r['check_data']}; {acc}".rstrip("; ")
    )


@cli.command(short_help="Time ONNX models in onnxruntime: latency, throughput, speed-up.")
@click.argument("models", nargs=-1, required=True, type=click.Path())
@click.option(
    "--data",
    type=click.Path(),
    default=None,
    help="Image data: real test inputs, and accuracy per model.",
)
@click.option(
    "--conllu",
    type=click.Path(),
    default=None,
    help="LSTM taggers: time the sentences of this CoNLL-U file (their lengths; word ids "
    "are random, which costs the same). Default: EWT-like synthetic lengths. Parsers "
    "(required): the sentences to parse, and UAS/LAS.",
)
@click.option(
    "--sentences",
    type=click.IntRange(min=1),
    default=None,
    help="LSTM taggers: number of sentences (the first N of --conllu; default all, or "
    "500 synthetic ones).",
)
@click.option(
    "--batch-sizes",
    type=IntList(),
    default=None,
    help="Batch sizes. [default: 1,32,256,4096; LSTM taggers: 1 (decode: one sentence per "
    "run); parsers: 1,256 (sentences parsed together)]",
)
@click.option(
    "--threads",
    type=IntList(),
    default="1,2",
    show_default=True,
    help="intra_op_num_threads values.",
)
@click.option(
    "--repeat",
    type=int,
    default=None,
    help="Timed runs per model and configuration (default: ~0.5 s worth); for LSTM "
    "taggers, passes over the sentences.",
)
@click.option("--warmup", type=int, default=5, show_default=True, help="Untimed runs first.")
@click.option("--markdown", type=click.Path(), default=None, help="Also write a Markdown table.")
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(),
    default=None,
    help="Also write a plot (PNG, SVG, PDF by suffix): throughput and P50 latency vs "
    "batch size, one color per model, one line style per thread count.",
)
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Live progress bar on stderr. Default: only when stderr is a terminal; a log "
    "file gets one plain line per configuration instead.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def bench(
    models,
    data,
    conllu,
    sentences,
    batch_sizes,
    threads,
    repeat,
    warmup,
    markdown,
    plot_path,
    progress,
    as_json,
):
    """Benchmark ONNX models on CPU with onnxruntime, interleaved in one run.

    For every batch size and thread count, all models are timed round-robin in the
    same loop (so machine noise hits them alike). Per row: P50/P90/P99 latency of one
    session.run, throughput = batch / P50 latency, speed-up = the FIRST model's P50
    over this one's, MAC ratio = the first model's MACs (counted from the graph) over
    this one's, and with --data the test accuracy. Put the baseline first.

    LSTM taggers (int64 [batch, seq] input) are timed tagging whole sentences: at batch
    1 (mode decode) one sentence per run; per row P50/P99 ms per sentence, tokens/s
    (real tokens / total time) and speed-up = tokens/s over the first model's. LSTM row
    classifiers take [batch, rows, width] images. Dependency parsers parse the --conllu
    sentences (transition loop in Python, scorer in onnxruntime): sentences/s (ex/s),
    tok/s, UAS and LAS. One call benches one kind of model.

    \b
    Examples:
      mesimp bench models/mlp.onnx models/mlp.small.onnx
      mesimp bench models/mlp.onnx models/mlp.small.onnx --data /usr/share/datasets/fashion-mnist \\
          --batch-sizes 1,256 --threads 1 --markdown bench.md --plot bench.png
      mesimp bench models/tagger.onnx models/tagger.small.int8.onnx --threads 1 \\
          --conllu en_ewt-ud-test.conllu
    """
    from mesimp.deploy.bench import bench as run_bench
    from mesimp.deploy.tables import format_table, plot, write_markdown

    r = run_bench(
        list(models),
        data=data,
        batch_sizes=batch_sizes,
        threads=threads,
        repeat=repeat,
        warmup=warmup,
        progress=progress,
        conllu=conllu,
        sentences=sentences,
    )
    for warning in r["warnings"]:
        click.echo(f"warning: {warning}", err=True)
    if markdown:
        write_markdown(r, markdown)
    if plot_path:
        plot(r, plot_path)
    if as_json:
        emit_json(r)
    else:
        click.echo(format_table(r))
