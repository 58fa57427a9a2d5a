"""meProp, meSimp and shrink inside the Hugging Face ``Trainer`` (``pip install mesimp[hf]``).

    from mesimp.integrations.transformers import MesimpCallback

    cb = MesimpCallback(MePropConfig(k=0.25, selection="unified"),
                        SimplifyConfig(prune_rate=0.05, points_per_epoch=4))
    trainer = Trainer(model=model, args=args, train_dataset=train,
                      data_collator=collator, callbacks=[cb])
    trainer.train()
    small = cb.shrunk                       # the same model class, physically smaller

What the callback does, on the Trainer's own events:

* ``on_train_begin`` (the Trainer has built its optimizer and prepared the model by
  then): ``mesimp.meprop_`` swaps the model's ``nn.Linear`` layers for meProp layers.
  They share the original parameters, so the Trainer's optimizer and LR scheduler stay
  valid. A ``mesimp.Simplifier`` is set up with the Trainer's optimizer, its optimizer
  steps per epoch and epochs, and example inputs (two training examples through the
  Trainer's collator unless given).
* ``on_step_end`` (after every optimizer step, gradient accumulation included):
  ``Simplifier.step()``: simplification points mask units; at a cycle start it clears
  the state of the Trainer's optimizer (Adam's moments restart from zero) and the
  counters. With ``compact=True`` a point that masked units also removes them
  (``mesimp.simplify.compact``) and rebinds the Trainer's optimizer in place, its state
  sliced to the kept rows. Should layers be rebuilt with new parameters by anything
  else, the Trainer's optimizer is pointed at them by name and its state cleared
  (``follow_parameters``), so the Trainer needs no new optimizer.
* ``on_log``: the active widths per kind of unit (``mesimp/ffn``, ``mesimp/heads``,
  ``mesimp/kv_heads``, ``mesimp/hidden``; ``widths_by_kind``) are added to every log
  record made during training, so they land in
  ``trainer.state.log_history`` and reach every callback after this one (the progress
  bar, and the ``report_to`` reporters when the callback is placed first:
  ``MesimpCallback.attach(trainer)``). A simplification point always gets a record.
* ``on_train_end``: ``mesimp.shrink`` removes the masked units from a copy: ``cb.shrunk``
  (verified against the masked model in float64). The Trainer keeps the masked model.

Saving and deploying the shrunk model: ``save_hf_model`` writes mesimp's model file
(``mesimp.save_model`` with the factory ``mesimp.integrations.transformers:model_from_config``,
which rebuilds the model class from its config; ``mesimp.load_model`` replays the shrink
and the outputs are bit-identical). ``save_pretrained`` is not enough on its own: a
shrunk model has per-layer widths that no stock config describes (and transformers 5
dropped ``pruned_heads``). ``export_hf_onnx`` exports ``input_ids, attention_mask ->
logits`` with dynamic batch and sequence axes, checked against PyTorch.

``transformers`` is imported here, never by ``import mesimp``. It imports torchvision
when that is installed, which fails beside the CPU build of torch; ``import_transformers``
applies ``mesimp.integrations.torchvision_cpu`` first.
"""

from __future__ import annotations

import importlib.util
import inspect
import math
import os
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from mesimp.deploy.export_module import export_module
from mesimp.errors import BadInputError, MesimpError
from mesimp.files.model_file import save_model
from mesimp.nn.meprop import MePropConfig
from mesimp.nn.swap import meprop_
from mesimp.simplify.graph_shrink import shrink
from mesimp.simplify.rule import SimplifyConfig
from mesimp.simplify.simplifier import Simplifier

__all__ = [
    "FACTORY",
    "UNIT_KINDS",
    "LogitsOnly",
    "MesimpCallback",
    "export_hf_onnx",
    "follow_parameters",
    "hf_widths",
    "import_transformers",
    "model_from_config",
    "save_hf_model",
    "unit_kind",
    "widths_by_kind",
]

FACTORY = "mesimp.integrations.transformers:model_from_config"
UNIT_KINDS = ("heads", "ffn", "hidden")
Units = Literal["all", "ffn"]


def import_transformers() -> Any:
    """``import transformers`` (with torchvision made importable beside the CPU torch);
    a one-line ``MesimpError`` when it is not installed."""
    if importlib.util.find_spec("torchvision") is not None:
        from mesimp.integrations.torchvision_cpu import load

        load()
    try:
        import transformers
    except ImportError as e:
        raise MesimpError(
            f"this needs Hugging Face transformers: pip install 'mesimp[hf]' ({e})"
        ) from None
    return transformers


