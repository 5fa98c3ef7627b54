"""The run directory: config.yaml, metrics.jsonl (one row per round), summary.json, partition.json.

The directory may be a local folder or a pyarrow.fs URI (s3://, gs://) so cluster runs can
write to shared storage. metrics.jsonl is rewritten whole after every round (object stores
cannot append), so a crash never leaves a half-written row. Local files are the user's only
(folders 0700, files 0600): runs may hold data statistics and configs with paths.

Non-finite numbers are written as the strings "NaN", "Infinity", "-Infinity" (JSON has no
such numbers); `null` means only "not measured / not evaluated".
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pyarrow.fs as pafs

NONFINITE = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}


def encode(v: Any) -> Any:
    """A row or summary made JSON-safe: non-finite floats become strings, never silently null."""
    if isinstance(v, (float, np.floating)):
        f = float(v)
        return f if math.isfinite(f) else NONFINITE[repr(f)]
    if isinstance(v, dict):
        return {k: encode(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [encode(x) for x in v]
    return v


def dumps(obj: Any, **kw: Any) -> str:
    # allow_nan=False: a bare NaN that slipped past encode() is a bug to hear about, not invalid JSON.
    return json.dumps(encode(obj), allow_nan=False, **kw)


class RunWriter:
    """Writes the files of one run directory; `tracking` (metrics/tracking.py) mirrors the rows
    and the summary to TensorBoard / MLflow."""

    def __init__(self, run_dir: str, tracking: Any = None):
        self.run_dir = run_dir.rstrip("/")
        self.tracking = tracking
        self.local = "://" not in run_dir
        if self.local:
            self.fs, self.root = pafs.LocalFileSystem(), str(Path(run_dir).resolve())
            os.makedirs(self.root, mode=0o700, exist_ok=True)
        else:
            self.fs, self.root = pafs.FileSystem.from_uri(run_dir)
            self.fs.create_dir(self.root, recursive=True)
        self.rows: list[dict] = []

    def write_text(self, name: str, text: str) -> None:
        self.write_bytes(name, text.encode())

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write `name` (a path inside the run directory) atomically: a temporary file, renamed."""
        folder, _, base = f"{self.root}/{name}".rpartition("/")
        tmp = f"{folder}/.{base}.tmp"
        if self.local:  # created 0600 from the start, not chmod'ed after (no window where others can read)
            os.makedirs(folder, mode=0o700, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, f"{folder}/{base}")
            return
        self.fs.create_dir(folder, recursive=True)
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        self.fs.move(tmp, f"{folder}/{base}")

    def write_json(self, name: str, obj: Any, indent: Optional[int] = 2) -> None:
        self.write_text(name, dumps(obj, indent=indent) + "\n")

    def append_row(self, row: dict) -> None:
        """One row more: appended to metrics.jsonl on a local disk (object stores cannot append,
        so there the file is rewritten whole)."""
        self.rows.append(dict(row))
        if not self.local:
            self.write_text("metrics.jsonl", "".join(dumps(r) + "\n" for r in self.rows))
        else:
            fd = os.open(f"{self.root}/metrics.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            with os.fdopen(fd, "a") as f:
                f.write(dumps(row) + "\n")
                f.flush()
                os.fsync(f.fileno())
        if self.tracking is not None:  # after the file: the record first, the mirrors second
            self.tracking.log_row(row)

    def reset_rows(self, rows: list[dict]) -> None:
        """Resume: metrics.jsonl holds exactly `rows` (those of the checkpoint), later ones dropped."""
        self.rows = [dict(r) for r in rows]
        self.write_text("metrics.jsonl", "".join(dumps(r) + "\n" for r in self.rows))
        if self.tracking is not None:
            self.tracking.resume(self.rows)

    def write_summary(self, summary: dict) -> None:
        """summary.json, the end of a run (the mirrors get its totals and close)."""
        self.write_json("summary.json", summary)
        if self.tracking is not None:
            self.tracking.log_summary(summary)

    def end_tracking(self, status: str) -> None:
        """A run that stops without a summary: the mirrors say so (MLflow FAILED / KILLED)."""
        if self.tracking is not None:
            self.tracking.end(status)

    def read_rows(self) -> list[dict]:
        """The rows on disk, as written ("NaN" etc. stay strings)."""
        try:
            with self.fs.open_input_stream(f"{self.root}/metrics.jsonl") as f:
                text = f.read().decode()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]
