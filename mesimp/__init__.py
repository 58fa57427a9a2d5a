"""mesimp: meProp sparse backpropagation, meSimp simplification, shrink, ONNX export.

The public API; every name here is re-exported from the module that owns it.
"""

from mesimp._version import __version__
from mesimp.deploy.bench import bench
from mesimp.deploy.export_module import export_onnx
from mesimp.errors import BadInputError, CheckpointError, DataError, MesimpError
from mesimp.files.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from mesimp.files.model_file import load_model, save_model
from mesimp.models import MLP, MLPConfig, build_model
from mesimp.nn.conv import MePropConv2d
from mesimp.nn.linear import MePropLinear
from mesimp.nn.lstm import MePropLSTM
from mesimp.nn.meprop import MePropConfig
from mesimp.nn.swap import meprop_
from mesimp.simplify.graph_shrink import shrink
from mesimp.simplify.rule import SimplifyConfig
from mesimp.simplify.simplifier import Simplifier
from mesimp.training.loop import (
    TrainConfig,
    TrainingDiverged,
    TrainingInterrupted,
    resume_config,
    train,
)
from mesimp.training.optim import RowSparseAdam, build_optimizer

__all__ = [
    "__version__",
    "bench",
    "export_onnx",
    "BadInputError",
    "CheckpointError",
    "DataError",
    "MLP",
    "MLPConfig",
    "MePropConfig",
    "MePropConv2d",
    "MePropLSTM",
    "MePropLinear",
    "MesimpError",
    "RowSparseAdam",
    "Simplifier",
    "SimplifyConfig",
    "TrainConfig",
    "build_model",
    "build_optimizer",
    "load_checkpoint",
    "load_model",
    "meprop_",
    "model_from_checkpoint",
    "save_checkpoint",
    "save_model",
    "shrink",
    "train",
    "resume_config",
    "TrainingDiverged",
    "TrainingInterrupted",
]