_hf = import_transformers()


# -- which units are which ---------------------------------------------------------------
# The one place that knows how transformer layers map to kinds of units: which layers
# ``units="ffn"`` swaps, and the names of the Simplifier's groups in the Trainer's logs
# (the groups themselves come from the dependency graph, mesimp.simplify.groups).

# name fragments of layers whose *output units* are of a kind (HF BERT/RoBERTa/ViT,
# Llama/Mistral/Qwen, GPT-2 naming)
_KIND_PATTERNS: dict[str, tuple[str, ...]] = {
    "heads": ("attention.self.", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
              "attn.c_attn", "attn.qkv", "attention.query_key_value"),
    "ffn": ("intermediate.dense", "mlp.gate_proj", "mlp.up_proj", "mlp.c_fc", "mlp.fc1",
            "mlp.dense_h_to_4h"),
    "hidden": ("attention.output.dense", "self_attn.o_proj", "mlp.down_proj", "attn.c_proj",
               "mlp.c_proj", "mlp.fc2", "attn.proj", "attention.dense", "mlp.dense_4h_to_h",
               ".output.dense"),
}  # fmt: skip


def unit_kind(name: str) -> str | None:
    """The kind of unit (``heads``, ``ffn``, ``hidden``) a layer's outputs are, from its
    name in a Hugging Face model (None: none of these, e.g. a classifier)."""
    for kind in UNIT_KINDS:  # heads before hidden: "attention.self." vs ".output.dense"
        if any(p in name for p in _KIND_PATTERNS[kind]):
            return kind
    return None


def meprop_filter(units: Units) -> Callable[[str, nn.Module], bool] | None:
    """Which layers ``meprop_`` swaps: all (``units="all"``: the Simplifier then takes
    every unit it can remove) or only those whose outputs are FFN units (``"ffn"``)."""
    if units == "all":
        return None
    return lambda name, module: unit_kind(name) == "ffn"


def widths_by_kind(simplifier: Simplifier) -> dict[str, int]:
    """Active units the Simplifier holds, summed per kind: ``heads`` (attention heads,
    and query-head slots under grouped-query attention), ``kv_heads``, ``ffn`` (a
    feed-forward unit: gated units too), ``hidden`` (the stream: the hidden size); a
    group of channels whose writers include an output projection, an embedding or a
    down projection is the stream."""
    out: dict[str, int] = defaultdict(int)
    for group, width in zip(simplifier.groups, simplifier.widths, strict=True):
        out[_group_kind(group)] += width
    return dict(out)


def _group_kind(group: Any) -> str:
    if group.kind in ("heads", "q_heads"):
        return "heads"
    if group.kind == "kv_heads":
        return "kv_heads"
    writers = [m.name for m in group.writers()]
    if any(unit_kind(n) == "hidden" or "embed" in n for n in writers):
        return "hidden"
    return unit_kind(group.name) or "other"


# (query projection, key projection, FFN writer) under one block, per model family
_BLOCK_PARTS = (
    ("attention.self.query", "attention.self.key", "intermediate.dense"),  # BERT, RoBERTa
    ("self_attn.q_proj", "self_attn.k_proj", "mlp.gate_proj"),  # Llama, Mistral, Qwen
)


def hf_widths(model: nn.Module) -> dict[str, Any]:
    """The widths of a (shrunk) transformer, read from its modules: ``{"hidden": stream
    width, "layers": [{"heads", "kv_heads", "ffn"}, ...]}`` (a head keeps its size, so
    heads = query rows // head size). BERT- and Llama-style models."""
    modules = dict(model.named_modules())
    hidden = model.get_input_embeddings().embedding_dim
    layers = []
    for q_name, q in modules.items():
        parts = next((p for p in _BLOCK_PARTS if q_name.endswith(p[0])), None)
        if parts is None:
            continue
        block = q_name[: -len(parts[0])]
        attn = modules[q_name.rpartition(".")[0]]
        head = getattr(attn, "attention_head_size", None) or getattr(attn, "head_dim", None)
        k, ffn = modules.get(block + parts[1]), modules.get(block + parts[2])
        if not head or k is None or ffn is None:
            raise BadInputError(f"{block.rstrip('.')}: not a BERT- or Llama-style block")
        layers.append(
            {
                "heads": q.out_features // head,
                "kv_heads": k.out_features // head,
                "ffn": ffn.out_features,
            }
        )
    if not layers:
        raise BadInputError(f"{type(model).__name__}: no BERT- or Llama-style attention blocks")
    return {"hidden": hidden, "layers": layers}


