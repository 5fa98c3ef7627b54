"""Data sources: HF `datasets` (hub name or local files) and a small built-in MNIST subset.

Everything becomes one `ArrayDataset` of contiguous numpy arrays: that is what the driver
puts into the Ray object store once, and what every pool reads zero-copy.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import shutil
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from sfl_ray.config_base import ConfigError
from sfl_ray.local_paths import hub_access, not_on_hub, reason, require_local

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


def _hf_split(ds: Any, image_col: str, label_col: str) -> tuple[np.ndarray, np.ndarray]:
    for key, col in (("data.image_column", image_col), ("data.label_column", label_col)):
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
             image_col: str = "image", label_col: str = "label", limits: tuple = (None, None)) -> tuple[np.ndarray, ...]:
    """Load train and test splits through `datasets.load_dataset`."""
    import datasets

    datasets.disable_progress_bars()
    if builder is not None:
        where = path_or_name
        if builder == "parquet" and data_files:  # a footer read per file names the corrupt one
            import pyarrow.parquet as pq
            for f in sorted(data_files.values()):
                try:
                    pq.read_metadata(f)
                except Exception as e:  # noqa: BLE001 - ArrowInvalid, OSError: not parquet, or truncated
                    raise ConfigError("data.path", f, f"not a readable parquet file: {reason(e)}") from None
            where = ", ".join(sorted(data_files.values()))
        try:
            dd = datasets.load_dataset(builder, data_files=data_files, data_dir=None if data_files else path_or_name)
        except Exception as e:  # a corrupt or foreign file: name it, in one line
            raise ConfigError("data.path", where, f"cannot read it as {builder}: {reason(e)}") from None
    else:
        try:
            with hub_access():
                dd = datasets.load_dataset(path_or_name)
        except Exception as e:
            raise not_on_hub("data.path", path_or_name, e) from None
    if "train" not in dd:
        raise ConfigError("data.path", path_or_name, f"needs a 'train' split; found {list(dd)}")
    test_key = "test" if "test" in dd else ("validation" if "validation" in dd else None)
    if test_key is None:
        raise ConfigError("data.path", path_or_name, f"needs a 'test' or 'validation' split; found {list(dd)}")
    # Select before decoding: decoding all 60k CIFAR jpgs to keep 2k would take a minute.
    train, test = dd["train"], dd[test_key]
    if (keep := _keep(len(train), limits[0])) is not None:
        train = train.select(keep)
    if (keep := _keep(len(test), limits[1])) is not None:
        test = test.select(keep)
    tx, ty = _hf_split(train, image_col, label_col)
    vx, vy = _hf_split(test, image_col, label_col)
    return tx, ty, vx, vy


def _keep(total: int, n: Optional[int]) -> Optional[np.ndarray]:
    """Indices of a fixed random subset of n of total samples, in their original order (None =
    all). Not the first n: image folders list their files class by class."""
    if not n or n >= total:
        return None
    return np.sort(np.random.default_rng(0).permutation(total)[:n])


def _read_idx(path: Path, offset: int, shape: tuple[int, ...]) -> np.ndarray:
    """An MNIST idx file (optionally gzipped) as uint8 of `shape` (-1 first); ConfigError if it is not one."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            return np.frombuffer(f.read(), np.uint8, offset=offset).reshape(shape)
    except (OSError, EOFError, ValueError, zlib.error) as e:  # truncated, not gzip, wrong size
        raise ConfigError("data.path", str(path), f"not a readable MNIST idx file: {reason(e)}") from None


