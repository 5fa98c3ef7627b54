"""Data sources: HF `datasets` (hub name or local files) and a small built-in MNIST subset.

Everything becomes one `ArrayDataset` of contiguous numpy arrays: that is what the driver
puts into the Ray object store once, and what every pool reads zero-copy.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from sfl_ray.config_base import ConfigError

BUILTIN = Path(__file__).parent / "builtin"


@dataclass
class ArrayDataset:
    """Train and held-out test arrays.

    classification: x float32 (N, C, H, W) normalised, y int64 class ids, num_classes classes.
    lm (causal language modelling): x int64 token ids (N, T), y int64 (N, T) with -100 where no
    loss is taken (prompt, padding), num_classes = vocabulary size.
    `groups` holds per-training-sample metadata codes (e.g. E2E's eatType) for partitioning.
    """

    name: str
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    num_classes: int
    task: str = "classification"
    groups: dict = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])


def _normalise(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N, C, H, W) -> float32 standardised per channel with train statistics."""
    t = train.astype(np.float32) / 255.0
    mean = t.mean(axis=(0, 2, 3), keepdims=True, dtype=np.float64).astype(np.float32)
    std = t.std(axis=(0, 2, 3), keepdims=True, dtype=np.float64).astype(np.float32) + 1e-6
    v = test.astype(np.float32) / 255.0
    return np.ascontiguousarray((t - mean) / std), np.ascontiguousarray((v - mean) / std)


def _images_to_uint8(column: Any) -> np.ndarray:
    """A column of PIL images or pixel arrays -> uint8 (N, C, H, W)."""
    arrs = [np.asarray(im, dtype=np.uint8) for im in column]
    x = np.stack(arrs)
    if x.ndim == 2:  # flat pixels, assume square single-channel
        side = int(round(x.shape[1] ** 0.5))
        x = x.reshape(-1, side, side)
    if x.ndim == 3:
        x = x[:, None]
    else:  # (N, H, W, C) -> (N, C, H, W)
        x = x.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x)


