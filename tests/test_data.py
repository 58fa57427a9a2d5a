"""Tests for mesimp.data: the IDX loader and the image dataset loader."""

from __future__ import annotations

import gzip
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mesimp.data import (
    ImageDataset,
    default_data_dirs,
    find_image_data,
    load_idx,
    load_image_dataset,
)
from mesimp.data import images as images_mod
from mesimp.errors import DataError

REAL = Path("/usr/share/datasets/fashion-mnist")
CODES = {"u1": 0x08, "i1": 0x09, "i2": 0x0B, "i4": 0x0C, "f4": 0x0D, "f8": 0x0E}
STEMS = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def idx_bytes(arr: np.ndarray, dims: tuple[int, ...] | None = None) -> bytes:
    """Encode ``arr`` as IDX; ``dims`` overrides the header's shape (to forge bad headers)."""
    kind = arr.dtype.str[1:]
    dims = arr.shape if dims is None else dims
    head = bytes([0, 0, CODES[kind], len(dims)]) + np.array(dims, dtype=">u4").tobytes()
    return head + arr.astype(">" + kind).tobytes()


def write(path: Path, data: bytes, gz: bool = False) -> Path:
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def raises_data_error(path: Path, match: str | None = None, **kw: int) -> DataError:
    with pytest.raises(DataError, match=match) as info:
        load_idx(path, **kw)
    assert "\n" not in str(info.value)
    return info.value


# ---------------------------------------------------------------------------- IDX: round trip


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("kind", list(CODES))
@pytest.mark.parametrize("shape", [(5,), (3, 4), (2, 3, 4), (2, 1, 3, 2), (0, 28, 28)])
def test_idx_round_trip(tmp_path: Path, kind: str, shape: tuple[int, ...], gz: bool) -> None:
    rng = np.random.default_rng(0)
    arr = (rng.standard_normal(shape) * 100).astype(kind)
    out = load_idx(write(tmp_path / "a.idx", idx_bytes(arr), gz))
    assert out.dtype == np.dtype(kind) and out.dtype.isnative
    assert out.flags.c_contiguous and out.shape == shape
    np.testing.assert_array_equal(out, arr)


@FUZZ
@given(
    arr=hnp.arrays(
        dtype=st.sampled_from([np.dtype(k) for k in CODES]),
        shape=hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=5),
    ),
    gz=st.booleans(),
)
def test_idx_round_trip_fuzz(tmp_path_factory, arr: np.ndarray, gz: bool) -> None:
    path = write(tmp_path_factory.mktemp("idx") / "f", idx_bytes(arr), gz)
    out = load_idx(path)
    assert out.dtype == arr.dtype and out.dtype.isnative and out.flags.c_contiguous
    np.testing.assert_array_equal(out, arr)


def _parse_or_data_error(path: Path) -> None:
    try:
        out = load_idx(path)
    except DataError as e:
        assert "\n" not in str(e)
    else:
        assert isinstance(out, np.ndarray) and out.flags.c_contiguous


@FUZZ
@given(data=st.binary(max_size=300), gz=st.booleans())
def test_idx_random_bytes_parse_or_data_error(tmp_path_factory, data: bytes, gz: bool) -> None:
    _parse_or_data_error(write(tmp_path_factory.mktemp("rnd") / "f", data, gz))


@pytest.mark.parametrize("gz", [False, True])
def test_idx_empty_array_with_huge_dims_is_a_data_error(tmp_path, gz):
    """0 bytes of payload, but dims numpy cannot hold (found by the fuzz test below)."""
    dims = (0, 2**32 - 1, 2**32 - 1, 2**32 - 1)
    p = write(tmp_path / "f", idx_bytes(np.zeros(0, np.uint8), dims=dims), gz)
    raises_data_error(p, match="numpy cannot hold")


@FUZZ
@given(
    header=st.tuples(
        st.sampled_from([0, 1]),
        st.sampled_from([0x08, 0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x0E]),
        st.integers(0, 6),
    ),
    dims=st.lists(st.integers(0, 2**32 - 1) | st.integers(0, 6), max_size=6),
    payload=st.binary(max_size=200),
    gz=st.booleans(),
)
def test_idx_plausible_headers_parse_or_data_error(
    tmp_path_factory, header: tuple[int, int, int], dims: list[int], payload: bytes, gz: bool
) -> None:
    """Random but IDX-shaped headers reach the size checks, not just the magic check."""
    data = bytes([0, *header]) + np.array(dims, dtype=">u4").tobytes() + payload
    _parse_or_data_error(write(tmp_path_factory.mktemp("hdr") / "f", data, gz))


