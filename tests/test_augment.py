"""data.augment=crop_flip: correct, per-sample, reproducible from (seed, round, client, epoch,
batch), on client training batches only; refused on non-image data. Local backend, no Ray."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sfl_ray.config import load_config
from sfl_ray.config_base import ConfigError
from sfl_ray.data import batches as batches_mod
from sfl_ray.data.augment import augment_batch
from sfl_ray.data.batches import batch_indices, client_batches
from sfl_ray.run import prepare
from sfl_ray.seeding import torch_gen
from tests.helpers import local_coordinator, without_timing


def known_images(b: int = 64, c: int = 3, h: int = 8, w: int = 8) -> torch.Tensor:
    """Every pixel unique and nonzero, so a crop window is identifiable and padding shows as 0."""
    return torch.arange(1, b * c * h * w + 1, dtype=torch.float32).reshape(b, c, h, w)


def test_crop_flip_crops_within_the_padding_and_mirrors_columns():
    x = known_images()
    out = augment_batch(x, "crop_flip", torch_gen(0, "augment", 1, 0, 0, 0))
    assert out.shape == x.shape and out.dtype == x.dtype
    padded = F.pad(x, (4, 4, 4, 4))

    def window(i: int, top: int, left: int, flip: bool) -> torch.Tensor:
        win = padded[i, :, top: top + 8, left: left + 8]
        return win.flip(-1) if flip else win

    found = []
    for i in range(len(x)):
        matches = [(top, left, flip) for top in range(9) for left in range(9) for flip in (False, True)
                   if torch.equal(out[i], window(i, top, left, flip))]
        assert len(matches) == 1, i   # exactly one crop offset in [0, 8]^2 and flip explains the sample
        found.append(matches[0])
    tops, lefts, flips = zip(*found)
    assert 0 < sum(flips) < len(x)                       # some flipped, some not
    assert len(set(tops)) > 3 and len(set(lefts)) > 3    # offsets differ per sample
    assert min(tops) >= 0 and max(tops) <= 8 and min(lefts) >= 0 and max(lefts) <= 8
    assert (out == 0).any()                              # zero padding shows at shifted crops


def test_flip_alone_mirrors_columns():
    """An offset of 4 is the uncropped image: the sample is then x or x mirrored left to right."""
    x = known_images(b=256)
    out = augment_batch(x, "crop_flip", torch_gen(0, "augment", 0, 0, 0, 0))
    same = [i for i in range(len(x)) if torch.equal(out[i], x[i])]
    mirrored = [i for i in range(len(x)) if torch.equal(out[i], x[i].flip(-1))]
    assert same and mirrored and not set(same) & set(mirrored)
    assert torch.equal(out[mirrored[0], :, :, 0], x[mirrored[0], :, :, -1])


def test_same_stream_same_batch_and_a_different_batch_index_differs():
    x = torch.randn(16, 3, 32, 32)
    a = augment_batch(x, "crop_flip", torch_gen(7, "augment", 2, 3, 0, 5))
    b = augment_batch(x, "crop_flip", torch_gen(7, "augment", 2, 3, 0, 5))
    c = augment_batch(x, "crop_flip", torch_gen(7, "augment", 2, 3, 0, 6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert augment_batch(x, "none", torch_gen(0, "x")) is x
    with pytest.raises(ValueError):
        augment_batch(torch.randn(4, 10), "crop_flip", torch_gen(0, "x"))


def test_client_batches_augment_reproducibly_and_none_is_the_raw_data():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 3, 32, 32)).astype(np.float32)
    y = rng.integers(0, 10, 40)
    idx = np.arange(40)
    args = (x, y, idx, 16, 0, 3, 1, 0)
    one = list(client_batches(*args, augment="crop_flip"))
    two = list(client_batches(*args, augment="crop_flip"))
    raw = list(client_batches(*args))
    order = batch_indices(idx, 16, 0, 3, 1, 0)
    for (xa, ya), (xb, yb), (xr, yr), b in zip(one, two, raw, order):
        assert torch.equal(xa, xb) and torch.equal(ya, yr)
        assert torch.equal(xr, torch.from_numpy(x[b])) and not torch.equal(xa, xr)
    # batch k of the epoch uses the generator of (seed, round, client, epoch, k)
    expected = augment_batch(torch.from_numpy(x[order[1]]), "crop_flip", torch_gen(0, "augment", 3, 1, 0, 1))
    assert torch.equal(one[1][0], expected)


def write_tiny_cifar(root, n_train: int = 24, n_test: int = 12, classes: int = 4) -> str:
    """32x32 RGB pngs as root/{train,test}/class<k>/<i>.png, the CIFAR-10 image-folder layout;
    each class has its own mean colour so a model can learn something."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            k = i % classes
            img = rng.integers(0, 120, (32, 32, 3)) + np.array([40 * k, 120 - 40 * k, 60])
            d = root / split / f"class{k}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(d / f"{i}.png")
    return str(root)


def tiny_cifar_config(run_dir: str, data_path: str, *overrides: str):
    base = ["data.name=cifar10", f"data.path={data_path}", "train.num_clients=3", "train.batch_size=5",
            "stop.rounds=2", "cluster.backend=local", f"output.dir={run_dir}", "output.progress=false"]
    return load_config(None, base + list(overrides))


def test_two_round_local_run_with_crop_flip_is_deterministic_and_eval_is_not_augmented(tmp_path, monkeypatch):
    path = write_tiny_cifar(tmp_path / "cifar")
    calls = []
    original = batches_mod.augment_batch

    def counting(x, kind, gen):
        calls.append(len(x))
        return original(x, kind, gen)

    monkeypatch.setattr(batches_mod, "augment_batch", counting)
    rows = []
    for i, aug in enumerate(["crop_flip", "crop_flip", "none"]):
        cfg = tiny_cifar_config(str(tmp_path / f"runs{i}"), path, f"data.augment={aug}")
        coord, _ = local_coordinator(cfg)
        coord.run()
        rows.append(without_timing(coord.writer.read_rows()))
    assert len(rows[0]) == 2 and rows[0] == rows[1]
    assert rows[0] != rows[2]                          # the augmentation did change training
    # Only training batches went through it: 24 samples x 2 rounds x 2 runs, nothing from the
    # evaluation of the 12 test images (evaluated every round).
    assert sum(calls) == 24 * 2 * 2


def test_crop_flip_is_refused_on_text(tmp_path):
    cfg = load_config(None, ["data.name=e2e", "model.name=gpt2", "data.augment=crop_flip", "data.max_train_samples=40",
                             "data.max_test_samples=10", f"output.dir={tmp_path}"])
    with pytest.raises(ConfigError) as err:
        prepare(cfg)
    assert err.value.key == "data.augment"
