"""The run directory: config.yaml, metrics.jsonl (one row per round), summary.json, partition.json.

The directory may be a local folder or a pyarrow.fs URI (s3://, gs://) so cluster runs can
write to shared storage. metrics.jsonl is rewritten whole after every round (object stores
cannot append), so a crash never leaves a half-written row.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    return v


class RunWriter:
    """Writes the files of one run directory."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir.rstrip("/")
        if "://" in run_dir:
            self.fs, self.root = pafs.FileSystem.from_uri(run_dir)
        else:
            self.fs, self.root = pafs.LocalFileSystem(), str(Path(run_dir).resolve())
        self.fs.create_dir(self.root, recursive=True)
        self.rows: list[dict] = []

    def write_text(self, name: str, text: str) -> None:
        tmp = f"{self.root}/.{name}.tmp"
        with self.fs.open_output_stream(tmp) as f:
            f.write(text.encode())
        self.fs.move(tmp, f"{self.root}/{name}")

    def write_json(self, name: str, obj: Any) -> None:
        self.write_text(name, json.dumps(_clean(obj), indent=2) + "\n")

    def append_row(self, row: dict) -> None:
        self.rows.append(_clean(row))
        self.write_text("metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.rows))

    def read_rows(self) -> list[dict]:
        try:
            with self.fs.open_input_stream(f"{self.root}/metrics.jsonl") as f:
                text = f.read().decode()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]
