"""Data loading: IDX files and image classification datasets (Fashion-MNIST by default)."""

from mesimp.data.idx import load_idx
from mesimp.data.images import ImageDataset, default_data_dirs, find_image_data, load_image_dataset

__all__ = ["ImageDataset", "default_data_dirs", "find_image_data", "load_idx", "load_image_dataset"]
from mesimp.data.conllu import (  # noqa: E402
    Sentence,
    Vocab,
    build_vocabs,
    encode_tags,
    iter_conllu,
    read_conllu,
    shape_class,
    split_dev,
    tagging_tensors,
)

__all__ += [
    "Sentence",
    "Vocab",
    "build_vocabs",
    "encode_tags",
    "iter_conllu",
    "read_conllu",
    "shape_class",
    "split_dev",
    "tagging_tensors",
]
