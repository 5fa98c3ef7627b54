import numpy as np
import pytest

from sfl_ray.config import PartitionConfig
from sfl_ray.config_base import ConfigError
from sfl_ray.data.partition import client_sizes, dirichlet, iid, label_histograms, partition, shards

LABELS = np.repeat(np.arange(10), 200)  # 2000 samples, 10 balanced classes
np.random.default_rng(0).shuffle(LABELS)


@pytest.mark.parametrize("cfg", [PartitionConfig(name="iid"), PartitionConfig(name="dirichlet", alpha=0.3),
                                 PartitionConfig(name="shards", shards_per_client=2),
                                 PartitionConfig(name="iid", sizes="lognormal", size_sigma=2.0),
                                 PartitionConfig(name="dirichlet", alpha=0.3, sizes="lognormal")])
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


@pytest.mark.parametrize("name", ["iid", "dirichlet"])
def test_lognormal_sizes_are_unequal_seeded_and_kept_by_the_label_mix(name):
    cfg = PartitionConfig(name=name, alpha=0.3, sizes="lognormal", size_sigma=1.0)
    parts = partition(LABELS, cfg, 40, seed=2)
    sizes = np.array([len(p) for p in parts])
    assert np.array_equal(sizes, client_sizes(len(LABELS), 40, 1.0, 2))  # the drawn sizes, exactly
    assert sizes.min() >= 1 and sizes.sum() == len(LABELS)
    assert sizes.max() > 4 * np.median(sizes)  # quantity skew, not rounding noise
    again, other = partition(LABELS, cfg, 40, seed=2), partition(LABELS, cfg, 40, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(parts, again))
    assert not np.array_equal(sizes, [len(p) for p in other])
    if name == "dirichlet":  # the label mix is still skewed
        assert _mean_top_class_share(parts) > 0.4


def test_equal_sizes_are_the_default_and_unchanged():
    for cfg in (PartitionConfig(name="iid"), PartitionConfig(name="dirichlet", alpha=0.5)):
        sizes = [len(p) for p in partition(LABELS, cfg, 7, seed=0)]
        assert max(sizes) - min(sizes) <= 1
    # equal sizes draw no weights: the label mix takes the same random draws as before sizes existed
    assert all(np.array_equal(a, b) for a, b in zip(partition(LABELS, PartitionConfig(name="dirichlet"), 9, 4),
                                                    dirichlet(LABELS, 9, 0.5, 4)))


def test_more_sigma_more_skew_and_everyone_gets_a_sample():
    ratio = [client_sizes(10_000, 100, s, 0).max() / np.median(client_sizes(10_000, 100, s, 0)) for s in (0.25, 1, 2)]
    assert ratio[0] < ratio[1] < ratio[2]
    tight = client_sizes(100, 100, 3.0, 0)  # as many clients as samples: one each
    assert (tight == 1).all()


def test_shards_refuse_client_sizes():
    with pytest.raises(ConfigError, match="partition.sizes"):
        partition(LABELS, PartitionConfig(name="shards", sizes="lognormal"), 10, 0)