@FUZZ
@given(pos=st.integers(0, 10_000), byte=st.integers(0, 255), cut=st.integers(0, 10_000))
def test_idx_mutated_gzip_parse_or_data_error(
    tmp_path_factory, pos: int, byte: int, cut: int
) -> None:
    good = gzip.compress(idx_bytes(np.arange(60, dtype=np.int32).reshape(3, 4, 5)))
    bad = bytearray(good[: max(1, len(good) - cut % len(good))])
    bad[pos % len(bad)] = byte
    _parse_or_data_error(write(tmp_path_factory.mktemp("mut") / "f", bytes(bad)))


# ------------------------------------------------------------------------- IDX: bad inputs


def test_idx_missing_file(tmp_path: Path) -> None:
    raises_data_error(tmp_path / "nope", match="not found")
    raises_data_error(tmp_path, match="not found")  # a directory is not an IDX file


@pytest.mark.parametrize(
    "head",
    [b"\x01\x00\x08\x01", b"\x00\x01\x08\x01", b"\x00\x00\x0a\x01", b"\x00\x00\x07\x01"],
    ids=["byte0", "byte1", "code-0a", "code-07"],
)
@pytest.mark.parametrize("gz", [False, True])
def test_idx_wrong_magic(tmp_path: Path, head: bytes, gz: bool) -> None:
    data = head + np.array([3], ">u4").tobytes() + b"abc"
    raises_data_error(write(tmp_path / "f", data, gz), match="not an IDX file")


@pytest.mark.parametrize("ndim", [0, 5, 255])
def test_idx_bad_ndim(tmp_path: Path, ndim: int) -> None:
    data = bytes([0, 0, 8, ndim]) + np.ones(ndim, ">u4").tobytes() + b"\x00"
    raises_data_error(write(tmp_path / "f", data), match="ndim")


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("data", [b"", b"\x00\x00", b"\x00\x00\x08\x02\x00\x00\x00\x03"])
def test_idx_short_header(tmp_path: Path, data: bytes, gz: bool) -> None:
    raises_data_error(write(tmp_path / "f", data, gz), match="short")


@pytest.mark.parametrize("gz", [False, True])
def test_idx_header_larger_than_payload(tmp_path: Path, gz: bool) -> None:
    arr = np.arange(12, dtype=np.uint8).reshape(3, 4)
    path = write(tmp_path / "f", idx_bytes(arr, dims=(4, 4)), gz)
    raises_data_error(path, match="truncated")


@pytest.mark.parametrize("gz", [False, True])
def test_idx_trailing_bytes(tmp_path: Path, gz: bool) -> None:
    arr = np.arange(12, dtype=np.int16).reshape(3, 4)
    path = write(tmp_path / "f", idx_bytes(arr) + b"\x00", gz)
    raises_data_error(path, match="trailing")


@pytest.mark.parametrize("gz", [False, True])
def test_idx_huge_claim_fails_fast(tmp_path: Path, gz: bool) -> None:
    """A header claiming 2**31 x 2**31 float64 must fail before allocating anything."""
    arr = np.zeros(4, dtype=np.float64)
    path = write(tmp_path / "f", idx_bytes(arr, dims=(2**31, 2**31)), gz)
    start = time.perf_counter()
    raises_data_error(path)
    assert time.perf_counter() - start < 1.0


def test_idx_gz_claim_under_limit_reads_only_what_exists(tmp_path: Path) -> None:
    """A 1 GiB claim with a 16-byte gz payload is read in chunks, not preallocated."""
    path = write(tmp_path / "f", idx_bytes(np.zeros(16, np.uint8), dims=(2**20, 2**10)), True)
    start = time.perf_counter()
    raises_data_error(path, match="truncated")
    assert time.perf_counter() - start < 1.0


def test_idx_gzip_bomb_is_bounded(tmp_path: Path) -> None:
    """16 MiB of zeros behind a 4-byte header claim: reading stops at claim + 1 byte."""
    header = bytes([0, 0, 8, 1]) + np.array([4], ">u4").tobytes()
    path = write(tmp_path / "f", header + bytes(16 << 20), True)
    raises_data_error(path, match="trailing")


def test_idx_max_bytes(tmp_path: Path) -> None:
    arr = np.zeros(1000, np.uint8)
    for gz in (False, True):
        path = write(tmp_path / f"f{gz}", idx_bytes(arr), gz)
        raises_data_error(path, match="limit", max_bytes=999)
        assert load_idx(path, max_bytes=1000).shape == (1000,)


