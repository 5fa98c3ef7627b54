"""E2E text pipeline: GPT-2 tokenizer, prompt-masked LM labels, sources, MR groups. No network, no Ray."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import numpy as np
import pytest

from sfl_ray.config import DataConfig
from sfl_ray.data import text
from sfl_ray.data.sources import load_source

EOS = 50256
GROUP_FIELDS = ("eatType", "food", "area", "priceRange", "familyFriendly", "customer rating")


def read_csv(path: Path) -> list[tuple[str, str]]:
    """The (mr, ref) records of an E2E csv file, read without `datasets` (an independent reference)."""
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["mr", "ref"]
    return [(r[0], r[1]) for r in rows[1:]]


def decode(tok, ids) -> str:
    return tok.decode([int(i) for i in ids], skip_special_tokens=False, clean_up_tokenization_spaces=False)


@pytest.fixture(scope="module")
def tok():
    return text.load_tokenizer()


@pytest.fixture(scope="module")
def builtin():
    return load_source(DataConfig(name="e2e"))


@pytest.fixture(scope="module")
def builtin_rows():
    return read_csv(text.BUILTIN_E2E / "trainset.csv"), read_csv(text.BUILTIN_E2E / "devset.csv")


# ---------------------------------------------------------------------------------- tokenizer

def test_builtin_tokenizer_is_full_gpt2(tok):
    assert len(tok) == 50257
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == EOS
    ids = tok("The Vaults pub", add_special_tokens=False)["input_ids"]
    assert ids == [464, 21314, 2240]  # GPT-2's ids: "The", " Vault", "s pub" pieces
    assert decode(tok, ids) == "The Vaults pub"
    s = "Café Adriatic: 5 out of 5,  £20-25 <|endoftext|>"
    assert decode(tok, tok(s)["input_ids"]) == s


def test_tokenizer_from_vocab_and_merges_folder(tmp_path, tok):
    # The vocab.json + merges.txt route (the one transformers 5.x breaks when given file keywords),
    # with the two files written from the built-in tokenizer.json.
    model = json.loads((text.BUILTIN_TOKENIZER / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    (tmp_path / "vocab.json").write_text(json.dumps(model["vocab"]), encoding="utf-8")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    t2 = text.load_tokenizer(str(tmp_path))
    assert len(t2) == 50257 and t2.eos_token_id == EOS
    s = "name[The Vaults], eatType[pub] || The Vaults pub near Café Adriatic."
    assert t2(s)["input_ids"] == tok(s)["input_ids"]


def test_tokenizer_folder_without_files_is_a_config_error(tmp_path):
    from sfl_ray.config_base import ConfigError

    with pytest.raises(ConfigError):
        text.load_tokenizer(str(tmp_path))


# ------------------------------------------------------------------------------------ labels

def test_shapes_dtypes_and_task(builtin):
    assert builtin.name == "e2e" and builtin.task == "lm" and builtin.num_classes == 50257
    assert builtin.train_x.shape == builtin.train_y.shape == (3000, 128)
    assert builtin.test_x.shape == builtin.test_y.shape == (404, 128)
    for a in (builtin.train_x, builtin.train_y, builtin.test_x, builtin.test_y):
        assert a.dtype == np.int64 and a.flags.c_contiguous
    assert builtin.train_x.min() >= 0 and builtin.train_x.max() < 50257


@pytest.mark.parametrize("split", ["train", "test"])
def test_labels_are_the_reference_and_eos_only(builtin, builtin_rows, tok, split):
    x, y = (builtin.train_x, builtin.train_y) if split == "train" else (builtin.test_x, builtin.test_y)
    rows = builtin_rows[0] if split == "train" else builtin_rows[1]
    assert len(rows) == len(x)
    for i in list(range(25)) + [len(x) - 1]:
        mr, ref = rows[i]
        loss = y[i] != -100
        pos = np.flatnonzero(loss)
        # One contiguous block of loss positions, labels equal to the inputs there.
        assert pos.size > 0 and np.all(np.diff(pos) == 1)
        assert np.array_equal(y[i][loss], x[i][loss])
        assert decode(tok, x[i][loss]) == ref + "<|endoftext|>"
        assert x[i][pos[-1]] == EOS  # the EOS that ends the reference is a label
        # Every -100 position: the prompt before the block, EOS padding after it.
        assert decode(tok, x[i][: pos[0]]) == f"{mr} || "
        assert np.all(x[i][pos[-1] + 1:] == EOS) and np.all(y[i][pos[-1] + 1:] == -100)
        assert decode(tok, x[i][~loss]) == f"{mr} || " + "<|endoftext|>" * (len(x[i]) - pos[-1] - 1)


def test_truncation_respects_max_length(builtin):
    n, t = 60, 64  # every prompt fits in 64 tokens (the longest has 52), some references do not
    short = load_source(DataConfig(name="e2e", max_length=t, max_train_samples=n, max_test_samples=10))
    assert short.train_x.shape == short.train_y.shape == (n, t)
    assert short.test_x.shape == (10, t)
    # Truncation cuts the same encoding: its first t tokens.
    assert np.array_equal(short.train_x, builtin.train_x[:n, :t])
    assert np.array_equal(short.train_y, builtin.train_y[:n, :t])
    cut = (builtin.train_y[:n, t:] != -100).any(1)
    assert cut.any(), f"some references should be cut at {t} tokens"
    # A cut reference keeps its loss up to the last position and loses its EOS.
    assert np.all(short.train_y[cut, -1] != -100) and np.all(short.train_y[cut, -1] != EOS)
    assert np.all((short.train_y != -100).sum(1) > 0)
    assert len(short.groups["eatType"]) == n


def test_prompt_longer_than_max_length_warns():
    # The first 5 training prompts are 30, 30, 37, 39 and 49 tokens long: 3 lose their reference.
    with pytest.warns(UserWarning, match="3 of 5 training examples have no target token"):
        ds = load_source(DataConfig(name="e2e", max_length=35, max_train_samples=5, max_test_samples=5))
    assert ds.train_x.shape == (5, 35) and (np.all(ds.train_y == -100, axis=1)).sum() == 3


def test_max_length_too_short_for_every_prompt_is_a_config_error():
    from sfl_ray.config_base import ConfigError

    with pytest.raises(ConfigError, match="data.max_length=12: too short"):
        load_source(DataConfig(name="e2e", max_length=12, max_train_samples=5, max_test_samples=5))


def test_max_samples_take_the_first_rows(builtin):
    ds = load_source(DataConfig(name="e2e", max_train_samples=7, max_test_samples=3))
    assert np.array_equal(ds.train_x, builtin.train_x[:7]) and np.array_equal(ds.test_y, builtin.test_y[:3])


# ----------------------------------------------------------------------------------- sources

def test_builtin_slice_is_cached_and_read_only(builtin):
    t = time.perf_counter()
    again = load_source(DataConfig(name="e2e"))
    assert time.perf_counter() - t < 0.5
    assert again.train_x is builtin.train_x
    assert again.groups is not builtin.groups  # the caller's own dict
    with pytest.raises(ValueError):
        again.train_x[0, 0] = 1


def test_local_folder_through_load_source(tmp_path, tok):
    """A folder of the official csv files (written here from the shipped slice, rows reordered so
    that it is not the built-in data) is read row for row through `data.path`."""
    train, dev = read_csv(text.BUILTIN_E2E / "trainset.csv")[::-1], read_csv(text.BUILTIN_E2E / "devset.csv")[100:]
    for name, rows in (("trainset.csv", train), ("devset.csv", dev)):
        with open(tmp_path / name, "w", encoding="utf-8", newline="") as f:
            csv.writer(f).writerows([("mr", "ref"), *rows])
    ds = load_source(DataConfig(name="e2e", path=str(tmp_path), max_train_samples=300, max_test_samples=50))
    assert ds.train_x.shape == (300, 128) and ds.test_x.shape == (50, 128) and ds.num_classes == 50257
    for i in (0, 1, 150, 299):
        loss = ds.train_y[i] != -100
        assert decode(tok, ds.train_x[i][loss]) == train[i][1] + "<|endoftext|>"
    loss = ds.test_y[49] != -100
    assert decode(tok, ds.test_x[49][loss]) == dev[49][1] + "<|endoftext|>"


def test_hub_column_names_are_standardised():
    import datasets

    hub = datasets.Dataset.from_dict({"meaning_representation": ["name[A], area[riverside]"],
                                      "human_reference": ["A is by the river."], "extra": [1]})
    ds = text._standard_columns(hub, "tuetschek/e2e_nlg")
    assert ds.column_names == ["mr", "ref"] and ds[0] == {"mr": "name[A], area[riverside]", "ref": "A is by the river."}


def test_hub_name_through_load_dataset(monkeypatch):
    # No network here: stand in for the hub. The first call fails as datasets >= 4 does on a
    # script-based repository (tuetschek/e2e_nlg ships e2e_nlg.py); the parquet export is then used.
    import datasets

    def split(n):
        return datasets.Dataset.from_dict({"meaning_representation": [f"name[R{i}], eatType[pub]" for i in range(n)],
                                           "human_reference": [f"R{i} is a pub." for i in range(n)]})
    calls = []

    def fake_load_dataset(name, revision=None, **kw):
        calls.append((name, revision))
        if revision is None:
            raise RuntimeError("Dataset scripts are no longer supported, but found e2e_nlg.py")
        return datasets.DatasetDict({"train": split(6), "validation": split(3), "test": split(2)})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    dd = text.e2e_splits("tuetschek/e2e_nlg")
    assert calls == [("tuetschek/e2e_nlg", None), ("tuetschek/e2e_nlg", "refs/convert/parquet")]
    assert dd["train"].column_names == ["mr", "ref"] and len(dd["validation"]) == 3
    assert dd["train"][5] == {"mr": "name[R5], eatType[pub]", "ref": "R5 is a pub."}


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "csv"])
def test_folder_of_split_files_in_any_format_reads_like_the_csv_release(tmp_path, fmt):
    """train.* / dev.* files (csv, json lines or parquet, hub column names) give the same
    token arrays as the official csv files they were written from."""
    dd = text.e2e_splits(None)
    for split, stem in (("train", "train"), ("validation", "dev")):
        ds = dd[split].select(range(40)).rename_columns({"mr": "meaning_representation", "ref": "human_reference"})
        getattr(ds, "to_json" if fmt == "jsonl" else f"to_{fmt}")(str(tmp_path / f"{stem}.{fmt}"))
    cfg = dict(name="e2e", max_train_samples=40, max_test_samples=40, max_length=64)
    ours = load_source(DataConfig(path=str(tmp_path), **cfg))
    ref = load_source(DataConfig(path=None, **cfg))
    np.testing.assert_array_equal(ours.train_x, ref.train_x)
    np.testing.assert_array_equal(ours.test_y, ref.test_y)


def test_not_an_e2e_folder_is_a_config_error(tmp_path):
    from sfl_ray.config_base import ConfigError

    with pytest.raises(ConfigError):
        load_source(DataConfig(name="e2e", path=str(tmp_path)))


# ------------------------------------------------------------------------------------ groups

def test_parse_mr():
    assert text.parse_mr("name[The Vaults], eatType[pub], customer rating[5 out of 5], near[Café Adriatic]") == {
        "name": "The Vaults", "eatType": "pub", "customer rating": "5 out of 5", "near": "Café Adriatic"}


def test_groups_codes_match_the_mr_text(builtin, builtin_rows):
    rows = builtin_rows[0]
    g = builtin.groups
    for f in GROUP_FIELDS:
        codes, names = g[f], g[f + "_names"]
        assert codes.shape == (len(builtin.train_x),) and codes.dtype == np.int64
        assert names[0] == "none" and names[1:] == sorted(names[1:])
        assert codes.min() >= 0 and codes.max() == len(names) - 1
    # Parsed here with a different method than the library's regex.
    for i in list(range(30)) + [2999]:
        fields = dict(item.split("[", 1) for item in rows[i][0].rstrip("]").split("], "))
        for f in GROUP_FIELDS:
            expected = fields.get(f, "none")
            assert g[f + "_names"][g[f][i]] == expected, (i, f)
            assert (g[f][i] == 0) == (f not in fields)
    assert (g["food"] == 0).any() and (g["familyFriendly"] == 0).any()  # the slice has missing fields
    assert g["eatType_names"] == ["none", "coffee shop", "pub", "restaurant"]


# ------------------------------------------------------------------------------- shipped files

def test_shipped_slice_is_small_and_licensed():
    slice_bytes = sum(p.stat().st_size for p in text.BUILTIN_E2E.iterdir() if p.is_file())
    assert slice_bytes <= 1_000_000
    readme = (text.BUILTIN_E2E / "README.md").read_text(encoding="utf-8")
    assert "CC BY-SA 4.0" in readme and "creativecommons.org/licenses/by-sa/4.0" in readme
    assert "Novikova" in readme and "v1.0.0" in readme
    tok_readme = (text.BUILTIN_TOKENIZER / "README.md").read_text(encoding="utf-8")
    assert "MIT" in tok_readme
    assert sorted(p.name for p in text.BUILTIN_TOKENIZER.iterdir()) == ["README.md", "tokenizer.json"]
