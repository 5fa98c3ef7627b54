"""E2E NLG as causal language modelling, read and tokenised through Hugging Face `datasets`.

An example is `"{mr} || "` (the prompt) followed by `"{ref}<|endoftext|>"` (the target), in
GPT-2 BPE tokens, truncated to `max_length` and right-padded with the EOS id. The labels are
the input ids where the loss is taken (the reference tokens and the EOS that ends them) and
-100 everywhere else (prompt, padding); the model shifts them (token t predicts t + 1, see
`sfl_ray.models.task`). The prompt length of an example is the index of its first label that
is not -100, which is what generation needs.

Prompt and target are tokenised separately and concatenated, so the token boundary sits
exactly at the end of the prompt: decoding the label tokens gives back the reference text
byte for byte, and a prompt fed to the model at generation time has the same tokens as in
training.

Sources (`data.path`): None = the slice shipped in `builtin/e2e_slice/` (3,000 train + 404
validation rows of E2E v1.0.0); a folder with the official csv files (`trainset.csv`,
`devset.csv`, optionally `testset_w_refs.csv`); or a hub name such as `tuetschek/e2e_nlg`.
The held-out split is the validation (dev) set. Tokenizer (`data.tokenizer`): None = the
GPT-2 `tokenizer.json` shipped in `builtin/gpt2_tokenizer/`; a local folder; or a hub name.

`groups` (training split only): for every MR field in `E2E_FIELDS` an int64 code per sample,
0 = field absent ("none"), the values present sorted and numbered from 1; the value names
are in `groups[field + "_names"]` (a list, index = code, so `names[0] == "none"`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from sfl_ray.config_base import ConfigError
from sfl_ray.data.sources import BUILTIN, ArrayDataset
from sfl_ray.local_paths import hub_access, hub_reachable, not_on_hub, reason, require_local

BUILTIN_E2E = BUILTIN / "e2e_slice"
BUILTIN_TOKENIZER = BUILTIN / "gpt2_tokenizer"
EOS_TEXT = "<|endoftext|>"
SEP = " || "
IGNORE = -100
MISSING = "none"
E2E_FIELDS = ("name", "eatType", "food", "priceRange", "customer rating", "area", "familyFriendly", "near")
# Official csv file per split name; the hub's splits already carry these names.
E2E_CSV = {"train": "trainset.csv", "validation": "devset.csv", "test": "testset_w_refs.csv"}
# Column names of the official csv files first, then of the hub copies (tuetschek/e2e_nlg, GEM/e2e_nlg).
_MR_COLUMNS = ("mr", "meaning_representation")
_REF_COLUMNS = ("ref", "human_reference", "target")
# Bump when the encoding changes, so that `datasets` does not reuse stale cached tokens.
_ENCODING_VERSION = "e2e-lm-1"
_MR_ITEM = re.compile(r"\s*([^\[\],]+?)\s*\[([^\]]*)\]\s*(?:,|$)")


# ---------------------------------------------------------------------------------- tokenizer

def load_tokenizer(name_or_path: Optional[str] = None) -> Any:
    """The GPT-2 tokenizer: the built-in copy (None), a local folder, or a hub name.

    A folder may hold `tokenizer.json`, or `vocab.json` + `merges.txt`. Transformers 5.x takes
    the vocabulary and merges as `vocab=` / `merges=` objects; the old `vocab_file=` /
    `merges_file=` keywords are silently ignored there and leave a one-token vocabulary, which
    is why the result is checked.
    """
    return _tokenizer_and_digest(name_or_path)[0]


@functools.lru_cache(maxsize=4)
def _tokenizer_and_digest(name_or_path: Optional[str]) -> tuple[Any, str]:
    from transformers import GPT2TokenizerFast

    src = BUILTIN_TOKENIZER if name_or_path is None else Path(name_or_path)
    if src.is_dir():
        if (src / "tokenizer.json").is_file():
            tok = GPT2TokenizerFast(tokenizer_file=str(src / "tokenizer.json"))
        elif (src / "vocab.json").is_file() and (src / "merges.txt").is_file():
            tok = _from_vocab_merges(src)
        else:
            raise ConfigError("data.tokenizer", name_or_path, "a folder needs tokenizer.json, or vocab.json + merges.txt")
    elif src.exists():
        raise ConfigError("data.tokenizer", name_or_path, "a tokenizer folder or a hub name, not a file")
    else:
        require_local("data.tokenizer", name_or_path)
        try:
            with hub_access():
                tok = GPT2TokenizerFast.from_pretrained(str(name_or_path))
        except Exception as e:  # offline, or no such repository: say what was asked
            raise not_on_hub("data.tokenizer", str(name_or_path), e, "tokenizer") from None
    if tok.eos_token_id is None:  # a bare tokenizer.json carries no special-token roles
        if EOS_TEXT not in tok.get_vocab():
            raise ConfigError("data.tokenizer", name_or_path, f"has no EOS token and no {EOS_TEXT}")
        tok.eos_token = EOS_TEXT
    if len(tok) < 256 and not src.exists() and not hub_reachable():  # transformers 5.x: an empty tokenizer
        raise not_on_hub("data.tokenizer", str(name_or_path), RuntimeError("empty tokenizer"), "tokenizer")
    if len(tok) < 256:  # e.g. a hub name while offline: transformers 5.x returns an empty tokenizer
        raise ConfigError("data.tokenizer", name_or_path, f"loaded with only {len(tok)} tokens: its vocabulary "
                          "was not found or not read (offline? a folder without tokenizer.json / vocab.json + merges.txt?)")
    # Identifies the vocabulary, merges and special tokens, whatever the source: keys the token cache.
    digest = hashlib.sha256(f"{tok.backend_tokenizer.to_str()}|{tok.eos_token_id}".encode()).hexdigest()[:16]
    return tok, digest


def _from_vocab_merges(folder: Path) -> Any:
    from transformers import GPT2TokenizerFast

    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    merges = [tuple(m.split(" ")) for m in lines if m and not m.startswith("#version")]
    tok = GPT2TokenizerFast(vocab=vocab, merges=merges)
    if len(tok) < len(vocab):  # transformers 4.x ignores vocab=/merges=: use its file keywords
        tok = GPT2TokenizerFast(vocab_file=str(folder / "vocab.json"), merges_file=str(folder / "merges.txt"))
    return tok


# ------------------------------------------------------------------------------------ sources

def e2e_splits(path: Optional[str] = None) -> Any:
    """A `datasets.DatasetDict` with string columns `mr` and `ref`: train, validation (+ test)."""
    import datasets

    datasets.disable_progress_bars()
    folder = BUILTIN_E2E if path is None else Path(path)
    if folder.is_dir():
        files = {s: str(folder / f) for s, f in E2E_CSV.items() if (folder / f).is_file()}
        if "train" in files and "validation" in files:
            features = datasets.Features({"mr": datasets.Value("string"), "ref": datasets.Value("string")})
            # keep_default_na=False: pandas would otherwise turn a text such as "NA" into a missing value.
            return _read_files("csv", files, path, features=features, keep_default_na=False)
        return _split_files(folder, path)
    if folder.exists():
        raise ConfigError("data.path", path, "an E2E folder of csv, json or parquet files or a hub name, not a file")
    try:
        with hub_access():
            dd = _load_hub(path)
    except Exception as e:  # offline, or no such data set: say what was asked
        raise not_on_hub("data.path", path, e) from None
    for split in ("train", "validation"):
        if split not in dd:
            raise ConfigError("data.path", path, f"needs a '{split}' split; found {list(dd)}")
    return datasets.DatasetDict({s: _standard_columns(ds, path) for s, ds in dd.items()})


_SPLIT_NAMES = {"train": ("train",), "validation": ("validation", "valid", "dev"), "test": ("test",)}
_BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def _split_files(folder: Path, path: Optional[str]) -> Any:
    """A folder of `train.*`, `validation.*` (or `dev.*`) and optional `test.*` files, all csv,
    json/jsonl or parquet, with E2E columns (either naming) -> standardised splits."""
    import datasets

    found: dict[str, Path] = {}
    for split, stems in _SPLIT_NAMES.items():
        for f in sorted(folder.iterdir()):
            if f.stem in stems and f.suffix in _BUILDERS and split not in found:
                found[split] = f
    builders = {_BUILDERS[f.suffix] for f in found.values()}
    if "train" not in found or "validation" not in found or len(builders) != 1:
        raise ConfigError("data.path", path, f"an E2E folder needs {E2E_CSV['train']} and {E2E_CSV['validation']}, "
                          "or train.* and validation.* (or dev.*) files of one format: csv, json, jsonl or parquet")
    dd = _read_files(builders.pop(), {s: str(f) for s, f in found.items()}, path)
    return datasets.DatasetDict({s: _standard_columns(ds, path) for s, ds in dd.items()})


def _read_files(builder: str, files: dict[str, str], path: Optional[str], **kw: Any) -> Any:
    """`load_dataset(builder, data_files=files)`; a file it cannot read is a ConfigError naming the files."""
    import datasets

    try:
        return datasets.load_dataset(builder, data_files=files, **kw)
    except Exception as e:  # garbage bytes, wrong columns, not UTF-8: one line naming the file, not a traceback
        bad, err = ", ".join(sorted(files.values())), e
        for f in sorted(files.values()):  # which one? (only on this error path)
            try:
                datasets.load_dataset(builder, data_files={"train": f}, **kw)
            except Exception as e_one:  # noqa: BLE001
                bad, err = f, e_one
                break
        raise ConfigError("data.path", bad, f"cannot read it as {builder} with E2E columns: {reason(err)}") from None


def _load_hub(name: str) -> Any:
    """`load_dataset(name)`, falling back to the hub's parquet export for script-based repositories.

    `tuetschek/e2e_nlg` still ships a loading script, which `datasets` >= 4 refuses to run; the
    hub keeps an automatic parquet conversion of it on the `refs/convert/parquet` branch.
    """
    import datasets

    try:
        return datasets.load_dataset(name)
    except RuntimeError as e:
        if "scripts are no longer supported" not in str(e):
            raise
        return datasets.load_dataset(name, revision="refs/convert/parquet")


def _standard_columns(ds: Any, path: Optional[str]) -> Any:
    """Rename the hub's columns to the csv names `mr`, `ref` and drop the rest."""
    mr = next((c for c in _MR_COLUMNS if c in ds.column_names), None)
    ref = next((c for c in _REF_COLUMNS if c in ds.column_names), None)
    if mr is None or ref is None:
        raise ConfigError("data.path", path, f"needs an MR column {_MR_COLUMNS} and a reference column "
                          f"{_REF_COLUMNS}; found {ds.column_names}")
    ds = ds.select_columns([mr, ref])
    return ds.rename_columns({mr: "mr", ref: "ref"}) if (mr, ref) != ("mr", "ref") else ds