# -- the callback ---------------------------------------------------------------------


class MesimpCallback(_hf.TrainerCallback):
    """meProp training, meSimp and a final shrink for ``transformers.Trainer`` (see the
    module docstring). ``simplify=None`` trains with meProp only (no masks, no shrink).
    ``units``: ``"all"`` (meProp on every Linear but the output layer; meSimp on every
    unit the Simplifier can remove) or ``"ffn"`` (meProp and meSimp on the feed-forward
    units only). ``example_inputs``: the model's keyword inputs for tracing and for
    verifying the shrink (default: two training examples). ``compact``: remove masked
    units from the model at every simplification point (``Simplifier(compact=True)``):
    the rest of training runs at the active widths; the Trainer's optimizer is rebound
    in place (its state sliced), so the Trainer and its LR scheduler go on unchanged.
    """

    def __init__(
        self,
        meprop: MePropConfig,
        simplify: SimplifyConfig | None,
        *,
        units: Units = "all",
        example_inputs: dict[str, torch.Tensor] | None = None,
        shrink_at_end: bool = True,
        compact: bool = False,
    ) -> None:
        if not isinstance(meprop, MePropConfig):
            raise BadInputError(f"meprop must be a MePropConfig, got {type(meprop).__name__}")
        if simplify is not None and not isinstance(simplify, SimplifyConfig):
            raise BadInputError(f"simplify must be a SimplifyConfig, got {type(simplify).__name__}")
        if units not in ("all", "ffn"):
            raise BadInputError(f"units must be 'all' or 'ffn', got {units!r}")
        if example_inputs is not None and not (
            isinstance(example_inputs, dict)
            and all(isinstance(v, torch.Tensor) for v in example_inputs.values())
        ):
            raise BadInputError("example_inputs must be a dict of tensors (the model's kwargs)")
        self.meprop = meprop
        self.simplify = simplify
        self.units = units
        self.example_inputs = example_inputs
        self.shrink_at_end = shrink_at_end
        self.compact = compact
        self.simplifier: Simplifier | None = None
        self.shrunk: nn.Module | None = None  # set by on_train_end
        self.base_config: dict[str, Any] | None = None  # the model's config before training
        self.events: list[dict[str, Any]] = []  # the Simplifier's events, in order
        self._started = False
        self._training = False
        self._optimizer: torch.optim.Optimizer | None = None
        self._names: list[list[str | None]] = []  # the optimizer's parameters, by name

    def attach(self, trainer: Any) -> MesimpCallback:
        """Put this callback first in ``trainer``'s list, so that the reporters of
        ``report_to`` (which run before callbacks passed to the Trainer) see the widths
        it adds to each log. Returns self."""
        handler = trainer.callback_handler
        if self in handler.callbacks:
            handler.callbacks.remove(self)
        handler.callbacks.insert(0, self)
        return self

    # -- events ------------------------------------------------------------------------
    def on_train_begin(
        self,
        args: Any,
        state: Any,
        control: Any,
        model: nn.Module | None = None,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> Any:
        if self._started:
            raise BadInputError(
                "this MesimpCallback already ran a training: make a new one for another run"
            )
        if state.global_step > 0:
            raise BadInputError(
                "resuming a meSimp run from a Trainer checkpoint is not supported (its masks "
                "and counters are not in the checkpoint): train from the start"
            )
        if not isinstance(model, nn.Module) or optimizer is None:
            raise BadInputError("MesimpCallback needs the Trainer's model and optimizer")
        if self.simplify is not None and getattr(args, "load_best_model_at_end", False):
            raise BadInputError(
                "load_best_model_at_end would put weights from before the last masks under "
                "them: pick on dev after the shrink (e.g. while fine-tuning cb.shrunk)"
            )
        loader = kwargs.get("train_dataloader")
        steps = _steps_per_epoch(args, loader)
        inputs = self.example_inputs or _example_inputs(loader)
        device = next(model.parameters()).device
        self.example_inputs = {k: v.to(device) for k, v in inputs.items()}
        self.base_config = model.config.to_dict() if hasattr(model, "config") else None
        meprop_(model, self.meprop, filter_fn=meprop_filter(self.units))
        self._optimizer = _torch_optimizer(optimizer)
        self._names = optimizer_names(model, self._optimizer)
        self._started = True
        if self.simplify is None:
            return control
        try:
            self.simplifier = Simplifier(
                model,
                self.simplify,
                self._optimizer,
                steps_per_epoch=steps,
                epochs=math.ceil(state.num_train_epochs) if state.num_train_epochs else None,
                example_inputs=self.example_inputs,
                compact=self.compact,
            )
        except BadInputError as e:  # the same error, saying where it came from
            hint = "; simplify=None trains with meProp only" if "no meProp layer" in str(e) else ""
            raise type(e)(f"MesimpCallback on {type(model).__name__}: {e}{hint}") from None
        self._training = True
        return control

    def on_step_end(
        self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any
    ) -> Any:
        if self.simplifier is None:
            return control
        for event in self.simplifier.step():
            self.events.append({**event, "global_step": state.global_step})
            if event["event"] == "simplify":
                control.should_log = True  # a record at every point, with its widths
        if model is not None and follow_parameters(model, self._optimizer, self._names):
            self.events.append({"event": "optimizer_rebound", "global_step": state.global_step})
        return control

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
    ) -> Any:
        if not self._training or self.simplifier is None or logs is None:
            return control
        widths = {f"mesimp/{k}": v for k, v in widths_by_kind(self.simplifier).items()}
        logs.update(widths)
        last = state.log_history[-1] if state.log_history else None
        if last is not None and last.get("step") == state.global_step:
            last.update(widths)  # the Trainer appended a copy of logs before on_log
        return control

    def on_train_end(
        self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any
    ) -> Any:
        self._training = False
        if self.simplifier is None or not self.shrink_at_end or model is None:
            return control
        self.shrunk = self.shrink(model)
        return control

    def shrink(self, model: nn.Module) -> nn.Module:
        """``mesimp.shrink`` of the trained model on this callback's example inputs (what
        ``on_train_end`` does); the result remembers the config it was built from."""
        small = shrink(model, self.example_inputs)
        small.mesimp_base_config = self.base_config
        return small


