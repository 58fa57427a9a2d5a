"""``TrainConfig``: everything a training run depends on, for every model family.

It is stored in the checkpoint (``train.config``) so that a run can be resumed, and
one config type serves every family: a field a family does not read keeps its default
(``emb_dim`` for an MLP, ``data`` for the tagger) and the CLI refuses such an option when
it is given explicitly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from mesimp.errors import BadInputError, CheckpointError
from mesimp.nn.meprop import MePropConfig
from mesimp.simplify.rule import SimplifyConfig

# The built-in model families, and the task (data kind) each one trains on.
FAMILIES = {
    "mlp": "images",
    "cnn": "images",
    "lstm-tagger": "tagging",
    "lstm-rows": "rows",
    "parser": "parsing",
}
LSTM_FAMILIES = ("lstm-tagger", "lstm-rows")
CUSTOM = "custom"  # a user's own nn.Module (Python API only)

# Fields that change how a run is executed, not what it computes: a resumed run may
# set them anew. (Bit-identity across a resume still needs the same thread count.)
RUNTIME_FIELDS = frozenset({"threads", "save_every", "keep_last", "device"})


@dataclass
class TrainConfig:
    """Everything a run depends on; stored in the checkpoint under ``train.config``."""

    model: str = "mlp"  # a FAMILIES key; "custom" when train() is handed a module
    # image data (mlp, cnn, lstm-rows): an IDX directory or .npz; None = Fashion-MNIST
    data: str | None = None
    dev_size: int = 5000  # image data: the first N training images are the dev split
    # lstm-tagger, parser: CoNLL-U files (without dev_file, 10% of train_file is held out)
    train_file: str | None = None
    dev_file: str | None = None
    test_file: str | None = None
    max_len: int = 250  # lstm-tagger: a longer sentence is an error
    emb_dim: int = 100  # lstm-tagger: word embedding size (parser: each table's; CLI 50)
    activation: str = "relu"  # parser: relu or cube (Chen & Manning's)
    # lstm-tagger: a forward and a backward LSTM per layer (meProp/meSimp per direction),
    # the suffix and shape features, and length-bucketed batches (windows of N sentences)
    bidirectional: bool = False
    word_features: bool = False
    bucket: int = 0
    # mlp: hidden widths; cnn: channels per conv block; lstm-*: widths of stacked LSTMs
    hidden: int | list[int] = 500  # one width for every layer, or a width per layer
    layers: int = 2
    dropout: float = 0.0
    k: int | float = 0
    selection: str = "unified"
    msbp: float = 0.0
    sparse_update: bool = True
    optimizer: str = "adam"
    lr: float = 1e-3
    epochs: int = 5
    batch_size: int = 50
    seed: int = 1
    evals_per_epoch: int = 1
    output: str = "models/mlp.pt"
    init: str | None = None
    simplify: SimplifyConfig | None = None
    # meSimp: remove masked units from the training model at every simplification point
    # (mesimp.simplify.compact), so the rest of the run trains at the active widths
    compact: bool = True
    # knowledge distillation (mesimp.training.distill): a checkpoint of the same task whose
    # softened outputs the model also learns, with this weight and temperature
    teacher: str | None = None
    distill_alpha: float = 0.5
    distill_temperature: float = 4.0
    threads: int | None = None
    device: str = "auto"  # auto (CUDA when available), cpu or cuda
    extra: dict[str, Any] = field(default_factory=dict)
    # Write RUN.last.pt every N optimizer steps (and at every evaluation); 0 = only at
    # evaluations and on SIGINT/SIGTERM. One write of the default 784-500-500-10 model
    # (8.3 MB with Adam's moments) takes 12-25 ms here (serialize, fsync, rename): about
    # 1% of 1000 steps of the fastest configuration (unified k=20, 1.3-1.7 ms a step).
    save_every: int = 1000
    keep_last: bool = False  # keep RUN.last.pt (final weights + optimizer) after the run
    # The C# reference's semantics (mesimp.training.reference): summed loss, element-wise
    # clip to 5, dense bias gradient, its dense Adam, its init, 8-chunk epochs
    reference: bool = False
    # reference mode: count the C# heap's zero-gradient fills as meSimp hits, as it did
    # (False: the ablation that counts only units that got a gradient; Python API only)
    reference_zero_fills: bool = True

    def __post_init__(self) -> None:
        widths = self.hidden if isinstance(self.hidden, list) else [self.hidden]
        if not widths or any(isinstance(h, bool) or not isinstance(h, int) for h in widths):
            raise BadInputError(f"--hidden must be integers > 0, got {self.hidden!r}")
        if any(h <= 0 for h in widths):
            raise BadInputError(f"--hidden must be > 0, got {self.hidden}")
        if self.layers < 0:
            raise BadInputError(f"--layers must be >= 0, got {self.layers}")
        if self.model not in FAMILIES and self.model != CUSTOM:
            raise BadInputError(f"--model must be one of {', '.join(FAMILIES)}, got {self.model!r}")
        if self.model == "cnn" and (not self.hidden_sizes() or self.dropout):
            raise BadInputError("a CNN needs at least one block (--layers >= 1) and no --dropout")
        if self.model in LSTM_FAMILIES and not self.hidden_sizes():
            raise BadInputError("an LSTM model needs at least one layer (--layers >= 1)")
        for name in ("epochs", "batch_size", "evals_per_epoch", "emb_dim", "max_len"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise BadInputError(f"--{name.replace('_', '-')} must be an integer > 0, got {v!r}")
        if isinstance(self.bucket, bool) or not isinstance(self.bucket, int) or self.bucket < 0:
            raise BadInputError(f"--bucket must be an integer >= 0, got {self.bucket!r}")
        tagger_only = [n for n in ("bidirectional", "word_features", "bucket") if getattr(self, n)]
        if tagger_only and self.model in FAMILIES and self.model != "lstm-tagger":
            names = ", ".join("--" + n.replace("_", "-") for n in tagger_only)
            raise BadInputError(f"{names}: for --model lstm-tagger only, not {self.model}")
        if self.save_every < 0:
            raise BadInputError(f"--save-every must be >= 0, got {self.save_every}")
        self.meprop_config()  # validates k, selection, msbp
        sizes = self.hidden_sizes()
        if isinstance(self.k, int) and sizes and self.k > max(sizes):
            raise BadInputError(
                f"--k {self.k} is larger than every hidden width {sizes}: "
                "nothing to select (--k 0 is dense backprop)"
            )
        if self.simplify is not None and self.k == 0:
            raise BadInputError("--simplify needs meProp counts: set --k > 0 (e.g. --k 60)")
        if self.simplify is not None:
            self._check_simplify_epochs(self.simplify)
        if not 0.0 < self.distill_alpha <= 1.0:
            raise BadInputError(f"--distill-alpha must be in (0, 1], got {self.distill_alpha}")
        if not self.distill_temperature > 0:
            raise BadInputError(
                f"--distill-temperature must be > 0, got {self.distill_temperature}"
            )
        if self.teacher is not None and (self.reference or self.model == "parser"):
            raise BadInputError("--distill: not with --reference or --model parser")
        if self.reference:
            self._check_reference()
            self.compact = False  # the C# meSimp masks (mesimp.simplify.reference_schedule)

    def _check_simplify_epochs(self, s: SimplifyConfig) -> None:
        """A warm-up or a cubic target past the run's end would never simplify."""
        if s.warmup_epochs >= self.epochs:
            raise BadInputError(
                f"--warmup-epochs {s.warmup_epochs} leaves no epoch of the {self.epochs} "
                "to simplify in"
            )
        if s.target_epoch is not None and s.target_epoch > self.epochs:
            raise BadInputError(
                f"--target-epoch {s.target_epoch} is after the run's {self.epochs} epochs"
            )

    def _check_reference(self) -> None:
        """The reference is the C# MNIST MLP trained with its own Adam."""
        if self.model != "mlp":
            raise BadInputError(f"--reference reproduces the C# MLP; --model is {self.model}")
        if self.optimizer != "adam":
            raise BadInputError("--reference trains with the reference's Adam: drop --optimizer")
        if self.simplify is not None:  # the C# MLPVar (mesimp.simplify.reference_schedule)
            s = self.simplify
            if self.selection != "topk" or self.msbp or isinstance(self.k, float):
                raise BadInputError(
                    "--reference --simplify is the C# meSimp: per-example top-k with an int "
                    "--k (e.g. --k 160 --selection topk), no --msbp"
                )
            if s.warmup_epochs or s.schedule != "rate":
                raise BadInputError(
                    "--reference --simplify is the C# meSimp: no --warmup-epochs, --schedule rate"
                )
            if s.cycle_epochs < 1:
                raise BadInputError("--reference --simplify needs --cycle-epochs >= 1")
            if s.points_per_epoch != self.evals_per_epoch:
                raise BadInputError(
                    "--reference --simplify prunes after every dev check: --simplify-per-epoch "
                    f"({s.points_per_epoch}) must equal --evals-per-epoch ({self.evals_per_epoch})"
                )
        self.sparse_update = False  # the reference's Adam is dense

    def hidden_sizes(self) -> list[int]:
        if isinstance(self.hidden, list):
            return list(self.hidden)
        return [self.hidden] * self.layers

    def meprop_config(self) -> MePropConfig:
        return MePropConfig(
            k=self.k,
            selection=self.selection,
            msbp_alpha=self.msbp,
            sparse_grad=self.sparse_update,
            dense_bias=self.reference,
            heap_select=self.reference and self.selection == "topk" and isinstance(self.k, int),
            count_zero_fills=self.reference_zero_fills,
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["simplify"] = self.simplify.to_dict() if self.simplify else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """The inverse of ``to_dict``; unknown keys are ignored, missing ones defaulted
        (checkpoints written before a field existed still load)."""
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        kw.setdefault("compact", False)  # runs from before compaction go on masked
        simp = kw.get("simplify")
        if isinstance(simp, dict):
            sknown = {f.name for f in fields(SimplifyConfig)}
            kw["simplify"] = SimplifyConfig(**{k: v for k, v in simp.items() if k in sknown})
        try:
            return cls(**kw)
        except TypeError as e:
            raise CheckpointError(f"checkpoint holds a malformed train config: {e}") from e
