"""Export of the dependency-parser family: the transition scorer as one ONNX graph.

The file takes ``features`` int64 ``[batch, 48]`` (the feature ids of
``mesimp.data.parse_features``) and gives ``logits [batch, transitions]``, batch axis
dynamic: three ``Gather`` lookups, a ``Concat``, ``Gemm``/``Relu``/``Gemm``. Masks are
folded into the weights as for the MLP (``export_dense.plain_model``). The transition
loop is not in the graph: a parser runs it in Python around the session
(``mesimp.data.parse_decode``), and the vocabularies it needs to turn words into ids
are in the file's metadata (``parser_vocabs``, JSON), so ``mesimp bench`` can parse
with the ONNX file alone.

Checks: parity on the oracle feature rows of ``conllu`` (default: the test file
recorded at training; random ids if neither exists), transition accuracy on them, and
UAS/LAS by parsing those sentences with the onnxruntime session.

Parity is ``max_abs_diff <= PARITY_TOL x max(1, largest |logit|)``: a parser's logits
reach the hundreds (a meProp-trained 500-d parser on EWT: up to 291), and a float32
``Gemm`` over 2,400 inputs then rounds differently in onnxruntime and PyTorch by
~1e-4 absolute (4e-7 relative, measured); a wrong weight or graph is off by O(1)
relative, so the scaled bound still catches it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mesimp.data.parse_decode import attachment_scores, parse
from mesimp.data.parse_features import ParserVocabs
from mesimp.data.parsing import parser_check_features
from mesimp.deploy import verify
from mesimp.deploy.export_dense import plain_model
from mesimp.deploy.export_family import OUTPUT_NAME, ExportFamily, Int8Check
from mesimp.deploy.verify import max_diff
from mesimp.errors import BadInputError, VerificationError
from mesimp.models import hidden_sizes

__all__ = ["FEATURES_NAME", "VOCABS_KEY", "ParserExport", "session_scorer"]

FEATURES_NAME = "features"
VOCABS_KEY = "parser_vocabs"  # metadata entry: the vocabularies as JSON
_VOCAB_FIELDS = ("word_vocab", "tag_vocab", "label_vocab")


def session_scorer(session: Any) -> Any:
    """A ``parse_decode`` scorer running an onnxruntime session of a parser file."""
    name = session.get_inputs()[0].name

    def score(x: np.ndarray) -> np.ndarray:
        return session.run(None, {name: x})[0]

    return score


class ParserExport(ExportFamily):
    """``features [batch, 48]`` int64 -> ``logits [batch, transitions]``."""

    kind = "parser"
    default_exporter = "dynamo"
    input_name = FEATURES_NAME
    axes = {FEATURES_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
    agreement_over = "check features"

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
        if data is not None:
            raise BadInputError("--data is image data; give a parser --conllu FILE")
        arch = ckpt["arch"]
        self.model = plain_model(ckpt)
        self.vocabs = ParserVocabs.from_dict(arch)
        self.public_arch = {k: v for k, v in arch.items() if k not in _VOCAB_FIELDS}
        self.vocab_json = json.dumps({k: arch[k] for k in _VOCAB_FIELDS})
        x, y, self.sentences, self.check_data = parser_check_features(ckpt, conllu, n_check)
        self.x_check, self.y_check = x.contiguous(), y
        self.hidden_sizes = hidden_sizes(self.model)
        self.n_check = len(self.x_check)
        self.scores: dict[str, Any] = {}

    def extra_metadata(self) -> dict[str, str]:
        return {VOCABS_KEY: self.vocab_json}

    def example(self) -> torch.Tensor:
        return self.x_check[:2].clone()

    def _accuracy(self, logits: np.ndarray) -> float | None:
        if self.y_check is None:
            return None
        return float((logits.argmax(-1) == self.y_check.numpy()).mean())

    def verify_fp32(self, session: Any) -> tuple[float, float | None]:
        with torch.no_grad():
            self.ref = self.model(self.x_check).numpy()
        got = session_scorer(session)(self.x_check.numpy())
        max_abs_diff = _check_scaled_parity(got, self.ref)
        self.fp32_logits = got
        if self.sentences:
            parses = parse(session_scorer(session), self.sentences, self.vocabs)
            s = attachment_scores(parses, self.sentences)
            self.scores = {
                "uas": s["uas"],
                "las": s["las"],
                "parsed_sentences": len(self.sentences),
            }
        return max_abs_diff, self._accuracy(got)

    def report(self, proto: Any) -> dict[str, Any]:
        # fp32_accuracy is transition accuracy on the oracle paths; uas/las by parsing
        return {"accuracy_is": "transition accuracy on the check features", **self.scores}

    def verify_int8(self, session: Any) -> Int8Check:
        q = session_scorer(session)(self.x_check.numpy())
        return Int8Check(
            accuracy=self._accuracy(q),
            agreement=float((q.argmax(-1) == self.fp32_logits.argmax(-1)).mean()),
            max_abs_diff=float(np.abs(q - self.ref).max()),
        )


def _check_scaled_parity(got: np.ndarray, ref: np.ndarray) -> float:
    """onnxruntime's logits against PyTorch's within ``PARITY_TOL`` times the logits'
    scale (module docstring), else ``VerificationError``; returns the max |diff|."""
    if got.shape != ref.shape:
        raise VerificationError(f"ONNX output shape {got.shape} != PyTorch's {ref.shape}")
    diff = max_diff([got], [ref])
    scale = max(1.0, float(np.abs(ref).max())) if ref.size else 1.0
    if not diff <= verify.PARITY_TOL * scale:
        raise VerificationError(
            f"ONNX and PyTorch outputs differ by {diff:.3g} > {verify.PARITY_TOL:g} x "
            f"{scale:.3g} (the largest |logit|) on {len(ref)} inputs; the export is not "
            "trustworthy"
        )
    return diff
