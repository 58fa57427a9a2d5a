"""mesimp: meProp sparse backpropagation, meSimp simplification, shrink, ONNX export.

The public API; every name here is re-exported from the module that owns it.
"""

from mesimp._version import __version__
from mesimp.bench import bench
from mesimp.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from mesimp.conv import MePropConv2d
from mesimp.errors import BadInputError, CheckpointError, DataError, MesimpError
from mesimp.export_module import export_onnx
from mesimp.graph_shrink import shrink
from mesimp.layers import MePropLinear
from mesimp.lstm import MePropLSTM
from mesimp.meprop import MePropConfig
from mesimp.model_file import load_model, save_model
from mesimp.models import MLP, MLPConfig, build_model
from mesimp.optim import RowSparseAdam, build_optimizer
from mesimp.simplifier import Simplifier
from mesimp.simplify import SimplifyConfig
from mesimp.swap import meprop_
from mesimp.train import TrainConfig, TrainingDiverged, TrainingInterrupted, resume_config, train

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
