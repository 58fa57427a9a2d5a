"""mesimp: meProp sparse backpropagation, meSimp simplification, shrink, ONNX export.

The public API; every name here is re-exported from the module that owns it.
"""

from mesimp._version import __version__
from mesimp.bench import bench
from mesimp.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from mesimp.errors import BadInputError, CheckpointError, DataError, MesimpError
from mesimp.export import export_onnx
from mesimp.layers import MePropLinear, meprop_
from mesimp.meprop import MePropConfig
from mesimp.models import MLP, MLPConfig, build_model
from mesimp.optim import RowSparseAdam, build_optimizer
from mesimp.simplify import SimplifyConfig
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
    "MePropLinear",
    "MesimpError",
    "RowSparseAdam",
    "SimplifyConfig",
    "TrainConfig",
    "build_model",
    "build_optimizer",
    "load_checkpoint",
    "meprop_",
    "model_from_checkpoint",
    "save_checkpoint",
    "train",
    "resume_config",
    "TrainingDiverged",
    "TrainingInterrupted",
]
