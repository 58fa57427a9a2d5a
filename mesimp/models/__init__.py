"""Built-in model families (MLP, CNN, LSTM tagger, row LSTM, dependency parser), each
rebuilt from a plain ``arch`` dict (the nanoGPT pattern), and the size of any model
(params, MACs, widths)."""

from mesimp.models.cnn import CNN, CNNConfig
from mesimp.models.lstm import (
    LSTMStack,
    LSTMTagger,
    RowLSTMClassifier,
    RowLSTMConfig,
    TaggerConfig,
)
from mesimp.models.mlp import MLP, MLPConfig
from mesimp.models.parser import Parser, ParserConfig
from mesimp.models.registry import (
    ModelConfig,
    arch_at_widths,
    arch_from_dict,
    build_model,
    count_macs,
    count_params,
    hidden_sizes,
    is_lstm_model,
    linear_layers,
    lstm_stack,
)

__all__ = [
    "CNN",
    "CNNConfig",
    "LSTMStack",
    "LSTMTagger",
    "MLP",
    "MLPConfig",
    "ModelConfig",
    "Parser",
    "ParserConfig",
    "RowLSTMClassifier",
    "RowLSTMConfig",
    "TaggerConfig",
    "arch_at_widths",
    "arch_from_dict",
    "build_model",
    "count_macs",
    "count_params",
    "hidden_sizes",
    "is_lstm_model",
    "linear_layers",
    "lstm_stack",
]
