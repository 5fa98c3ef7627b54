"""Each metrics row mirrored to TensorBoard (`output.tensorboard`) and MLflow (`output.mlflow_uri`).

metrics.jsonl stays the record; these are views for users who live in those tools. Numeric
values of a row go out under the row's keys (nested ones dotted, as in `sfl_ray.load_run`:
"bytes_by_kind.up/activations"), step = round. null (not evaluated / not measured) is left out,
never sent as 0; a NaN is sent as NaN (the run fails on it anyway, after its row is written).

The object travels with the RunWriter to whichever process writes rows (the coordinator may be
a Ray actor, and may be replaced after a fault); it opens its writers there, on first use.
Resume (`reset_rows`): TensorBoard gets `purge_step` = the first round to run again, so steps
written after the checkpoint are dropped by TensorBoard; MLflow continues the same run (its id
is kept in `<run dir>/mlflow.json`); a step logged twice keeps its last value in MLflow's view.
A sink that fails (server unreachable, disk full) is switched off with one warning: the run
goes on, its files have every row.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Optional

log = logging.getLogger("sfl_ray")
MLFLOW_MISSING = 'needs the mlflow client: pip install "sfl_ray[mlflow]"'
_PARAM_MAX = 500  # MLflow's oldest servers refuse longer parameter values


def numeric_items(row: dict, prefix: str = "") -> dict[str, float]:
    """The row's numbers (nested dicts flattened with dots), without None, strings and booleans."""
    out: dict[str, float] = {}
    for k, v in row.items():
        if isinstance(v, dict):
            out.update(numeric_items(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = float(v)
    return out


class Tracking:
    """TensorBoard and/or MLflow for one run; see the module docstring."""

    def __init__(self, run_dir: str, tensorboard: bool, mlflow_uri: Optional[str], run_name: str, params: dict):
        self.run_dir, self.tensorboard, self.mlflow_uri = run_dir.rstrip("/"), tensorboard, mlflow_uri
        self.run_name, self.params = run_name, params
        self._resume_after: Optional[int] = None  # the round of the checkpoint a resumed run continues from
        self._tb: Any = None
        self._ml: Any = None  # (client, run_id)

    @classmethod
    def from_config(cls, cfg: Any) -> Optional["Tracking"]:
        if not cfg.output.tensorboard and cfg.output.mlflow_uri is None:
            return None
        from sfl_ray.results import flatten
        return cls(cfg.run_dir(), cfg.output.tensorboard, cfg.output.mlflow_uri, cfg.run_name(),
                   flatten(cfg.model_dump(mode="json")))

    def __getstate__(self) -> dict:  # open writers stay in the process that opened them
        return {**self.__dict__, "_tb": None, "_ml": None}

    # -- called by RunWriter -----------------------------------------------------------------
    def resume(self, rows: list[dict]) -> None:
        """The run continues after these rows (a checkpoint): later steps will be written again."""
        self._resume_after = max((int(r["round"]) for r in rows), default=0)
        self.close()  # a writer opened before the restore must not keep the steps it wrote

    def log_row(self, row: dict) -> None:
        step = int(row["round"])
        values = {k: v for k, v in numeric_items(row).items() if k != "round"}
        if self.tensorboard:
            self._guard("TensorBoard", lambda: self._log_tb(values, step))
        if self.mlflow_uri is not None:
            self._guard("MLflow", lambda: self._log_ml(values, step))

    def log_summary(self, summary: dict) -> None:
        """The end of a run: its totals to MLflow (the rows are already there), runs closed."""
        if self.mlflow_uri is not None:
            self._guard("MLflow", lambda: self._end_ml(summary))
        self.close()

    def end(self, status: str) -> None:
        """A run that stopped without a summary (MLflow status FAILED or KILLED)."""
        if self.mlflow_uri is not None and self._ml is not None:
            client, run_id = self._ml
            self._guard("MLflow", lambda: client.set_terminated(run_id, status))
        self.close()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        self._tb = self._ml = None

    # -- the sinks -----------------------------------------------------------------------------
    def _guard(self, what: str, fn) -> None:
        try:
            fn()
        except Exception as err:  # noqa: BLE001 - a metrics mirror must not stop training
            log.warning("%s logging failed (%s: %s); continuing without it, metrics.jsonl has every row",
                        what, type(err).__name__, str(err).splitlines()[0] if str(err) else "")
            if what == "TensorBoard":
                self.tensorboard = False
            else:
                self.mlflow_uri = None

    def _log_tb(self, values: dict[str, float], step: int) -> None:
        if self._tb is None:
            from tensorboardX import SummaryWriter
            purge = self._resume_after + 1 if self._resume_after is not None else None
            # The suffix: a resumed writer opened within the same second as the first must not
            # get (and truncate) its file; names still sort in the order they were opened.
            self._tb = SummaryWriter(logdir=f"{self.run_dir}/tensorboard", purge_step=purge, flush_secs=30,
                                     filename_suffix=f".{time.time_ns()}")
        for k, v in values.items():
            self._tb.add_scalar(k, v, global_step=step)
        self._tb.flush()  # a crash loses no round

    def _client(self):
        from mlflow.tracking import MlflowClient
        uri = self.mlflow_uri
        if uri.startswith("file:") or "://" not in uri:
            # MLflow 3 refuses its file store unless opted in; the user asked for one by its URI.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        return MlflowClient(tracking_uri=uri)

    def _start_ml(self):
        from mlflow.entities import Param
        client = self._client()
        ids = self._read_ids() if self._resume_after is not None else None
        if ids is not None:
            client.update_run(ids["run_id"], status="RUNNING")
            self._ml = (client, ids["run_id"])
            return self._ml
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "sfl_ray")
        exp = client.get_experiment_by_name(name)
        if exp is None:
            try:
                exp_id = client.create_experiment(name)
            except Exception:  # noqa: BLE001 - created meanwhile by another run
                exp_id = client.get_experiment_by_name(name).experiment_id
        else:
            exp_id = exp.experiment_id
        run = client.create_run(exp_id, run_name=self.run_name, tags={"sfl_ray.run_dir": self.run_dir})
        run_id = run.info.run_id
        params = [Param(k, (v if isinstance(v, str) else json.dumps(v))[:_PARAM_MAX]) for k, v in self.params.items()]
        for i in range(0, len(params), 100):  # log_batch takes at most 100 params a call
            client.log_batch(run_id, params=params[i:i + 100])
        self._write_ids({"tracking_uri": self.mlflow_uri, "experiment_id": exp_id, "run_id": run_id})
        self._ml = (client, run_id)
        return self._ml

    def _log_ml(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric
        client, run_id = self._ml or self._start_ml()
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in values.items()]
        for i in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics=metrics[i:i + 1000])

    def _end_ml(self, summary: dict) -> None:
        from mlflow.entities import Metric
        client, run_id = self._ml or self._start_ml()
        now, step = int(time.time() * 1000), int(summary.get("rounds") or 0)
        totals = {f"summary.{k}": v for k, v in numeric_items(summary.get("totals") or {}).items()}
        best = summary.get("best_eval_accuracy")
        if isinstance(best, (int, float)) and not isinstance(best, bool):
            totals["summary.best_eval_accuracy"] = float(best)
        client.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in totals.items()])
        client.set_tag(run_id, "sfl_ray.stop_reason", str(summary.get("stop_reason")))
        client.set_terminated(run_id, "FINISHED")

    def _read_ids(self) -> Optional[dict]:
        from sfl_ray.metrics.writer import RunWriter
        w = RunWriter(self.run_dir)
        try:
            with w.fs.open_input_stream(f"{w.root}/mlflow.json") as f:
                ids = json.loads(f.read().decode())
        except (OSError, ValueError):
            return None
        return ids if ids.get("tracking_uri") == self.mlflow_uri and ids.get("run_id") else None

    def _write_ids(self, ids: dict) -> None:
        from sfl_ray.metrics.writer import RunWriter
        RunWriter(self.run_dir).write_json("mlflow.json", ids)
