"""mesimp: meProp sparse backpropagation, meSimp simplification, shrink, ONNX export.

The public API; every name here is re-exported from the module that owns it.
"""

from mesimp._moved import install as _install_moved
from mesimp._version import __version__
from mesimp.data.tasks import Task
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
from mesimp.training.config import TrainConfig
from mesimp.training.loop import train
from mesimp.training.optim import (
    RowSparseAdagrad,
    RowSparseAdam,
    RowSparseAdamW,
    RowSparseSGD,
    build_optimizer,
)
from mesimp.training.resume import resume_config
from mesimp.training.runsafety import TrainingDiverged, TrainingInterrupted
from mesimp.training.sequence import train_lstm, train_tagger

_install_moved()  # old module paths import with a DeprecationWarning naming the new one

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
    "RowSparseAdagrad",
    "RowSparseAdam",
    "RowSparseAdamW",
    "RowSparseSGD",
    "Simplifier",
    "SimplifyConfig",
    "Task",
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
    "train_lstm",
    "train_tagger",
    "resume_config",
    "TrainingDiverged",
    "TrainingInterrupted",
]