def _load_mnist(path: Optional[str], limits: tuple) -> tuple[np.ndarray, ...]:
    if path is None:  # the built-in subset, still read through `datasets`
        files = {s: str(BUILTIN / f"mnist_small_{s}.parquet") for s in ("train", "test")}
        return _load_hf("parquet", files, "parquet", "pixels", "label", limits)
    p = Path(path)
    idx = {n: next(iter(p.glob(f"{n}*")), None) for n in
           ("train-images", "train-labels", "t10k-images", "t10k-labels")} if p.is_dir() else {}
    if idx and all(idx.values()):
        tx = _read_idx(idx["train-images"], 16, (-1, 1, 28, 28))
        vx = _read_idx(idx["t10k-images"], 16, (-1, 1, 28, 28))
        ty = _read_idx(idx["train-labels"], 8, (-1,)).astype(np.int64)
        vy = _read_idx(idx["t10k-labels"], 8, (-1,)).astype(np.int64)
        for images, labels, name in ((tx, ty, "train"), (vx, vy, "t10k")):
            if len(images) != len(labels):
                raise ConfigError("data.path", path, f"{name}: {len(images)} images but {len(labels)} labels "
                                  "(a truncated file?)")
        tk, vk = _keep(len(ty), limits[0]), _keep(len(vy), limits[1])
        if tk is not None:
            tx, ty = tx[tk], ty[tk]
        if vk is not None:
            vx, vy = vx[vk], vy[vk]
        return tx, ty, vx, vy
    if p.is_dir() and list(p.glob("*train*.parquet")):
        files = {"train": str(next(p.glob("*train*.parquet"))), "test": str(next(p.glob("*test*.parquet")))}
        return _load_hf("parquet", files, "parquet", "pixels", "label", limits)
    if p.exists():
        raise ConfigError("data.path", path, "expected a folder of MNIST idx files or *train*/*test* parquet files")
    return _load_hf(path, image_col="image", label_col="label", limits=limits)  # a hub name, e.g. ylecun/mnist


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def _cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sfl_ray"


def _pack_tarball(tarball: Path) -> dict[str, str]:
    """Pack an image-folder tarball (`split/class/image`) into one parquet file per split, once,
    in a cache folder keyed by its content hash; returns {split: parquet path}. Reading 60k
    small files through `imagefolder` takes about a minute; the parquet files take seconds."""
    import datasets

    datasets.disable_progress_bars()
    digest = hashlib.sha256(tarball.read_bytes()).hexdigest()[:16]
    dest = _cache_root() / f"{tarball.name.split('.')[0]}-{digest}"
    if not (dest / ".done").exists():
        rows: dict[str, list[tuple[str, str, bytes]]] = {}
        try:
            with tarfile.open(tarball) as tf:
                for m in tf:
                    parts = [q for q in Path(m.name).parts if q != "."]
                    if m.isfile() and len(parts) >= 3 and Path(m.name).suffix.lower() in IMAGE_SUFFIXES:
                        rows.setdefault(parts[-3], []).append((parts[-2], m.name, tf.extractfile(m).read()))
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:  # truncated or not a tarball
            raise ConfigError("data.path", str(tarball), f"not a readable tarball: {reason(e)}") from None
        if "train" not in rows:
            raise ConfigError("data.path", str(tarball), "expected images as train/<class>/<file> (and test/...)")
        classes = sorted({label for split in rows.values() for label, _, _ in split})
        features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=classes)})
        tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        for split, items in rows.items():
            items.sort(key=lambda r: r[1])
            ds = datasets.Dataset.from_dict({"image": [{"bytes": b, "path": n} for _, n, b in items],
                                             "label": [classes.index(lab) for lab, _, _ in items]}, features=features)
            ds.to_parquet(str(tmp / f"{split}.parquet"))
        (tmp / ".done").write_text("ok")
        try:
            tmp.rename(dest)  # atomic: a killed run never leaves a half-written cache
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    return {f.stem: str(f) for f in sorted(dest.glob("*.parquet"))}


