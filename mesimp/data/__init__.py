"""Data loading: IDX image files (Fashion-MNIST by default) and CoNLL-U treebanks."""

from mesimp.data.conllu import (
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
from mesimp.data.idx import load_idx
from mesimp.data.images import (
    ImageDataset,
    default_data_dirs,
    find_image_data,
    load_eval_data,
    load_image_dataset,
)

__all__ = [
    "ImageDataset",
    "Sentence",
    "Vocab",
    "build_vocabs",
    "default_data_dirs",
    "encode_tags",
    "find_image_data",
    "iter_conllu",
    "load_eval_data",
    "load_idx",
    "load_image_dataset",
    "read_conllu",
    "shape_class",
    "split_dev",
    "tagging_tensors",
]