def optimizer_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str | None]]:
    """Per parameter group, the model's name of each parameter (None: not the model's)."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [[name_of.get(id(p)) for p in g["params"]] for g in optimizer.param_groups]


def follow_parameters(
    model: nn.Module, optimizer: torch.optim.Optimizer | None, names: list[list[str | None]]
) -> bool:
    """When layers of ``model`` were rebuilt with new parameters (a Simplifier that
    compacts the model during training), point the Trainer's optimizer at them by name
    and clear its state (the old moments have the old shapes); True if it did. The
    optimizer object stays the same, so the Trainer and its LR scheduler keep working."""
    if optimizer is None:
        return False
    current = dict(model.named_parameters())
    stale = any(
        n is not None and current.get(n) is not p
        for g, group_names in zip(optimizer.param_groups, names, strict=True)
        for p, n in zip(g["params"], group_names, strict=True)
    )
    if not stale:
        return False
    for g, group_names in zip(optimizer.param_groups, names, strict=True):
        g["params"] = [
            current.get(n, p) if n is not None else p
            for p, n in zip(g["params"], group_names, strict=True)
        ]
    optimizer.state.clear()
    return True


def _torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` (or the same)."""
    while not type(optimizer).__module__.startswith("torch.") and isinstance(
        getattr(optimizer, "optimizer", None), torch.optim.Optimizer
    ):
        optimizer = optimizer.optimizer
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise BadInputError(f"the Trainer's optimizer is a {type(optimizer).__name__}")
    return optimizer


