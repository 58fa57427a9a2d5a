"""Building a built-in model from its ``arch``, and the sizes of any model.

A checkpoint stores ``arch`` (plain types only) and the module is rebuilt from it
before ``load_state_dict`` (the nanoGPT pattern). The MLP *is* an
``nn.Sequential`` of ``nn.Linear``/``nn.ReLU``/``nn.Dropout``, so its state_dict
loads into a plain ``nn.Sequential`` that anyone can write by hand, and a shrunk
model needs no mesimp code to run.
"""

from typing import Any

from torch import nn

from mesimp.errors import BadInputError, CheckpointError
from mesimp.models.cnn import CNN, CNNConfig
from mesimp.models.lstm import LSTMStack, LSTMTagger, RowLSTMClassifier, RowLSTMConfig, TaggerConfig
from mesimp.models.mlp import MLP, MLPConfig
from mesimp.models.parser import Parser, ParserConfig

# tagger and parser metadata kept beside the config
_ARCH_KEYS_IGNORED = ("word_vocab", "tag_vocab", "label_vocab", "feature_vocabs")


ModelConfig = MLPConfig | CNNConfig | TaggerConfig | RowLSTMConfig | ParserConfig
_CONFIGS: dict[str, tuple[type, str]] = {
    "mlp": (MLPConfig, "an MLP"),
    "cnn": (CNNConfig, "a CNN"),
    "lstm-tagger": (TaggerConfig, "an LSTM tagger"),
    "lstm-rows": (RowLSTMConfig, "a row-sequential LSTM classifier"),
    "parser": (ParserConfig, "a dependency parser"),
}


def arch_from_dict(arch: dict[str, Any]) -> ModelConfig:
    """Rebuild a config from a checkpoint's ``arch`` dict, refusing unknown models."""
    if not isinstance(arch, dict) or "model" not in arch:
        raise CheckpointError("checkpoint 'arch' is missing or has no 'model' field")
    kind = arch["model"]
    if kind not in _CONFIGS:
        raise CheckpointError(
            f"unknown model type {kind!r} in checkpoint (supported: {', '.join(_CONFIGS)})"
        )
    cls, what = _CONFIGS[kind]
    fields = {k: v for k, v in arch.items() if k not in _ARCH_KEYS_IGNORED}
    try:
        return cls(**fields)
    except (TypeError, BadInputError) as e:
        raise CheckpointError(f"checkpoint 'arch' does not describe {what}: {e}") from e


def build_model(arch: dict[str, Any] | ModelConfig) -> nn.Module:
    """A plain PyTorch model (only ``torch.nn`` layers) for an ``arch``."""
    config = (
        arch
        if isinstance(arch, (MLPConfig, CNNConfig, TaggerConfig, RowLSTMConfig, ParserConfig))
        else arch_from_dict(arch)
    )
    if isinstance(config, CNNConfig):
        return CNN(config)
    if isinstance(config, TaggerConfig):
        return LSTMTagger(config)
    if isinstance(config, RowLSTMConfig):
        return RowLSTMClassifier(config)
    if isinstance(config, ParserConfig):
        return Parser(config)
    return MLP(config)


def is_lstm_model(model_or_arch: nn.Module | dict[str, Any]) -> bool:
    """True for the LSTM families (their shrink, export and bench paths differ)."""
    if isinstance(model_or_arch, dict):
        return model_or_arch.get("model") in ("lstm-tagger", "lstm-rows")
    return isinstance(model_or_arch, (LSTMTagger, RowLSTMClassifier))


def linear_layers(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The model's ``nn.Linear`` layers (``MePropLinear`` included) in forward order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def _stack_lstms(model: nn.Module) -> list[nn.Module] | None:
    stack = getattr(model, "stack", None)
    return list(stack.lstms) if isinstance(stack, LSTMStack) else None


def lstm_stack(model: nn.Module) -> nn.ModuleList:
    """The LSTM layers of an LSTM model (``model.stack.lstms``), in order."""
    stack = getattr(model, "stack", None)
    if not isinstance(stack, LSTMStack):
        raise BadInputError(f"{type(model).__name__} has no LSTM stack (model.stack.lstms)")
    return stack.lstms


def hidden_sizes(model: nn.Module) -> list[int]:
    """Widths of the hidden layers: the LSTM layers' hidden sizes for the LSTM models,
    else every Linear's output except the last one's."""
    lstms = _stack_lstms(model)
    if lstms is not None:
        return [m.hidden_size for m in lstms]
    if isinstance(model, CNN):
        return [c.out_channels for c in model.convs()]
    return [m.out_features for _, m in linear_layers(model)[:-1]]


# the arch field that holds a family's hidden widths
_WIDTHS = {"mlp": "hidden_sizes", "cnn": "channels", "lstm-tagger": "hidden", "lstm-rows": "hidden"}


def arch_at_widths(arch: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """``arch`` with the hidden widths ``model`` has now (after a compaction), so that
    a checkpoint rebuilds the model at those widths."""
    family = arch.get("model")
    widths = hidden_sizes(model)
    if family == "parser":
        return {**arch, "hidden": widths[0]}
    if family not in _WIDTHS:
        return dict(arch)
    return {**arch, _WIDTHS[family]: widths}


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module) -> int:
    """Multiply-accumulates per example for an MLP or CNN; per time step (token or image
    row) for the LSTM models: ``4h(in + h)`` per LSTM layer plus the output Linear."""
    if isinstance(model, CNN):
        return model.macs()
    lstms = _stack_lstms(model)
    lstm_macs = sum(4 * m.hidden_size * (m.input_size + m.hidden_size) for m in lstms or [])
    return lstm_macs + sum(m.in_features * m.out_features for _, m in linear_layers(model))