def _hf_split(ds: Any, image_col: str, label_col: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    for col in (image_col, label_col):
        if col not in ds.column_names:
            raise ConfigError(key, col, f"column not in the dataset; columns: {', '.join(ds.column_names)}")
    if ds.features[image_col].__class__.__name__ in ("List", "Sequence", "LargeList"):
        # Pixels stored as lists: read the Arrow buffer in one go instead of row by row.
        col = ds.with_format("arrow")[image_col]
        col = col.combine_chunks() if hasattr(col, "combine_chunks") else col
        x = _images_to_uint8(col.flatten().to_numpy(zero_copy_only=False).astype(np.uint8).reshape(len(ds), -1))
    else:
        x = _images_to_uint8(ds[image_col])
    y = np.asarray(ds.with_format("numpy")[label_col], dtype=np.int64)
    return x, y


def _load_hf(path_or_name: str, data_files: Optional[dict] = None, builder: Optional[str] = None,
             image_col: str = "image", label_col: str = "label") -> tuple[np.ndarray, ...]:
    """Load train and test splits through `datasets.load_dataset`."""
    import datasets

    datasets.disable_progress_bars()
    if builder is not None:
        dd = datasets.load_dataset(builder, data_files=data_files, data_dir=None if data_files else path_or_name)
    else:
        dd = datasets.load_dataset(path_or_name)
    if "train" not in dd:
        raise ConfigError("data.path", path_or_name, f"needs a 'train' split; found {list(dd)}")
    test_key = "test" if "test" in dd else ("validation" if "validation" in dd else None)
    if test_key is None:
        raise ConfigError("data.path", path_or_name, f"needs a 'test' or 'validation' split; found {list(dd)}")
    tx, ty = _hf_split(dd["train"], image_col, label_col, "data.image_column")
    vx, vy = _hf_split(dd[test_key], image_col, label_col, "data.image_column")
    return tx, ty, vx, vy


def _read_idx(path: Path, offset: int) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        return np.frombuffer(f.read(), np.uint8, offset=offset)


def _load_mnist(path: Optional[str]) -> tuple[np.ndarray, ...]:
    if path is None:  # the built-in subset, still read through `datasets`
        files = {s: str(BUILTIN / f"mnist_small_{s}.parquet") for s in ("train", "test")}
        return _load_hf("parquet", files, "parquet", "pixels", "label")
    p = Path(path)
    idx = {n: next(iter(p.glob(f"{n}*")), None) for n in
           ("train-images", "train-labels", "t10k-images", "t10k-labels")} if p.is_dir() else {}
    if idx and all(idx.values()):
        tx = _read_idx(idx["train-images"], 16).reshape(-1, 1, 28, 28)
        vx = _read_idx(idx["t10k-images"], 16).reshape(-1, 1, 28, 28)
        ty = _read_idx(idx["train-labels"], 8).astype(np.int64)
        vy = _read_idx(idx["t10k-labels"], 8).astype(np.int64)
        return tx, ty, vx, vy
    if p.is_dir() and list(p.glob("*train*.parquet")):
        files = {"train": str(next(p.glob("*train*.parquet"))), "test": str(next(p.glob("*test*.parquet")))}
        return _load_hf("parquet", files, "parquet", "pixels", "label")
    if p.exists():
        raise ConfigError("data.path", path, "expected a folder of MNIST idx files or *train*/*test* parquet files")
    return _load_hf(path, image_col="image", label_col="label")  # a hub name, e.g. ylecun/mnist


def _untar_once(tarball: Path) -> Path:
    """Unpack an image-folder tarball into a cache folder keyed by its content hash."""
    digest = hashlib.sha256(tarball.read_bytes()).hexdigest()[:16]
    dest = Path.home() / ".cache" / "sfl_ray" / f"{tarball.stem}-{digest}"
    if not (dest / ".done").exists():
        dest.mkdir(parents=True, exist_ok=True)
        with tarfile.open(tarball) as tf:
            tf.extractall(dest, filter="data")
        (dest / ".done").write_text("ok")
    roots = [d for d in dest.rglob("train") if d.is_dir()]
    return roots[0].parent if roots else dest


def _load_imagefolder(path: str, image_col: str, label_col: str) -> tuple[np.ndarray, ...]:
    p = Path(path)
    if p.is_file() and p.name.endswith((".tar.gz", ".tgz", ".tar")):
        p = _untar_once(p)
    if p.is_dir():
        return _load_hf(str(p), builder="imagefolder", image_col="image", label_col="label")
    return _load_hf(path, image_col=image_col, label_col=label_col)


def load_source(cfg: Any) -> ArrayDataset:
    """Load the data set named by a `DataConfig` (raw arrays are cached per process)."""
    if cfg.name == "e2e":
        from sfl_ray.data.text import load_e2e
        return load_e2e(cfg)
    tx, ty, vx, vy = _raw(cfg.name, cfg.path, cfg.image_column, cfg.label_column)
    if cfg.max_train_samples:
        tx, ty = tx[: cfg.max_train_samples], ty[: cfg.max_train_samples]
    if cfg.max_test_samples:
        vx, vy = vx[: cfg.max_test_samples], vy[: cfg.max_test_samples]
    train_x, test_x = _normalise(tx, vx)
    num_classes = int(max(ty.max(), vy.max())) + 1
    return ArrayDataset(cfg.name, train_x, np.ascontiguousarray(ty), test_x, np.ascontiguousarray(vy), num_classes)


@functools.lru_cache(maxsize=4)
def _raw(name: str, path: Optional[str], image_column: str, label_column: str) -> tuple[np.ndarray, ...]:
    if name == "mnist":
        return _load_mnist(path)
    if name == "cifar10":
        if path is None:
            raise ConfigError("data.path", None, "cifar10 needs a tarball, an image folder, or a hub name (uoft-cs/cifar10)")
        return _load_imagefolder(path, "img", "label")
    if path is None:
        raise ConfigError("data.path", None, "the hf source needs a hub name or a local folder")
    if Path(path).exists():
        return _load_imagefolder(path, image_column, label_column)
    return _load_hf(path, image_col=image_column, label_col=label_column)