def _steps_per_epoch(args: Any, loader: Any) -> int:
    """Optimizer steps per epoch, computed as the Trainer computes them."""
    accumulate = max(int(args.gradient_accumulation_steps), 1)
    try:
        n = len(loader)
    except TypeError:
        if args.max_steps > 0:
            return int(args.max_steps)
        raise BadInputError(
            "MesimpCallback needs a training set with a length, or args.max_steps"
        ) from None
    return max(n // accumulate + int(n % accumulate > 0), 1)


def _example_inputs(loader: Any) -> dict[str, torch.Tensor]:
    """Two training examples through the Trainer's collator, labels left out."""
    dataset = getattr(loader, "dataset", None)
    collate = getattr(loader, "collate_fn", None)
    try:
        batch = collate([dataset[i] for i in range(min(2, len(dataset)))])
    except (TypeError, KeyError, IndexError) as e:
        raise BadInputError(
            f"cannot take example inputs from the training set ({e}): pass example_inputs="
        ) from None
    inputs = {k: v for k, v in dict(batch).items() if k != "labels" and isinstance(v, torch.Tensor)}
    if not inputs:
        raise BadInputError("the collated training batch holds no input tensors")
    return inputs


# -- the model file, ONNX --------------------------------------------------------------


def model_from_config(
    architecture: str, config: dict[str, Any], attn_implementation: str | None = None
) -> nn.Module:
    """A randomly initialised ``transformers.<architecture>`` built from a config dict
    (``config.to_dict()``): the factory of mesimp model files of Hugging Face models."""
    cls = getattr(_hf, architecture, None) if isinstance(architecture, str) else None
    if not (isinstance(cls, type) and issubclass(cls, _hf.PreTrainedModel)):
        raise BadInputError(f"{architecture!r} is not a model class of transformers")
    if not isinstance(config, dict):
        raise BadInputError(f"config must be a dict, got {type(config).__name__}")
    cfg = cls.config_class.from_dict(dict(config))
    if attn_implementation is not None:
        cfg._attn_implementation = attn_implementation
    return cls(cfg)


def _hf_model(model: Any) -> nn.Module:
    if not isinstance(model, _hf.PreTrainedModel):
        raise BadInputError(
            f"expected a transformers model (PreTrainedModel), got {type(model).__name__}"
        )
    return model


def _positional(model: nn.Module, inputs: Any) -> tuple[torch.Tensor, ...]:
    """``(input_ids, attention_mask)`` from a dict or tuple of them; the order in which
    BERT- and Llama-style models take them positionally."""
    if isinstance(inputs, dict):
        missing = [k for k in ("input_ids", "attention_mask") if k not in inputs]
        if missing:
            raise BadInputError(f"example inputs lack {', '.join(missing)}")
        extra = sorted(set(inputs) - {"input_ids", "attention_mask", "labels"})
        if extra:
            raise BadInputError(f"only input_ids and attention_mask are saved, not {extra}")
        inputs = (inputs["input_ids"], inputs["attention_mask"])
    if not (
        isinstance(inputs, (tuple, list))
        and 1 <= len(inputs) <= 2
        and all(isinstance(t, torch.Tensor) and t.dim() == 2 for t in inputs)
    ):
        raise BadInputError("example inputs must be input_ids[, attention_mask] of [batch, seq]")
    device = next(model.parameters()).device
    return tuple(t.to(device) for t in inputs)


def save_hf_model(
    path: str | os.PathLike,
    model: nn.Module,
    example_inputs: Any,
    base_config: dict[str, Any] | None = None,
) -> Path:
    """Write a (shrunk) Hugging Face model as a mesimp model file; ``mesimp.load_model``
    rebuilds it bit-identically. ``base_config``: the config of the model *before* the
    shrink (default: the one remembered by ``MesimpCallback.shrink``, else
    ``model.config``). ``example_inputs``: ``input_ids`` and ``attention_mask``."""
    model = _hf_model(model)
    config = base_config or getattr(model, "mesimp_base_config", None) or model.config.to_dict()
    kwargs = {
        "architecture": type(model).__name__,
        "config": config,
        "attn_implementation": model.config._attn_implementation,
    }
    return save_model(path, model, FACTORY, _positional(model, example_inputs), kwargs)


class LogitsOnly(nn.Module):
    """``model(input_ids, attention_mask).logits``: the plain-tensor signature that ONNX
    export and onnxruntime take."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        # a decoder would build a key/value cache, which is no output here
        params = inspect.signature(model.forward).parameters
        self._kwargs = {"use_cache": False} if "use_cache" in params else {}

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **self._kwargs)
        return out.logits


def export_hf_onnx(
    model: nn.Module, example_inputs: Any, path: str | os.PathLike, opset: int = 18
) -> dict[str, Any]:
    """Export ``input_ids[, attention_mask] -> logits`` to ONNX with symbolic ``batch``
    and ``sequence`` axes; parity with PyTorch is checked at other batch sizes and
    lengths before the file is written (``mesimp.export_onnx``'s result)."""
    model = _hf_model(model)
    inputs = _positional(model, example_inputs)
    return export_module(
        LogitsOnly(model),
        inputs,
        path,
        opset=opset,
        dynamic_axes={0: "batch", 1: "sequence"},
        metadata={"model_class": type(model).__name__},
    )
