"""ONNX export of a checkpoint, verified against PyTorch, with optional int8 quantization.

``export_onnx(ckpt.pt)`` writes ONE self-contained ``.onnx`` file (no ``.onnx.data``
side file) with a dynamic batch axis, input ``input`` ``[batch, in_features]`` and
output ``logits`` ``[batch, classes]``. Before the file is written it must pass
``onnx.checker.check_model(full_check=True)`` and a parity check: onnxruntime on real
test images against the PyTorch model, ``max_abs_diff <= 1e-4`` or
``VerificationError``. Files are written atomically, so a failed export leaves
nothing behind.

Masks
    A masked ``MePropLinear`` computes ``linear(x) * mask`` at inference. The export
    folds the mask into the weights (masked rows of ``weight`` and ``bias`` set to 0),
    which gives exactly the same logits with a plain ``Gemm``/``Relu`` graph and no
    ``Mul`` by a mask constant. A masked model keeps its full width (and MACs) in ONNX;
    ``mesimp shrink`` is what makes it physically smaller.

Exporter choice (measured with torch 2.13, onnxscript 0.7, MLP 784-500-500-10)
    Both exporters give the same graph for the MLP (``Gemm, Relu, Gemm, Relu, Gemm``,
    dynamic ``batch``) and both emit one ``LSTM`` node for ``nn.LSTM``. We use the
    ``torch.export``-based exporter (``dynamo=True``, ``external_data=False``):

    * it has been torch.onnx's default and supported path since PyTorch 2.9; the
      TorchScript exporter is deprecated and warns that it will be removed;
    * ``external_data=False`` gives the single file we want.

    Its costs: about 4 s for the first export in a process (0.9 s after), against
    0.1 s for the TorchScript exporter, and chattier logging, which ``_quiet``
    silences. The exporter call lives in one function, ``torch_to_onnx``, which also
    runs the TorchScript exporter (``exporter="torchscript"``), e.g. for the LSTM
    tagger if its graph turns out cleaner that way.

int8
    ``onnxruntime.quantization.quant_pre_process`` (shape inference + graph
    optimization) then ``quantize_dynamic`` with int8 weights in the format of
    ``int8_mode`` (default ``s7``: 7-bit int8 weights, exact on every x86-64 CPU;
    ``mesimp.deploy.int8`` says why and what the other modes cost), per tensor
    (``per_channel=False``: on the Fashion-MNIST MLPs per-channel scales did not
    improve accuracy measurably and the per-tensor graph is the simpler one).
    Activations are quantized dynamically at run time (``DynamicQuantizeLinear`` +
    ``MatMulInteger``). The check for int8 is accuracy agreement with the fp32 model
    over the test set (exact parity is not expected).

LSTM models (``lstm-tagger``, ``lstm-rows``; see ``_export_lstm``)
    One ONNX ``LSTM`` node per LSTM layer, dynamic batch *and* sequence axes. Tagger:
    ``words`` int64 ``[batch, seq]`` (0 = padding, after each sentence) -> ``logits``
    ``[batch, seq, num_tags]``; row classifier: ``input`` float ``[batch, steps,
    row_width]`` -> ``logits [batch, classes]``. These use the TorchScript exporter:
    measured with torch 2.13, the dynamo exporter also emits one ``LSTM`` per layer but
    fixes the sequence axis to the example's length (the input of a stacked tagger or a
    row classifier becomes ``[batch, 5]`` / ``[batch, 28, 28]``; a one-layer tagger keeps
    a symbolic input but its output is declared ``[batch, 5, tags]``, and a stacked one
    failed at run time on other lengths in a ``Reshape``), with a
    ``Slice``/``Mul``/``Reshape`` tail; the TorchScript graph is ``Gather -> LSTM ->
    MatMul`` with both axes symbolic, in 0.2 s instead of 2-4 s. The export refuses a
    graph whose ``LSTM`` count or dynamic axes are not as promised. Parity: a tagger is
    checked on real sentences (``conllu``, else the test file recorded in the
    checkpoint, else random word ids of random lengths), a row classifier on test
    images as ``[N, rows, row_width]``. ``int8`` quantizes ``LSTM`` (to
    ``com.microsoft.DynamicQuantizeLSTM``), ``MatMul``/``Gemm`` and the embedding's
    ``Gather``; agreement is counted over real tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mesimp._version import __version__
from mesimp.data import Vocab, load_eval_data, read_conllu, tagging_tensors
from mesimp.deploy.int8 import DEFAULT_INT8_MODE, get_int8_mode
from mesimp.deploy.ort_errors import ort_errors, ort_message
from mesimp.deploy.quantize import quantize_int8 as _quantize_int8
from mesimp.deploy.torch_onnx import EXPORTERS, ExportError, torch_to_onnx
from mesimp.deploy.verify import PARITY_TOL
from mesimp.deploy.verify import check_model as _check
from mesimp.deploy.verify import check_parity as _check_parity
from mesimp.deploy.verify import max_diff as _max_diff
from mesimp.deploy.verify import ort_session as _session
from mesimp.deploy.verify import set_metadata as _set_metadata
from mesimp.errors import BadInputError, CheckpointError, DataError, VerificationError
from mesimp.files.atomic import atomic_write_bytes, check_writable
from mesimp.files.checkpoint import load_checkpoint, model_from_checkpoint
from mesimp.models import count_macs, count_params, hidden_sizes, is_lstm_model
from mesimp.nn.conv import MePropConv2d
from mesimp.nn.linear import MePropLinear
from mesimp.nn.swap import unmeprop

__all__ = [
    "EXPORTERS",
    "ExportError",
    "INT8_MIN_AGREEMENT",
    "PARITY_TOL",
    "export_onnx",
    "plain_model",
    "torch_to_onnx",
]

# int8 predictions must agree with fp32 ones on at least this fraction of the inputs.
INT8_MIN_AGREEMENT = 0.95
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
WORDS_NAME = "words"  # a tagger's input: int64 word ids [batch, seq]
# Parity without a CoNLL-U file: random sentences of 1..RANDOM_MAX_LEN words (seed 0).
RANDOM_MAX_LEN = 40
CHECK_BATCH = 64  # sentences (or 8x as many images) per onnxruntime/PyTorch run in checks


# int8 for LSTM graphs: the LSTMs, the output layer and the embedding table.
LSTM_INT8_OPS = ("LSTM", "MatMul", "Gemm", "Gather")


# -- model -------------------------------------------------------------------------------------
def plain_model(ckpt: dict[str, Any]) -> nn.Module:
    """The checkpoint's model with only ``torch.nn`` layers, masks folded into the weights.

    Computes exactly what ``model_from_checkpoint(ckpt)`` computes in eval mode: a masked
    neuron's output is 0 either way.
    """
    model = model_from_checkpoint(ckpt)
    for name, mod in model.named_modules():
        if isinstance(mod, MePropConv2d) and mod.active_width < mod.out_channels:
            # a masked channel is zeroed after its BatchNorm: no plain graph folds that
            raise BadInputError(
                f"the checkpoint holds masked channels ({name}): shrink it first (mesimp shrink)"
            )
    unmeprop(model, types=(MePropConv2d,))
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, MePropLinear):
            continue
        # Built on "meta" so no init runs (and the global RNG is left alone).
        lin = nn.Linear(mod.in_features, mod.out_features, mod.bias is not None, device="meta")
        keep = mod.mask.to(mod.weight.dtype).detach()
        lin.weight = nn.Parameter(mod.weight.detach() * keep[:, None])
        if mod.bias is not None:
            lin.bias = nn.Parameter(mod.bias.detach() * keep)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, lin)
    return model.eval()


# -- onnx helpers ------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _run(session: Any, x: np.ndarray, batch: int = 2048) -> np.ndarray:
    name = session.get_inputs()[0].name
    outs = [session.run(None, {name: x[i : i + batch]})[0] for i in range(0, len(x), batch)]
    return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


def _accuracy(logits: np.ndarray, y: np.ndarray) -> float | None:
    return float((logits.argmax(-1) == y).mean()) if len(y) else None


# -- export ------------------------------------------------------------------------------------
def default_output(checkpoint_path: str | os.PathLike, int8: bool = False) -> Path:
    """``model.pt`` -> ``model.onnx`` (``model.int8.onnx`` for int8)."""
    return Path(checkpoint_path).with_suffix(".int8.onnx" if int8 else ".onnx")


def export_onnx(
    checkpoint_path: str | os.PathLike,
    output: str | os.PathLike | None = None,
    opset: int = 18,
    int8: bool = False,
    data: str | os.PathLike | None = None,
    n_check: int = 1000,
    *,
    exporter: str | None = None,
    conllu: str | os.PathLike | None = None,
    int8_mode: str = DEFAULT_INT8_MODE,
    min_agreement: float = INT8_MIN_AGREEMENT,
) -> dict[str, Any]:
    """Export a checkpoint to one verified ONNX file; returns the ``export --json`` object.

    Parity is checked on the first ``n_check`` test images of ``data`` (default data
    locations when ``None``; random inputs in [0, 1) if none is found and ``int8`` is
    off). With ``int8`` the file holds the dynamically quantized model; ``max_abs_diff``
    is still the fp32 graph's parity, ``int8_max_abs_diff`` and ``int8_agreement``
    (fraction of test predictions equal to the fp32 ones) describe the int8 model.

    LSTM checkpoints (``_export_lstm``): ``conllu`` is a tagger's check file (its first
    ``n_check`` sentences for parity, all of them for token accuracy); ``data`` the
    images of a row classifier. ``int8_mode``: a key of ``mesimp.deploy.int8.INT8_MODES``.
    ``min_agreement``: the int8 file is written only if its predictions agree with
    fp32's on at least this fraction (0 accepts any; for an untrained model, whose
    logits are near ties, agreement says nothing about the quantization).
    ``exporter=None`` picks ``"dynamo"`` for MLPs and
    ``"torchscript"`` for LSTM models (see the module docstring).
    """
    import onnx

    if isinstance(opset, bool) or not isinstance(opset, int):
        raise BadInputError(f"opset must be an integer, got {opset!r}")
    max_opset = onnx.defs.onnx_opset_version()
    if not 13 <= opset <= max_opset:
        raise BadInputError(f"opset must be in [13, {max_opset}], got {opset}")
    if isinstance(n_check, bool) or not isinstance(n_check, int) or n_check <= 0:
        raise BadInputError(f"n_check must be a positive integer, got {n_check!r}")
    if exporter is not None and exporter not in EXPORTERS:
        raise BadInputError(f"unknown exporter {exporter!r} (choose from {', '.join(EXPORTERS)})")

    get_int8_mode(int8_mode)
    if isinstance(min_agreement, bool) or not isinstance(min_agreement, (int, float)):
        raise BadInputError(f"min_agreement must be a number, got {min_agreement!r}")
    if not 0.0 <= min_agreement <= 1.0:
        raise BadInputError(f"min_agreement must be in [0, 1], got {min_agreement}")
    src = Path(checkpoint_path)
    ckpt = load_checkpoint(src)
    out = Path(output) if output is not None else default_output(src, int8)
    if out.suffix != ".onnx":
        raise BadInputError(f"output {out} must end in .onnx")
    if out.exists() and out.resolve() == src.resolve():
        raise BadInputError(f"output {out} would overwrite the checkpoint")
    check_writable(out)

    if is_lstm_model(ckpt["arch"]):
        return _export_lstm(
            ckpt,
            src,
            out,
            opset=opset,
            int8=int8,
            int8_mode=int8_mode,
            min_agreement=min_agreement,
            data=data,
            conllu=conllu,
            n_check=n_check,
            exporter=exporter or "torchscript",
        )
    if conllu is not None:
        raise BadInputError("--conllu is for lstm-tagger checkpoints; this one is an MLP")
    exporter = exporter or "dynamo"
    model = plain_model(ckpt)
    arch = ckpt["arch"]
    in_features = int(arch["in_features"])
    ds = load_eval_data(data, in_features, required=int8)  # int8 accuracy needs data
    if ds is not None:
        x_check = ds.x_test[:n_check].contiguous()
    else:
        x_check = torch.rand(n_check, in_features, generator=torch.Generator().manual_seed(0))

    sizes = hidden_sizes(model)
    meta = {
        "mesimp_version": __version__,
        "hidden_sizes": json.dumps(sizes),
        "arch": json.dumps(arch, sort_keys=True),
        "source": src.name,
        "source_sha256": _sha256(src),
    }

    with tempfile.TemporaryDirectory(prefix="mesimp-export-") as tmp:
        raw = Path(tmp) / "model.onnx"
        torch_to_onnx(
            model,
            (x_check[:2].clone(),),
            raw,
            opset,
            {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            [INPUT_NAME],
            [OUTPUT_NAME],
            exporter=exporter,
        )
        proto = onnx.load(str(raw))
        _set_metadata(proto, meta)
        _check(proto, "exported model")
        fp32_bytes = proto.SerializeToString()

        # Parity: onnxruntime vs PyTorch on real inputs.
        sess = _session(fp32_bytes)
        with torch.no_grad():
            ref = model(x_check).numpy()
        got = _run(sess, x_check.numpy())
        max_abs_diff = _check_parity([got], [ref], len(x_check))
        result: dict[str, Any] = {
            "path": str(out),
            "opset": opset,
            "exporter": exporter,
            "max_abs_diff": max_abs_diff,
            "n_check": len(x_check),
            "check_data": ds.source if ds is not None else "random",
            "int8": bool(int8),
            "fp32_accuracy": None,
        }
        if ds is not None:
            x_test, y_test = ds.x_test.numpy(), ds.y_test.numpy()
            fp32_logits = _run(sess, x_test)
            result["fp32_accuracy"] = _accuracy(fp32_logits, y_test)
        else:
            x_test, y_test, fp32_logits = x_check.numpy(), None, got

        payload = fp32_bytes
        if int8:
            payload, stats = _quantize_int8(fp32_bytes, Path(tmp), meta, int8_mode)
            qsess = _session(payload)
            q_logits = _run(qsess, x_test)
            agreement = float((q_logits.argmax(-1) == fp32_logits.argmax(-1)).mean())
            q_check = q_logits[: len(x_check)] if ds is not None else q_logits
            result.update(
                int8_accuracy=_accuracy(q_logits, y_test) if y_test is not None else None,
                int8_agreement=agreement,
                int8_max_abs_diff=float(np.abs(q_check - ref).max()),
                **stats,
            )
            if agreement < min_agreement:
                raise VerificationError(
                    f"int8 predictions agree with fp32 on only {agreement:.1%} of the test set "
                    f"(< {min_agreement:.1%}); not writing {out}"
                )

    atomic_write_bytes(out, payload)
    result.update(
        hidden_sizes=sizes,
        params=count_params(model),
        macs=count_macs(model),
        source=str(src),
        source_sha256=meta["source_sha256"],
        size_bytes=out.stat().st_size,
    )
    return result


# -- LSTM models -------------------------------------------------------------------------------
@dataclass
class _SeqInputs:
    """What an LSTM export is checked on: model inputs in runs, with masks and labels.

    ``check``: the parity sample (PyTorch vs onnxruntime). ``evals``: the runs for
    accuracy with ``labels`` (tag ids ``[b, T]``, 0 = padding, or classes ``[b]``), or
    ``None`` without labelled data (int8 agreement then uses ``check``). ``masks`` mark
    the outputs that count (real tokens), one per run of ``evals`` (or of ``check``).
    """

    check: list[np.ndarray]
    check_masks: list[np.ndarray]
    evals: list[np.ndarray] | None
    labels: list[np.ndarray] | None
    masks: list[np.ndarray] | None
    source: str
    n_check: int
    tokens: int | None = None  # real tokens in the parity sample (taggers)
    steps: int | None = None  # image rows (row classifiers)


def _export_lstm(
    ckpt: dict[str, Any],
    src: Path,
    out: Path,
    *,
    opset: int,
    int8: bool,
    int8_mode: str,
    min_agreement: float,
    data: str | os.PathLike | None,
    conllu: str | os.PathLike | None,
    n_check: int,
    exporter: str,
) -> dict[str, Any]:
    """``export_onnx`` for ``lstm-tagger`` / ``lstm-rows`` checkpoints (already loaded)."""
    import onnx

    arch = ckpt["arch"]
    kind = arch["model"]
    layers = ckpt.get("meprop", {}).get("layers") if isinstance(ckpt.get("meprop"), dict) else None
    if layers:
        # a masked MePropLSTM is not a plain nn.LSTM: its masked units would come back to life
        raise BadInputError(f"{src} holds meProp LSTM masks: shrink it first (mesimp shrink {src})")
    if int8 and not get_int8_mode(int8_mode).lstm:
        raise BadInputError(
            f"int8 mode {int8_mode} is not available for LSTM models: onnxruntime stores LSTM "
            f"weights as int8 (use --int8-mode {DEFAULT_INT8_MODE}, or s8)"
        )
    model = model_from_checkpoint(ckpt, meprop=False).eval()
    widths = model.config.hidden_sizes()
    if kind == "lstm-tagger":
        if data is not None:
            raise BadInputError("--data is for image models; give a tagger --conllu FILE")
        inputs = _tagger_inputs(ckpt, conllu, n_check)
        in_name = WORDS_NAME
        axes = {WORDS_NAME: {0: "batch", 1: "seq"}, OUTPUT_NAME: {0: "batch", 1: "seq"}}
    else:
        if conllu is not None:
            raise BadInputError("--conllu is for lstm-tagger checkpoints; this one is lstm-rows")
        inputs = _rows_inputs(data, int(model.config.in_features), n_check, required=int8)
        in_name = INPUT_NAME
        axes = {INPUT_NAME: {0: "batch", 1: "steps"}, OUTPUT_NAME: {0: "batch"}}

    public_arch = {k: v for k, v in arch.items() if k not in ("word_vocab", "tag_vocab")}
    meta = {
        "mesimp_version": __version__,
        "model": kind,
        "hidden_sizes": json.dumps(widths),
        "arch": json.dumps(public_arch, sort_keys=True),
        "source": src.name,
        "source_sha256": _sha256(src),
    }
    if kind == "lstm-tagger":
        meta["vocab_size"] = str(model.config.vocab_size)
        meta["num_tags"] = str(model.config.num_tags)
        tags = _tag_names(arch)
        if tags is not None:  # a few dozen UPOS names: small enough to keep (words are not)
            meta["tags"] = json.dumps(tags)
    else:
        meta["steps"] = str(inputs.steps)

    with tempfile.TemporaryDirectory(prefix="mesimp-export-") as tmp:
        raw = Path(tmp) / "model.onnx"
        if kind == "lstm-tagger":  # 2 x 5 word ids: no axis of size 1 for the tracer to fix
            example = torch.arange(1, 11).reshape(2, 5) % model.config.vocab_size
        else:
            example = torch.from_numpy(inputs.check[0][:2].copy())
        torch_to_onnx(model, (example,), raw, opset, axes, [in_name], [OUTPUT_NAME], exporter)
        proto = onnx.load(str(raw))
        _check_lstm_graph(proto, len(widths), in_name, exporter)
        _set_metadata(proto, meta)
        _check(proto, "exported model")
        fp32_bytes = proto.SerializeToString()

        sess = _session(fp32_bytes)
        got = _run_seq(sess, inputs.check)
        with torch.no_grad():
            ref = [model(torch.from_numpy(x)).numpy() for x in inputs.check]
        max_abs_diff = _check_parity(got, ref, inputs.n_check)
        result: dict[str, Any] = {
            "path": str(out),
            "model": kind,
            "opset": opset,
            "exporter": exporter,
            "max_abs_diff": max_abs_diff,
            "n_check": inputs.n_check,
            "check_data": inputs.source,
            "int8": bool(int8),
            "fp32_accuracy": None,
            "lstm_nodes": sum(n.op_type == "LSTM" for n in proto.graph.node),
        }
        if inputs.tokens is not None:
            result["check_tokens"] = inputs.tokens
        if inputs.evals is not None:
            fp32_out = _run_seq(sess, inputs.evals)
            result["fp32_accuracy"] = _seq_accuracy(fp32_out, inputs.labels, inputs.masks)
            eval_runs, eval_masks = inputs.evals, inputs.masks
        else:
            fp32_out, eval_runs, eval_masks = got, inputs.check, inputs.check_masks

        payload = fp32_bytes
        if int8:
            payload, stats = _quantize_int8(
                fp32_bytes, Path(tmp), meta, int8_mode, list(LSTM_INT8_OPS)
            )
            qproto = onnx.load_from_string(payload)
            n_q = sum(n.op_type == "DynamicQuantizeLSTM" for n in qproto.graph.node)
            if n_q != len(widths):
                raise ExportError(
                    f"int8 quantization turned {n_q} of {len(widths)} LSTM layers into "
                    f"DynamicQuantizeLSTM; not writing {out}"
                )
            qsess = _session(payload)
            q_out = _run_seq(qsess, eval_runs)
            q_check = _run_seq(qsess, inputs.check) if inputs.evals is not None else q_out
            agreement = _seq_agreement(q_out, fp32_out, eval_masks)
            result.update(
                int8_accuracy=(
                    _seq_accuracy(q_out, inputs.labels, inputs.masks)
                    if inputs.labels is not None
                    else None
                ),
                int8_agreement=agreement,
                int8_max_abs_diff=_max_diff(q_check, ref),
                **stats,
            )
            if agreement < min_agreement:
                raise VerificationError(
                    f"int8 predictions agree with fp32 on only {agreement:.1%} of the "
                    f"{'tokens' if kind == 'lstm-tagger' else 'test set'} "
                    f"(< {min_agreement:.1%}); not writing {out}"
                )

    atomic_write_bytes(out, payload)
    result.update(
        hidden_sizes=widths,
        params=count_params(model),
        macs=count_macs(model),  # per time step: token or image row (models.count_macs)
        source=str(src),
        source_sha256=meta["source_sha256"],
        size_bytes=out.stat().st_size,
    )
    if kind == "lstm-tagger":
        result.update(vocab_size=model.config.vocab_size, num_tags=model.config.num_tags)
    else:
        result["steps"] = inputs.steps
    return result


def _check_lstm_graph(proto: Any, n_layers: int, in_name: str, exporter: str) -> None:
    """One ``LSTM`` node per layer, symbolic batch and sequence axes: the promised graph."""
    n = sum(node.op_type == "LSTM" for node in proto.graph.node)
    if n != n_layers:
        raise ExportError(
            f"the {exporter} exporter wrote {n} LSTM nodes for {n_layers} LSTM layers "
            f"(try exporter='torchscript')"
        )
    inp = next((i for i in proto.graph.input if i.name == in_name), None)
    dims = list(inp.type.tensor_type.shape.dim) if inp is not None else []
    if len(dims) < 2 or any(not d.dim_param for d in dims[:2]):
        raise ExportError(
            f"the {exporter} exporter fixed the batch or sequence axis of {in_name!r} "
            f"(try exporter='torchscript')"
        )


def _tag_names(arch: dict[str, Any]) -> list[str] | None:
    try:
        return Vocab.from_dict(arch["tag_vocab"]).itos if "tag_vocab" in arch else None
    except DataError:
        return None


def _checkpoint_test_file(ckpt: dict[str, Any]) -> Path | None:
    """The CoNLL-U test file recorded by ``train_lstm``, if it still exists here."""
    train = ckpt.get("train")
    info = train.get("data") if isinstance(train, dict) else None
    path = info.get("test") if isinstance(info, dict) else None
    return Path(path) if isinstance(path, str) and Path(path).is_file() else None


def _tagger_inputs(
    ckpt: dict[str, Any], conllu: str | os.PathLike | None, n_check: int
) -> _SeqInputs:
    """Sentences for a tagger's checks: ``conllu`` (or the checkpoint's recorded test file)
    encoded with the checkpoint's vocabularies, else random word ids of random lengths."""
    arch = ckpt["arch"]
    vocab_size = int(arch["vocab_size"])
    path = Path(conllu) if conllu is not None else _checkpoint_test_file(ckpt)
    if path is None:
        rng = np.random.default_rng(0)
        lengths = rng.integers(1, RANDOM_MAX_LEN + 1, n_check)
        seqs = [rng.integers(min(1, vocab_size - 1), vocab_size, n) for n in lengths]
        runs, _, masks = _sentence_runs(seqs, None)
        return _SeqInputs(
            runs, masks, None, None, None, "random", n_check, tokens=int(lengths.sum())
        )
    if not isinstance(arch.get("word_vocab"), dict) or not isinstance(arch.get("tag_vocab"), dict):
        raise BadInputError(f"the checkpoint has no vocabularies to encode {path} with")
    word_vocab = Vocab.from_dict(arch["word_vocab"])
    tag_vocab = Vocab.from_dict(arch["tag_vocab"])
    if len(word_vocab) > vocab_size or len(tag_vocab) > int(arch["num_tags"]):
        raise CheckpointError(
            f"the checkpoint's vocabularies ({len(word_vocab)} words, {len(tag_vocab)} tags) "
            f"exceed its model ({vocab_size} words, {arch['num_tags']} tags)"
        )
    sents = read_conllu(path)
    words, tags, lengths = tagging_tensors(sents, word_vocab, tag_vocab)
    w, t = words.numpy(), tags.numpy()
    seqs = [w[i, :n] for i, n in enumerate(lengths.tolist())]
    labels = [t[i, :n] for i, n in enumerate(lengths.tolist())]
    check, _, check_masks = _sentence_runs(seqs[:n_check], None)
    evals, ev_labels, masks = _sentence_runs(seqs, labels)
    return _SeqInputs(
        check,
        check_masks,
        evals,
        ev_labels,
        masks,
        str(path),
        min(n_check, len(seqs)),
        tokens=int(lengths[:n_check].sum()),
    )