# ----------------------------------------------------------------------------------- encoding

def encode_pairs(tok: Any, mrs: Sequence[str], refs: Sequence[str], max_length: int) -> dict[str, list[list[int]]]:
    """MR/reference pairs -> fixed-length `input_ids` and `labels` (lists of lists)."""
    eos = tok.eos_token_id
    # Build plain lists of str: the tokenizer refuses other sequences, e.g. a `datasets` 5.x Column (ds["ref"]).
    prompts = tok([f"{m}{SEP}" for m in mrs], add_special_tokens=False)["input_ids"]
    targets = tok([f"{r}" for r in refs], add_special_tokens=False)["input_ids"]
    ids_out, labels_out = [], []
    for p, t in zip(prompts, targets):
        t = t + [eos]
        ids = (p + t)[:max_length]
        labels = ([IGNORE] * len(p) + t)[:max_length]
        pad = max_length - len(ids)
        ids_out.append(ids + [eos] * pad)  # pad with EOS: GPT-2 has no pad token; labels hide it
        labels_out.append(labels + [IGNORE] * pad)
    return {"input_ids": ids_out, "labels": labels_out}


def _tokenise(ds: Any, tok: Any, tok_digest: str, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokenise one split with `Dataset.map` (cached on disk by `datasets`) -> two int64 (N, T)."""
    # An explicit fingerprint: hashing the closure would pickle the tokenizer, which is slow and
    # not stable across processes, so the cache would never be reused.
    fp = hashlib.sha256(f"{ds._fingerprint}|{tok_digest}|{max_length}|{SEP}|{_ENCODING_VERSION}".encode()).hexdigest()[:16]
    out = ds.map(lambda b: encode_pairs(tok, b["mr"], b["ref"], max_length), batched=True, batch_size=1000,
                 remove_columns=ds.column_names, new_fingerprint=fp, desc="tokenising E2E")
    return _int_matrix(out, "input_ids", max_length), _int_matrix(out, "labels", max_length)


def _int_matrix(ds: Any, col: str, width: int) -> np.ndarray:
    """A column of equal-length int lists -> contiguous int64 (N, width), straight from Arrow."""
    arr = ds.with_format("arrow")[col]
    arr = arr.combine_chunks() if hasattr(arr, "combine_chunks") else arr
    values = arr.flatten().to_numpy(zero_copy_only=False)
    return np.ascontiguousarray(values.astype(np.int64, copy=False).reshape(len(ds), width))


# ----------------------------------------------------------------------------------- metadata

def parse_mr(mr: str) -> dict[str, str]:
    """'name[The Vaults], eatType[pub], ...' -> {'name': 'The Vaults', 'eatType': 'pub', ...}."""
    return {k: v.strip() for k, v in _MR_ITEM.findall(mr)}


def mr_groups(mrs: Sequence[str], fields: Sequence[str] = E2E_FIELDS) -> dict[str, Any]:
    """Per-sample int64 codes of every MR field (0 = absent), plus `field + "_names"` lists."""
    parsed = [parse_mr(m) for m in mrs]
    groups: dict[str, Any] = {}
    for f in fields:
        values = [p.get(f, MISSING) for p in parsed]
        names = [MISSING] + sorted(set(values) - {MISSING})
        code = {v: i for i, v in enumerate(names)}
        groups[f] = np.fromiter((code[v] for v in values), dtype=np.int64, count=len(values))
        groups[f + "_names"] = names
    return groups


# ------------------------------------------------------------------------------------- loader

def load_e2e(cfg: Any) -> ArrayDataset:
    """E2E train and validation splits as token arrays for causal LM (a `DataConfig` in)."""
    path = cfg.path
    if path is not None and Path(path).exists():
        path = str(Path(path).resolve())  # one cache entry per folder, however it is spelled
    tok_spec = cfg.tokenizer
    if tok_spec is not None and Path(tok_spec).exists():
        tok_spec = str(Path(tok_spec).resolve())
    tx, ty, vx, vy, groups, vocab = _load_e2e_cached(path, tok_spec, cfg.max_length, cfg.max_train_samples,
                                                    cfg.max_test_samples)
    # Fresh dict and name lists per call: the cached arrays are read-only, the containers are the caller's.
    groups = {k: (list(v) if isinstance(v, list) else v) for k, v in groups.items()}
    return ArrayDataset(name="e2e", train_x=tx, train_y=ty, test_x=vx, test_y=vy, num_classes=vocab,
                        task="lm", groups=groups)


@functools.lru_cache(maxsize=4)
def _load_e2e_cached(path: Optional[str], tokenizer: Optional[str], max_length: int, max_train: Optional[int],
                     max_test: Optional[int]) -> tuple:
    tok, digest = _tokenizer_and_digest(tokenizer)
    dd = e2e_splits(path)
    train, valid = dd["train"], dd["validation"]
    if max_train:  # take the first N before tokenising: no work on rows that are dropped
        train = train.select(range(min(max_train, len(train))))
    if max_test:
        valid = valid.select(range(min(max_test, len(valid))))
    tx, ty = _tokenise(train, tok, digest, max_length)
    vx, vy = _tokenise(valid, tok, digest, max_length)
    for labels, split in ((ty, "training"), (vy, "validation")):
        if not len(labels):
            raise ConfigError("data.path", path, f"the {split} split has no rows")
        if not (labels != IGNORE).any():  # nothing to learn, or a 0/0 eval loss
            raise ConfigError("data.max_length", max_length, f"too short: every {split} prompt alone fills it, "
                              "leaving no reference token (the default is 128)")
    empty = int(((ty != IGNORE).sum(1) == 0).sum())
    if empty:  # the prompt alone fills max_length: these examples can teach nothing
        warnings.warn(f"E2E: {empty} of {len(ty)} training examples have no target token within "
                      f"data.max_length={max_length}; raise data.max_length", stacklevel=3)
    groups = mr_groups(train["mr"])
    for a in (tx, ty, vx, vy, *(v for v in groups.values() if isinstance(v, np.ndarray))):
        a.flags.writeable = False  # shared by every caller of the cache
    return tx, ty, vx, vy, groups, len(tok)