def test_idx_truncated_gz(tmp_path: Path) -> None:
    good = gzip.compress(idx_bytes(np.arange(500, dtype=np.int32)))
    for cut in (1, 8, len(good) // 2):
        raises_data_error(write(tmp_path / f"f{cut}", good[:-cut]), match="gzip")


def test_idx_corrupted_gz(tmp_path: Path) -> None:
    good = bytearray(gzip.compress(idx_bytes(np.arange(500, dtype=np.int32))))
    crc = bytearray(good)
    crc[-8] ^= 0xFF  # CRC32 of the payload
    raises_data_error(write(tmp_path / "crc", bytes(crc)), match="gzip")
    body = bytearray(good)
    body[12:20] = b"\xff" * 8  # the deflate stream itself
    raises_data_error(write(tmp_path / "body", bytes(body)), match="gzip")


# --------------------------------------------------------------------------- image datasets


def make_idx_dir(
    root: Path, n_train: int = 20, n_test: int = 7, gz: bool = True, seed: int = 0
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {
        "x_train": rng.integers(0, 256, (n_train, 4, 4), dtype=np.uint8),
        "y_train": rng.integers(0, 3, n_train, dtype=np.uint8),
        "x_test": rng.integers(0, 256, (n_test, 4, 4), dtype=np.uint8),
        "y_test": np.arange(n_test, dtype=np.uint8) % 4,  # class 3 only in test
    }
    root.mkdir(parents=True, exist_ok=True)
    for key, arr in arrays.items():
        write(root / (STEMS[key] + (".gz" if gz else "")), idx_bytes(arr), gz)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_load_idx_dir(tmp_path: Path, gz: bool) -> None:
    arrays = make_idx_dir(tmp_path / "toy-mnist", gz=gz)
    ds = load_image_dataset(tmp_path / "toy-mnist", dev_size=5)
    assert isinstance(ds, ImageDataset)
    x = torch.from_numpy(arrays["x_train"].reshape(20, 16)).float() / 255
    y = torch.from_numpy(arrays["y_train"]).long()
    assert torch.equal(ds.x_dev, x[:5]) and torch.equal(ds.x_train, x[5:])
    assert torch.equal(ds.y_dev, y[:5]) and torch.equal(ds.y_train, y[5:])
    assert ds.x_test.shape == (7, 16) and ds.y_test.tolist() == [0, 1, 2, 3, 0, 1, 2]
    for t in (ds.x_train, ds.x_dev, ds.x_test):
        assert t.dtype == torch.float32 and 0 <= t.min() and t.max() <= 1
    for t in (ds.y_train, ds.y_dev, ds.y_test):
        assert t.dtype == torch.int64
    assert (ds.name, ds.image_shape, ds.num_classes) == ("toy-mnist", (4, 4), 4)
    summary = ds.summary()
    assert json.loads(json.dumps(summary)) == summary
    assert summary == {
        "name": "toy-mnist",
        "source": str(tmp_path / "toy-mnist"),
        "train": 15,
        "dev": 5,
        "test": 7,
        "image_shape": [4, 4],
        "num_classes": 4,
    }


def test_dev_size_zero(tmp_path: Path) -> None:
    make_idx_dir(tmp_path / "d")
    ds = load_image_dataset(tmp_path / "d", dev_size=0)
    assert ds.x_dev.shape == (0, 16) and ds.y_dev.shape == (0,) and len(ds.y_train) == 20


@pytest.mark.parametrize("dev_size", [-1, 20, 21, 2.5, True, "5"])
def test_dev_size_out_of_range(tmp_path: Path, dev_size: object) -> None:
    make_idx_dir(tmp_path / "d")
    with pytest.raises(DataError, match="dev_size"):
        load_image_dataset(tmp_path / "d", dev_size=dev_size)  # type: ignore[arg-type]


def test_npz_round_trip_3d_uint8(tmp_path: Path) -> None:
    arrays = make_idx_dir(tmp_path / "src")
    np.savez(tmp_path / "toy.npz", **arrays)
    from_npz = load_image_dataset(tmp_path / "toy.npz", dev_size=3)
    from_idx = load_image_dataset(tmp_path / "src", dev_size=3)
    for key in ("x_train", "y_train", "x_dev", "y_dev", "x_test", "y_test"):
        assert torch.equal(getattr(from_npz, key), getattr(from_idx, key)), key
    assert from_npz.name == "toy" and from_npz.source == str(tmp_path / "toy.npz")
    assert from_npz.image_shape == (4, 4) and from_npz.num_classes == 4


def test_npz_round_trip_flat_float(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    x_train, x_test = rng.random((10, 9)), rng.random((4, 9)).astype(np.float32)
    y_train, y_test = np.arange(10) % 2, np.zeros(4, dtype=np.int32)
    np.savez(tmp_path / "f.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    ds = load_image_dataset(tmp_path / "f.npz", dev_size=2)
    assert ds.x_train.dtype == torch.float32 and ds.image_shape == (3, 3)
    assert torch.allclose(ds.x_dev, torch.from_numpy(x_train[:2]).float())
    assert torch.equal(ds.x_test, torch.from_numpy(x_test)) and ds.num_classes == 2


def test_npz_non_square_rows(tmp_path: Path) -> None:
    z = np.zeros((3, 10), np.uint8)
    np.savez(tmp_path / "f.npz", x_train=z, y_train=np.zeros(3, int), x_test=z, y_test=[0, 1, 2])
    assert load_image_dataset(tmp_path / "f.npz", dev_size=1).image_shape == (1, 10)


def test_npz_missing_keys(tmp_path: Path) -> None:
    np.savez(tmp_path / "f.npz", x_train=np.zeros((3, 4), np.uint8), y_test=np.zeros(3, int))
    with pytest.raises(DataError, match="lacks array.*y_train, x_test") as info:
        load_image_dataset(tmp_path / "f.npz")
    assert "x_train" not in str(info.value).split("lacks")[1].split("(has")[0]


@pytest.mark.parametrize("content", [b"not a zip", b""], ids=["garbage", "empty"])
def test_npz_unreadable(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "f.npz").write_bytes(content)
    with pytest.raises(DataError, match="f.npz"):
        load_image_dataset(tmp_path / "f.npz")


def test_npz_single_array_or_pickle(tmp_path: Path) -> None:
    np.save(tmp_path / "one.npy", np.zeros(3))
    (tmp_path / "one.npy").rename(tmp_path / "one.npz")
    with pytest.raises(DataError, match="single array"):
        load_image_dataset(tmp_path / "one.npz")
    obj = np.array([{"a": 1}], dtype=object)
    np.savez(tmp_path / "p.npz", x_train=obj, y_train=obj, x_test=obj, y_test=obj)
    with pytest.raises(DataError, match="p.npz"):
        load_image_dataset(tmp_path / "p.npz")


def _npz(tmp_path: Path, **over: object) -> Path:
    arrays: dict[str, object] = {
        "x_train": np.zeros((5, 2, 2), np.uint8),
        "y_train": np.zeros(5, np.int64),
        "x_test": np.zeros((3, 2, 2), np.uint8),
        "y_test": np.zeros(3, np.int64),
    }
    np.savez(tmp_path / "f.npz", **{**arrays, **over})
    return tmp_path / "f.npz"


@pytest.mark.parametrize(
    ("over", "match"),
    [
        ({"y_train": np.zeros(4, np.int64)}, r"f\.npz\[y_train\] has 4 labels .*has 5 images"),
        ({"y_test": np.zeros(4, np.int64)}, r"4 labels .*x_test\] has 3 images"),
        ({"y_train": np.array([0, 1, -1, 0, 0])}, "negative label"),
        ({"y_train": np.zeros(5, np.float32)}, "1-D integers"),
        ({"y_train": np.zeros((5, 1), np.int64)}, "1-D integers"),
        ({"x_train": np.zeros(5, np.uint8)}, "images must be"),
        ({"x_train": np.zeros((5, 2, 2), np.int32)}, "uint8 or float"),
        ({"x_train": np.full((5, 4), 2.0)}, r"outside \[0, 1\]"),
        ({"x_train": np.full((5, 4), np.nan)}, r"outside \[0, 1\]"),
        ({"x_test": np.zeros((3, 3, 3), np.uint8)}, "same size"),
        ({"x_test": np.zeros((3, 0), np.uint8)}, "no pixels"),
    ],
)
def test_npz_validation(tmp_path: Path, over: dict[str, object], match: str) -> None:
    with pytest.raises(DataError, match=match) as info:
        load_image_dataset(_npz(tmp_path, **over), dev_size=1)
    assert "\n" not in str(info.value)


def test_idx_label_count_mismatch_names_files(tmp_path: Path) -> None:
    make_idx_dir(tmp_path / "d", gz=False)
    write(tmp_path / "d" / STEMS["y_train"], idx_bytes(np.zeros(19, np.uint8)))
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte has 19 labels .*has 20 images"):
        load_image_dataset(tmp_path / "d", dev_size=1)


def test_idx_dir_missing_file(tmp_path: Path) -> None:
    make_idx_dir(tmp_path / "d")
    (tmp_path / "d" / (STEMS["x_test"] + ".gz")).unlink()
    with pytest.raises(DataError, match=r"lacks t10k-images-idx3-ubyte\[\.gz\]"):
        load_image_dataset(tmp_path / "d")


def test_idx_dir_corrupt_file(tmp_path: Path) -> None:
    make_idx_dir(tmp_path / "d")
    path = tmp_path / "d" / (STEMS["x_train"] + ".gz")
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz: corrupt or truncated gzip"):
        load_image_dataset(tmp_path / "d")


def test_explicit_path_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data path not found"):
        find_image_data(tmp_path / "missing")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="not a .npz file"):
        find_image_data(tmp_path / "x.txt")


def test_nothing_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MESIMP_DATA", raising=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setattr(images_mod, "default_data_dirs", lambda: [tmp_path / "none", empty])
    with pytest.raises(DataError) as info:
        load_image_dataset()
    msg = str(info.value)
    assert msg.startswith("Fashion-MNIST not found (looked in: ")
    assert str(tmp_path / "none") in msg and str(empty) in msg
    assert "sudo apt-get install dataset-fashion-mnist" in msg and "--data DIR" in msg
    assert "\n" not in msg


def test_search_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    partial = tmp_path / "partial"
    make_idx_dir(partial)
    (partial / (STEMS["y_test"] + ".gz")).unlink()  # incomplete: skipped
    make_idx_dir(tmp_path / "second", gz=False)
    make_idx_dir(tmp_path / "third")
    dirs = [tmp_path / "none", partial, tmp_path / "second", tmp_path / "third"]
    monkeypatch.setattr(images_mod, "default_data_dirs", lambda: dirs)
    assert find_image_data() == tmp_path / "second"
    assert load_image_dataset(dev_size=2).source == str(tmp_path / "second")


def test_default_dirs_env_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESIMP_DATA", str(tmp_path / "mine"))
    dirs = default_data_dirs()
    assert dirs[0] == tmp_path / "mine"
    assert dirs[1:] == [
        Path.home() / ".cache/mesimp/fashion-mnist",
        Path.home() / ".cache/mesimp",
        REAL,
    ]
    make_idx_dir(tmp_path / "mine")
    assert find_image_data() == tmp_path / "mine"
    np.savez(tmp_path / "data.npz", **make_idx_dir(tmp_path / "other"))
    monkeypatch.setenv("MESIMP_DATA", str(tmp_path / "data.npz"))
    assert find_image_data() == tmp_path / "data.npz"
    monkeypatch.delenv("MESIMP_DATA")
    assert default_data_dirs()[0] == Path.home() / ".cache/mesimp/fashion-mnist"


# ------------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def fashion() -> ImageDataset:
    if not REAL.is_dir():
        pytest.skip(f"{REAL} is absent (sudo apt-get install dataset-fashion-mnist)")
    return load_image_dataset(str(REAL))


def test_real_fashion_mnist(fashion: ImageDataset) -> None:
    s = fashion.summary()
    assert (s["train"], s["dev"], s["test"]) == (55000, 5000, 10000)
    assert s["name"] == "fashion-mnist" and s["image_shape"] == [28, 28]
    assert s["num_classes"] == 10
    for x in (fashion.x_train, fashion.x_dev, fashion.x_test):
        assert x.shape[1] == 784 and x.dtype == torch.float32
        assert x.min() >= 0 and x.max() <= 1
    assert set(fashion.y_train.unique().tolist()) == set(range(10))


def test_real_dev_split_is_first_5000(fashion: ImageDataset) -> None:
    images = load_idx(REAL / "train-images-idx3-ubyte.gz")
    labels = load_idx(REAL / "train-labels-idx1-ubyte.gz")
    assert images.shape == (60000, 28, 28) and images.dtype == np.uint8
    raw = torch.from_numpy(images.reshape(60000, 784)).float() / 255
    assert torch.equal(fashion.x_dev, raw[:5000]) and torch.equal(fashion.x_train, raw[5000:])
    assert torch.equal(fashion.y_dev, torch.from_numpy(labels[:5000]).long())
    assert torch.equal(fashion.y_train, torch.from_numpy(labels[5000:]).long())