def _sentence_runs(
    seqs: list[np.ndarray], labels: list[np.ndarray] | None
) -> tuple[list[np.ndarray], list[np.ndarray] | None, list[np.ndarray]]:
    """Sentences grouped by length into runs of ``CHECK_BATCH``, each padded with 0 to its
    longest sentence (after the words, as in training): (word ids, tag ids, real-token masks)."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    runs, tag_runs, masks = [], [], []
    for start in range(0, len(order), CHECK_BATCH):
        idx = order[start : start + CHECK_BATCH]
        t = max(len(seqs[i]) for i in idx)
        x = np.zeros((len(idx), t), np.int64)
        y = np.zeros((len(idx), t), np.int64)
        m = np.zeros((len(idx), t), bool)
        for r, i in enumerate(idx):
            n = len(seqs[i])
            x[r, :n] = seqs[i]
            m[r, :n] = True
            if labels is not None:
                y[r, :n] = labels[i]
        runs.append(x)
        tag_runs.append(y)
        masks.append(m)
    return runs, (tag_runs if labels is not None else None), masks


def _rows_inputs(
    data: str | os.PathLike | None, width: int, n_check: int, required: bool
) -> _SeqInputs:
    """Test images as ``[N, rows, width]`` sequences (``load_eval_data``'s rules: the
    default data locations when ``data`` is None; random ``width x width`` images if none
    is found and the data is not ``required``)."""
    from mesimp.data import load_image_dataset

    chunk = 8 * CHECK_BATCH
    try:
        ds = load_image_dataset(data, dev_size=0)
    except DataError:
        if data is not None or required:
            raise
        g = torch.Generator().manual_seed(0)
        x = torch.rand(n_check, width, width, generator=g).numpy()
        runs = [x[i : i + chunk] for i in range(0, len(x), chunk)]
        masks = [np.ones(len(r), bool) for r in runs]
        return _SeqInputs(runs, masks, None, None, None, "random", n_check, steps=width)
    h, w = ds.image_shape
    if w != width:
        raise BadInputError(
            f"the model reads rows of {width} pixels but the images at {ds.source} are "
            f"{h}x{w}; pass the --data the model was trained on"
        )
    x = ds.x_test.numpy().reshape(-1, h, w)
    y = ds.y_test.numpy()
    check = [x[:n_check][i : i + chunk] for i in range(0, min(n_check, len(x)), chunk)]
    evals = [x[i : i + chunk] for i in range(0, len(x), chunk)]
    labels = [y[i : i + chunk] for i in range(0, len(y), chunk)]
    return _SeqInputs(
        check,
        [np.ones(len(r), bool) for r in check],
        evals,
        labels,
        [np.ones(len(r), bool) for r in evals],
        ds.source,
        min(n_check, len(x)),
        steps=h,
    )


def _run_seq(session: Any, runs: list[np.ndarray]) -> list[np.ndarray]:
    """onnxruntime's outputs per run; a graph that loads but cannot run these shapes (a
    sequence length baked into a Reshape, say) fails verification in one line."""
    name = session.get_inputs()[0].name
    try:
        return [session.run(None, {name: np.ascontiguousarray(x)})[0] for x in runs]
    except ort_errors() as e:
        raise VerificationError(
            f"onnxruntime cannot run the exported model ({ort_message(e)})"
        ) from e


def _seq_accuracy(
    outs: list[np.ndarray], labels: list[np.ndarray] | None, masks: list[np.ndarray] | None
) -> float | None:
    """Token (or example) accuracy over the masked outputs; unknown tags count as errors."""
    if labels is None or masks is None:
        return None
    total = sum(int(m.sum()) for m in masks)
    correct = sum(
        int(((o.argmax(-1) == y) & m).sum()) for o, y, m in zip(outs, labels, masks, strict=True)
    )
    return correct / total if total else None


def _seq_agreement(a: list[np.ndarray], b: list[np.ndarray], masks: list[np.ndarray]) -> float:
    total = sum(int(m.sum()) for m in masks)
    same = sum(
        int(((x.argmax(-1) == y.argmax(-1)) & m).sum()) for x, y, m in zip(a, b, masks, strict=True)
    )
    return same / total if total else 1.0
