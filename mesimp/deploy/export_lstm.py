"""Export of the LSTM families: ``lstm-tagger`` and ``lstm-rows`` checkpoints.

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
checked on real sentences, a row classifier on test images as ``[N, rows,
row_width]`` (``mesimp.deploy.lstm_check_data``). ``int8`` quantizes ``LSTM`` (to
``com.microsoft.DynamicQuantizeLSTM``), ``MatMul``/``Gemm`` and the embedding's
``Gather``; agreement is counted over real tokens.

``LstmExport`` holds what both share; ``TaggerExport`` and ``RowsExport`` differ only in
their input, check data, example and the fields they add to metadata and report.
"""

from __future__ import annotations

import json
import os
from abc import abstractmethod
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mesimp.data import Vocab
from mesimp.deploy.export_family import INPUT_NAME, OUTPUT_NAME, ExportFamily, Int8Check
from mesimp.deploy.int8 import DEFAULT_INT8_MODE, get_int8_mode
from mesimp.deploy.lstm_check_data import SeqInputs, rows_inputs, tagger_inputs
from mesimp.deploy.ort_errors import ort_errors, ort_message
from mesimp.deploy.torch_onnx import ExportError
from mesimp.deploy.verify import check_parity, max_diff
from mesimp.errors import BadInputError, DataError, VerificationError
from mesimp.files.checkpoint import model_from_checkpoint

__all__ = ["LSTM_INT8_OPS", "WORDS_NAME", "LstmExport", "RowsExport", "TaggerExport"]

WORDS_NAME = "words"  # a tagger's input: int64 word ids [batch, seq]
# int8 for LSTM graphs: the LSTMs, the output layer and the embedding table.
LSTM_INT8_OPS = ("LSTM", "MatMul", "Gemm", "Gather")


class LstmExport(ExportFamily):
    """What the LSTM families share: masks refused, one ``LSTM`` node per layer, checks
    over runs of sequences with masks (``SeqInputs``)."""

    default_exporter = "torchscript"
    int8_ops = list(LSTM_INT8_OPS)

    def __init__(
        self,
        ckpt: dict[str, Any],
        src: Path,
        *,
        data: str | os.PathLike | None,
        conllu: str | os.PathLike | None,
        n_check: int,
        int8: bool,
        int8_mode: str,
    ) -> None:
        arch = ckpt["arch"]
        self.kind = arch["model"]
        meprop = ckpt.get("meprop")
        layers = meprop.get("layers") if isinstance(meprop, dict) else None
        if layers:
            # a masked MePropLSTM is not a plain nn.LSTM: its masked units would come back
            raise BadInputError(
                f"{src} holds meProp LSTM masks: shrink it first (mesimp shrink {src})"
            )
        if int8 and not get_int8_mode(int8_mode).lstm:
            raise BadInputError(
                f"int8 mode {int8_mode} is not available for LSTM models: onnxruntime stores "
                f"LSTM weights as int8 (use --int8-mode {DEFAULT_INT8_MODE}, or s8)"
            )
        self.arch = arch
        self.public_arch = {
            k: v for k, v in arch.items() if k not in ("word_vocab", "tag_vocab", "feature_vocabs")
        }
        self.model = model_from_checkpoint(ckpt, meprop=False).eval()
        self.hidden_sizes = self.model.config.hidden_sizes()
        self.inputs = self.check_inputs(ckpt, data, conllu, n_check, int8)
        self.n_check = self.inputs.n_check
        self.check_data = self.inputs.source

    @abstractmethod
    def check_inputs(
        self,
        ckpt: dict[str, Any],
        data: str | os.PathLike | None,
        conllu: str | os.PathLike | None,
        n_check: int,
        int8: bool,
    ) -> SeqInputs:
        """The family's check data (refusing the data option it does not take)."""

    def check_graph(self, proto: Any, exporter: str) -> None:
        _check_lstm_graph(proto, len(self.hidden_sizes), self.input_name, exporter)

    def verify_fp32(self, session: Any) -> tuple[float, float | None]:
        inputs = self.inputs
        got = _run_seq(session, inputs.check)
        with torch.no_grad():
            self.ref = [self.model(torch.from_numpy(x)).numpy() for x in inputs.check]
        max_abs_diff = check_parity(got, self.ref, inputs.n_check)
        if inputs.evals is None:  # no labels: int8 agreement is measured on the parity sample
            self.fp32_out, self.eval_runs, self.eval_masks = got, inputs.check, inputs.check_masks
            return max_abs_diff, None
        self.fp32_out = _run_seq(session, inputs.evals)
        self.eval_runs, self.eval_masks = inputs.evals, inputs.masks
        return max_abs_diff, _seq_accuracy(self.fp32_out, inputs.labels, inputs.masks)

    def report(self, proto: Any) -> dict[str, Any]:
        fields: dict[str, Any] = {"lstm_nodes": sum(n.op_type == "LSTM" for n in proto.graph.node)}
        if self.inputs.tokens is not None:
            fields["check_tokens"] = self.inputs.tokens
        return fields

    def check_int8_graph(self, payload: bytes, out: Path) -> None:
        import onnx

        qproto = onnx.load_from_string(payload)
        n_q = sum(n.op_type == "DynamicQuantizeLSTM" for n in qproto.graph.node)
        if n_q != len(self.hidden_sizes):
            raise ExportError(
                f"int8 quantization turned {n_q} of {len(self.hidden_sizes)} LSTM layers into "
                f"DynamicQuantizeLSTM; not writing {out}"
            )

    def verify_int8(self, session: Any) -> Int8Check:
        inputs = self.inputs
        q_out = _run_seq(session, self.eval_runs)
        q_check = _run_seq(session, inputs.check) if inputs.evals is not None else q_out
        agreement = _seq_agreement(q_out, self.fp32_out, self.eval_masks)
        return Int8Check(
            accuracy=(
                _seq_accuracy(q_out, inputs.labels, inputs.masks)
                if inputs.labels is not None
                else None
            ),
            agreement=agreement,
            max_abs_diff=max_diff(q_check, self.ref),
        )