def _image_folder_files(root: Path) -> dict[str, list[str]]:
    """{split: sorted image paths} of a `split/class/image` folder. Listing the files once here
    spares `imagefolder` from resolving its glob patterns file by file (4x faster on CIFAR)."""
    files: dict[str, list[str]] = {}
    for split in sorted(d for d in root.iterdir() if d.is_dir()):
        found = sorted(str(f) for f in split.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        if found:
            files[split.name] = found
    return files


def _load_imagefolder(path: str, image_col: str, label_col: str, limits: tuple,
                      folder_cols: tuple[str, str] = ("image", "label")) -> tuple[np.ndarray, ...]:
    """A tarball, an image folder (columns `folder_cols`) or a hub name (columns image_col, label_col)."""
    p = Path(path)
    if p.is_file() and p.name.endswith((".tar.gz", ".tgz", ".tar")):
        return _load_hf("parquet", _pack_tarball(p), "parquet", *folder_cols, limits)
    if p.is_dir():
        files = _image_folder_files(p)
        if not files:
            raise ConfigError("data.path", path, f"no images found: expected <split>/<class>/<image> files "
                              f"({', '.join(sorted(IMAGE_SUFFIXES))})")
        return _load_hf(str(p), files, "imagefolder", *folder_cols, limits)
    return _load_hf(path, image_col=image_col, label_col=label_col, limits=limits)


def load_source(cfg: Any) -> ArrayDataset:
    """Load the data set named by a `DataConfig` with the loader registered under its name
    (`sfl_ray.registry`: the built-ins and plug-ins); a plug-in's result is checked."""
    from sfl_ray import registry

    entry = registry.get("data", cfg.name)
    require_local("data.path", cfg.path)  # a mistyped local path is not a hub name
    data = entry.target(cfg)
    if not entry.builtin:
        check_dataset(cfg.name, entry.source, data)
    return data


def check_dataset(name: str, source: str, data: Any) -> None:
    """What the runtime relies on in a loader's result; ConfigError naming the loader if not."""
    def bad(problem: str) -> ConfigError:
        return ConfigError("data.name", name, f"its loader ({source}) returned {problem}")

    if not isinstance(data, ArrayDataset):
        raise bad(f"{type(data).__name__}, not a sfl_ray.data.ArrayDataset")
    for split in ("train", "test"):
        x, y = getattr(data, f"{split}_x"), getattr(data, f"{split}_y")
        if not (isinstance(x, np.ndarray) and isinstance(y, np.ndarray)):
            raise bad(f"{split}_x / {split}_y that are not numpy arrays")
        if len(x) == 0 or len(x) != len(y):
            raise bad(f"{len(x)} {split} inputs and {len(y)} labels (need as many, at least one)")
        if y.dtype != np.int64:
            raise bad(f"{split}_y of dtype {y.dtype} (labels are int64)")
    if data.task not in ("classification", "lm"):
        raise bad(f"task {data.task!r} (classification or lm)")
    if data.train_x.shape[1:] != data.test_x.shape[1:]:
        raise bad(f"train inputs {data.train_x.shape[1:]} and test inputs {data.test_x.shape[1:]} of other shapes")
    if not isinstance(data.num_classes, (int, np.integer)) or data.num_classes < 2:
        raise bad(f"num_classes={data.num_classes!r} (an int, at least 2)")
    if data.task == "classification":
        for split in ("train", "test"):
            y = getattr(data, f"{split}_y")
            if y.min() < 0 or y.max() >= data.num_classes:
                raise bad(f"{split} labels outside [0, num_classes={data.num_classes})")


def load_images(cfg: Any) -> ArrayDataset:
    """The built-in image sources (mnist, cifar10, hf): arrays normalised per channel with
    train statistics (raw arrays are cached per process)."""
    tx, ty, vx, vy = _raw(cfg.name, cfg.path, cfg.image_column, cfg.label_column,
                          (cfg.max_train_samples, cfg.max_test_samples))
    train_x, test_x = _normalise(tx, vx)
    num_classes = int(max(ty.max(), vy.max())) + 1
    return ArrayDataset(cfg.name, train_x, np.ascontiguousarray(ty), test_x, np.ascontiguousarray(vy), num_classes)


@functools.lru_cache(maxsize=4)
def _raw(name: str, path: Optional[str], image_column: str, label_column: str,
         limits: tuple) -> tuple[np.ndarray, ...]:
    """(train x, train y, test x, test y), each split cut to a fixed random subset by `limits`."""
    if name == "mnist":
        return _load_mnist(path, limits)
    if name == "cifar10":
        if path is None:
            raise ConfigError("data.path", None, "cifar10 needs its data: --set data.path=PATH, a CIFAR-10 tarball "
                              "or image folder laid out as train/<class>/<image> and test/<class>/<image>, or "
                              "--set data.path=uoft-cs/cifar10 (the Hub, needs network access the first time)")
        return _load_imagefolder(path, "img", "label", limits)
    if path is None:
        raise ConfigError("data.path", None, "the hf source needs --set data.path=NAME (a Hugging Face Hub "
                          "image-classification dataset) or a local folder of <split>/<class>/<image> files")
    if Path(path).exists():  # an image folder's columns are image and label unless the user says otherwise
        return _load_imagefolder(path, image_column, label_column, limits, (image_column, label_column))
    return _load_hf(path, image_col=image_column, label_col=label_column, limits=limits)
