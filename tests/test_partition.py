import numpy as np
import pytest

from sfl_ray.config import PartitionConfig
from sfl_ray.data.partition import dirichlet, iid, label_histograms, partition, shards

LABELS = np.repeat(np.arange(10), 200)  # 2000 samples, 10 balanced classes
np.random.default_rng(0).shuffle(LABELS)


@pytest.mark.parametrize("cfg", [PartitionConfig(name="iid"), PartitionConfig(name="dirichlet", alpha=0.3),
                                 PartitionConfig(name="shards", shards_per_client=2)])
def test_every_sample_lands_in_exactly_one_client(cfg):
    parts = partition(LABELS, cfg, 17, seed=3)
    assert len(parts) == 17
    allidx = np.concatenate(parts)
    assert len(allidx) == len(LABELS)
    assert np.array_equal(np.sort(allidx), np.arange(len(LABELS)))


def _mean_top_class_share(parts):
    hist = np.array(label_histograms(LABELS, parts, 10), dtype=float)
    return float((hist.max(1) / hist.sum(1)).mean())


def test_dirichlet_skew_grows_as_alpha_shrinks():
    shares = [_mean_top_class_share(dirichlet(LABELS, 20, a, seed=1)) for a in (100.0, 1.0, 0.1)]
    assert shares[0] < shares[1] < shares[2]
    assert shares[0] < 0.25 and shares[2] > 0.6


def test_dirichlet_clients_are_equal_size():
    sizes = [len(p) for p in dirichlet(LABELS, 7, 0.5, seed=0)]
    assert max(sizes) - min(sizes) <= 1


def test_shards_give_few_labels_per_client():
    hist = np.array(label_histograms(LABELS, shards(LABELS, 10, 2, seed=0), 10))
    assert ((hist > 0).sum(1) <= 3).all()


@pytest.mark.parametrize("fn", [lambda s: iid(LABELS, 9, s), lambda s: dirichlet(LABELS, 9, 0.5, s),
                                lambda s: shards(LABELS, 9, 2, s)])
def test_same_seed_same_split_other_seed_other_split(fn):
    a, b, c = fn(5), fn(5), fn(6)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
