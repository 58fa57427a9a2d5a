"""Image classification datasets (Fashion-MNIST and other MNIST-format data) as tensors.

Data comes from a directory with the four standard IDX files or from a ``.npz`` file with
``x_train, y_train, x_test, y_test``. As in the meProp paper, the dev split is the *first*
``dev_size`` training examples, so runs are comparable without any shuffling seed.
"""

from __future__ import annotations

import math
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mesimp.data.idx import _one_line, load_idx
from mesimp.errors import BadInputError, DataError

# Split key -> IDX file stem (each may also end in ".gz").
IDX_FILES: dict[str, str] = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
NPZ_KEYS = tuple(IDX_FILES)
INSTALL_HINT = "install it with 'sudo apt-get install dataset-fashion-mnist' or pass --data DIR"


@dataclass
class ImageDataset:
    """Train/dev/test splits: x float32 in [0, 1] of shape [N, H*W], y int64 of shape [N]."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_dev: torch.Tensor
    y_dev: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    name: str
    source: str
    image_shape: tuple[int, int]
    num_classes: int

    def summary(self) -> dict[str, Any]:
        """Plain-typed description, fit for JSON logs and checkpoint metadata."""
        return {
            "name": self.name,
            "source": self.source,
            "train": len(self.y_train),
            "dev": len(self.y_dev),
            "test": len(self.y_test),
            "image_shape": list(self.image_shape),
            "num_classes": self.num_classes,
        }


def default_data_dirs() -> list[Path]:
    """Where to look for data when no path is given, in order (a function so tests can patch)."""
    dirs = [Path(env).expanduser()] if (env := os.environ.get("MESIMP_DATA")) else []
    cache = Path.home() / ".cache" / "mesimp"
    return [*dirs, cache / "fashion-mnist", cache, Path("/usr/share/datasets/fashion-mnist")]


def find_image_data(path: str | os.PathLike[str] | None = None) -> Path:
    """Return the IDX directory or ``.npz`` file to load: ``path`` if given, else the first hit
    in :func:`default_data_dirs`."""
    if path is not None:
        p = Path(path).expanduser()
        if p.is_dir():
            missing = [f"{stem}[.gz]" for stem in IDX_FILES.values() if _idx_file(p, stem) is None]
            if missing:
                raise DataError(
                    f"{p} lacks {', '.join(missing)}; point --data at a directory with the four "
                    f"MNIST-format IDX files or at a .npz file"
                )
            return p
        if p.is_file():
            if p.suffix != ".npz":
                raise DataError(f"{p} is not a .npz file; pass a .npz file or an IDX directory")
            return p
        raise DataError(f"data path not found: {p}; check --data (an IDX directory or a .npz file)")

    dirs = default_data_dirs()
    for d in dirs:
        if d.is_file() and d.suffix == ".npz":
            return d
        if d.is_dir() and all(_idx_file(d, stem) for stem in IDX_FILES.values()):
            return d
    looked = ", ".join(str(d) for d in dirs) or "nowhere"
    raise DataError(f"Fashion-MNIST not found (looked in: {looked}); {INSTALL_HINT}")


def load_image_dataset(
    path: str | os.PathLike[str] | None = None, dev_size: int = 5000
) -> ImageDataset:
    """Load and validate a dataset; the dev split is the first ``dev_size`` training examples."""
    src = find_image_data(path)
    arrays, where = _load_npz(src) if src.is_file() else _load_idx_dir(src)

    shapes = {}
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        xw, yw = where[f"x_{split}"], where[f"y_{split}"]
        shapes[split] = _check_images(x, xw)
        _check_labels(y, yw)
        if len(y) != len(x):
            raise DataError(
                f"{yw} has {len(y)} labels but {xw} has {len(x)} images; they must match"
            )
    if shapes["train"] != shapes["test"]:
        raise DataError(
            f"train images are {shapes['train']} but test images are {shapes['test']} "
            f"({where['x_train']} vs {where['x_test']}); both must have the same size"
        )
    n_train = len(arrays["y_train"])
    integral = isinstance(dev_size, (int, np.integer)) and not isinstance(dev_size, bool)
    if not integral or not 0 <= dev_size < n_train:
        raise DataError(
            f"dev_size must be an integer in [0, {n_train}) for {n_train} training examples, "
            f"got {dev_size!r}"
        )

    dev_size = int(dev_size)
    x, y = arrays["x_train"], arrays["y_train"]
    num_classes = int(max(y.max(initial=0), arrays["y_test"].max(initial=0))) + 1
    return ImageDataset(
        x_train=_x_tensor(x[dev_size:]),
        y_train=_y_tensor(y[dev_size:]),
        x_dev=_x_tensor(x[:dev_size]),
        y_dev=_y_tensor(y[:dev_size]),
        x_test=_x_tensor(arrays["x_test"]),
        y_test=_y_tensor(arrays["y_test"]),
        name=src.stem if src.is_file() else src.resolve().name,
        source=str(src),
        image_shape=shapes["train"],
        num_classes=num_classes,
    )


def _idx_file(d: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if (d / name).is_file():
            return d / name
    return None


def _load_idx_dir(d: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    # find_image_data checked presence; a file removed since then fails in load_idx.
    paths = {key: _idx_file(d, stem) or d / stem for key, stem in IDX_FILES.items()}
    return {key: load_idx(p) for key, p in paths.items()}, {k: str(p) for k, p in paths.items()}


def _load_npz(p: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    try:
        z = np.load(p, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise DataError(
                f"{p} holds a single array, not an .npz archive of {', '.join(NPZ_KEYS)}"
            )
        with z:
            files = list(z.files)
            arrays = {k: z[k] for k in NPZ_KEYS if k in files}
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise DataError(f"cannot read {p} as .npz: {_one_line(e)}") from e
    except DataError:
        raise
    except ValueError as e:  # object arrays (would need pickle) or malformed array headers
        raise DataError(f"{p}: unusable .npz ({_one_line(e)})") from e
    missing = [k for k in NPZ_KEYS if k not in arrays]
    if missing:
        raise DataError(
            f"{p} lacks array(s) {', '.join(missing)} (has: {', '.join(files) or 'none'}); "
            f"save it with np.savez(path, {', '.join(f'{k}=...' for k in NPZ_KEYS)})"
        )
    return arrays, {k: f"{p}[{k}]" for k in NPZ_KEYS}


def _check_images(x: np.ndarray, where: str) -> tuple[int, int]:
    """Validate an image array and return its (H, W); flat rows of F pixels are square or 1xF."""
    if x.ndim == 3:
        shape = (int(x.shape[1]), int(x.shape[2]))
    elif x.ndim == 2:
        side = math.isqrt(x.shape[1])
        shape = (side, side) if side * side == x.shape[1] else (1, int(x.shape[1]))
    else:
        raise DataError(f"{where} has shape {x.shape}; images must be [N, H, W] or [N, H*W]")
    if not shape[0] * shape[1]:
        raise DataError(f"{where} has shape {x.shape}: images with no pixels; check the file")
    if x.dtype == np.uint8:
        return shape
    if not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"{where} has dtype {x.dtype}; images must be uint8 or float in [0, 1]")
    if x.size and not (np.isfinite(x).all() and x.min() >= 0 and x.max() <= 1):
        raise DataError(
            f"{where} has float values outside [0, 1] (min {x.min()}, max {x.max()}); "
            f"store uint8 pixels or scale to [0, 1]"
        )
    return shape


def _check_labels(y: np.ndarray, where: str) -> None:
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{where} has shape {y.shape} dtype {y.dtype}; labels must be 1-D integers")
    if y.size and y.min() < 0:
        raise DataError(f"{where} has negative label {y.min()}; labels must be 0..num_classes-1")


def _x_tensor(x: np.ndarray) -> torch.Tensor:
    t = torch.tensor(x.reshape(len(x), math.prod(x.shape[1:])), dtype=torch.float32)
    return t.div_(255) if x.dtype == np.uint8 else t


def _y_tensor(y: np.ndarray) -> torch.Tensor:
    return torch.tensor(y, dtype=torch.int64)


def load_eval_data(
    data: str | os.PathLike[str] | None,
    in_features: int,
    dev_size: int = 0,
    required: bool = False,
) -> ImageDataset | None:
    """Data for a check on a trained model (``shrink``'s verification, ``export``'s parity).

    Such checks need the test split, so a training set too small for ``dev_size`` is
    loaded without a dev split rather than refused. With no ``data`` given and none found
    in the default locations it returns None (callers fall back to random inputs), unless
    ``required``. A feature-size mismatch with the model is refused.
    """
    try:
        try:
            ds = load_image_dataset(data, dev_size=dev_size)
        except DataError:
            if not dev_size:
                raise
            ds = load_image_dataset(data, dev_size=0)
    except DataError:
        if data is not None or required:
            raise  # asked for it: the user must hear why
        return None
    feats = ds.x_test.shape[1]
    if feats != in_features:
        raise BadInputError(
            f"the model takes {in_features} input features but the data at {ds.source} has "
            f"{feats} per example; pass the --data the model was trained on"
        )
    return ds