class TaggerExport(LstmExport):
    """``lstm-tagger``: ``words [batch, seq]`` -> ``logits [batch, seq, num_tags]``."""

    input_name = WORDS_NAME
    axes = {WORDS_NAME: {0: "batch", 1: "seq"}, OUTPUT_NAME: {0: "batch", 1: "seq"}}
    agreement_over = "tokens"

    def check_inputs(
        self,
        ckpt: dict[str, Any],
        data: str | os.PathLike | None,
        conllu: str | os.PathLike | None,
        n_check: int,
        int8: bool,
    ) -> SeqInputs:
        if data is not None:
            raise BadInputError("--data is for image models; give a tagger --conllu FILE")
        return tagger_inputs(ckpt, conllu, n_check)

    def extra_metadata(self) -> dict[str, str]:
        c = self.model.config
        meta = {"vocab_size": str(c.vocab_size), "num_tags": str(c.num_tags)}
        if c.feature_vocab_sizes:  # bench draws each input column's ids below its size
            meta["feature_vocab_sizes"] = json.dumps(c.feature_vocab_sizes)
        if c.bidirectional:
            meta["bidirectional"] = "true"
        tags = _tag_names(self.arch)
        if tags is not None:  # a few dozen UPOS names: small enough to keep (words are not)
            meta["tags"] = json.dumps(tags)
        return meta

    def example(self) -> torch.Tensor:
        # 2 x 5 word ids: no axis of size 1 for the tracer to fix (ids of every feature
        # table after them, as a last axis, for a tagger with features)
        c = self.model.config
        words = torch.arange(1, 11).reshape(2, 5)
        if not c.feature_vocab_sizes:
            return words % c.vocab_size
        sizes = torch.tensor([c.vocab_size, *c.feature_vocab_sizes])
        return words.unsqueeze(-1) % sizes

    def summary(self) -> dict[str, Any]:
        return {"vocab_size": self.model.config.vocab_size, "num_tags": self.model.config.num_tags}


class RowsExport(LstmExport):
    """``lstm-rows``: images read row by row, ``input [batch, steps, row_width]`` ->
    ``logits [batch, classes]``."""

    input_name = INPUT_NAME
    axes = {INPUT_NAME: {0: "batch", 1: "steps"}, OUTPUT_NAME: {0: "batch"}}

    def check_inputs(
        self,
        ckpt: dict[str, Any],
        data: str | os.PathLike | None,
        conllu: str | os.PathLike | None,
        n_check: int,
        int8: bool,
    ) -> SeqInputs:
        if conllu is not None:
            raise BadInputError("--conllu is for lstm-tagger checkpoints; this one is lstm-rows")
        return rows_inputs(data, int(self.model.config.in_features), n_check, required=int8)

    def extra_metadata(self) -> dict[str, str]:
        return {"steps": str(self.inputs.steps)}

    def example(self) -> torch.Tensor:
        return torch.from_numpy(self.inputs.check[0][:2].copy())

    def summary(self) -> dict[str, Any]:
        return {"steps": self.inputs.steps}


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
