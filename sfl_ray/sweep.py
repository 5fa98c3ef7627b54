"""Sweeps over seeds and settings: every grid point x seed is one Ray Tune trial, and every
trial is one whole experiment (its own coordinator, pools and server blocks, or the local backend).

    sfl-ray sweep --config jobs/X.yaml --grid algorithm.name=fedavg,splitfed_v2 --grid partition.alpha=0.1,1 \
        --seeds 3 [--set KEY=VALUE ...] [--out DIR] [--max-concurrent N]
    python -m sfl_ray.sweep ...   (the same)

Layout of the sweep root (`--out`, default `<output.dir>/<output.name>` or `<output.dir>/sweep-<job>`):
`<root>/<grid point>-s<seed>/` one run directory per trial (what `python -m sfl_ray.run` writes),
`<root>/tune/` Ray Tune's experiment state, `<root>/sweep.json` what the sweep is, and the report.

Running the same command again continues the sweep: Tune restores its experiment, finished trials
are not run again, and an interrupted trial continues from the newest checkpoint in its run
directory. Exit 0 when every trial finished, 1 if any failed (named), 2 on bad input (one line,
nothing written), 130 / 143 on SIGINT / SIGTERM (the sweep stays resumable).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import re
import shutil
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from ray import tune  # the progress callback below is pickled into Tune's state by reference

from sfl_ray.run import EXIT_BAD_CONFIG, EXIT_FAILED, EXIT_OK, EXIT_SIGINT, EXIT_SIGTERM

log = logging.getLogger("sfl_ray.sweep")
PROG = "sfl-ray sweep"
TUNE_DIR = "tune"  # Ray Tune's experiment (state, per-trial result files) inside the sweep root
SPEC = "sweep.json"
FINAL = "sweep_final"  # marks a trial's last report (its summary), as opposed to a round's
_PLAN: dict = {}  # this sweep's trials by name, for the progress lines (on the sweep's driver only)
# The sweep owns these: every trial writes into its own folder of the sweep root, in one cluster.
_NOT_GRIDDED = ("output.dir", "output.name", "output.overwrite", "cluster.address")
# A trial's driver process: it loads the data, then runs the local backend itself or, on Ray,
# waits on the coordinator, which evaluates the model and aggregates on the same node.
DRIVER_CPUS = 1.0


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        print(f"{PROG}: {message}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_CONFIG)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = _Parser(prog=PROG, description="Run a grid of settings x seeds as Ray Tune trials, then write the report.")
    p.add_argument("--config", required=True, metavar="JOB", help="YAML job file (see jobs/)")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="values of one config key, read like --set values (repeatable: the grid is the product)")
    p.add_argument("--seeds", type=int, default=1, metavar="N", help="seeds seed .. seed+N-1 per grid point (1)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key in every trial")
    p.add_argument("--out", metavar="DIR", help="sweep root (default <output.dir>/<output.name or sweep-JOB>); "
                   "the same command with the same --out resumes")
    p.add_argument("--max-concurrent", type=int, metavar="N", help="at most N trials at a time (default: as "
                   "many as the cluster holds)")
    args = p.parse_args(argv)
    if args.seeds < 1:
        p.error(f"--seeds {args.seeds}: at least 1")
    if args.max_concurrent is not None and args.max_concurrent < 1:
        p.error(f"--max-concurrent {args.max_concurrent}: at least 1")
    return args


# -- the plan: trials, their configs and resources ---------------------------------------------
@dataclass
class Trial:
    """One grid point x seed: its run directory name, its config and the bundles it reserves."""

    name: str
    point: dict  # grid key -> value as given
    seed: int
    cfg: Any  # ExperimentConfig, with output.dir=<root> and output.name=<name>
    bundles: list = field(default_factory=list)


def split_values(text: str) -> list[str]:
    """`a,b,[1,2]` -> ['a', 'b', '[1,2]']: commas inside brackets or braces belong to the value."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    out.append(cur)
    return [v.strip() for v in out]


def parse_grid(items: Sequence[str]) -> list[tuple[str, list[str]]]:
    """--grid KEY=V1,V2 items as (key, values); raises ConfigError."""
    from sfl_ray.config_base import ConfigError

    grid: list[tuple[str, list[str]]] = []
    for item in items:
        if "=" not in item:
            raise ConfigError("--grid", item, "KEY=V1,V2,..., e.g. algorithm.name=fedavg,splitfed_v2")
        key, text = (s.strip() for s in item.split("=", 1))
        values = split_values(text)
        if not key or any(v == "" for v in values):
            raise ConfigError("--grid", item, "KEY=V1,V2,... with no empty key or value")
        if key in _NOT_GRIDDED:
            raise ConfigError("--grid", key, "the sweep sets this itself (use --out for where trials go)")
        if key in (k for k, _ in grid):
            raise ConfigError("--grid", key, "given twice: list all its values in one --grid")
        if len(set(values)) < len(values):
            raise ConfigError("--grid", item, "a value is listed twice")
        grid.append((key, values))
    return grid


_UNSAFE = re.compile(r"[^A-Za-z0-9._,=+\-]")


def trial_name(point: dict, seed: int) -> str:
    """`algorithm.name=fedavg,partition.alpha=0.1-s0`: readable, and a plain folder name."""
    text = ",".join(f"{k}={v}" for k, v in point.items())
    safe = _UNSAFE.sub("_", text)
    while ".." in safe:
        safe = safe.replace("..", ".")
    if len(safe) > 100 or safe != text:  # shortened or changed: a digest keeps distinct points apart
        safe = f"{safe[:80]}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"
    return f"{safe}-s{seed}" if safe else f"s{seed}"


def plan_trials(job: str, grid: list[tuple[str, list[str]]], seeds: int, overrides: list[str],
                root: str) -> list[Trial]:
    """Every trial's config, validated like `python -m sfl_ray.run` validates one; raises ConfigError."""
    import itertools

    from sfl_ray.config import load_config
    from sfl_ray.config_base import ConfigError

    keys = [k for k, _ in grid]
    trials = []
    for values in itertools.product(*(v for _, v in grid)):
        point = dict(zip(keys, values))
        sets = overrides + [f"{k}={v}" for k, v in point.items()]
        first = load_config(job, sets).seed
        if seeds > 1 and "seed" in point:
            raise ConfigError("--seeds", seeds, "with --grid seed=... give the seeds in the grid (--seeds 1)")
        for seed in range(first, first + seeds):
            name = trial_name(point, seed)
            cfg = load_config(job, sets + [f"seed={seed}", f"output.dir={root}", f"output.name={name}",
                                           "output.overwrite=false", "output.progress=false"])
            trials.append(Trial(name, point, seed, cfg))
    return trials


def check_trial(cfg) -> Any:
    """What `run.py` checks before a run starts (algorithm, data, partition, model), plus what a
    trial cannot do; returns the algorithm class and the number of clients. Raises ConfigError."""
    from sfl_ray.config_base import ConfigError
    from sfl_ray.run import prepare

    if getattr(cfg.algorithm, "server_trainer", "actor") == "ray_train":
        # Ray Train would place its own workers outside the trial's placement group.
        raise ConfigError("algorithm.server_trainer", "ray_train", "not inside a sweep trial: use actor")
    algorithm_cls, _, shards, _ = prepare(cfg)
    return algorithm_cls, len(shards)


def trial_bundles(cfg, algorithm_cls, num_clients: int, resources: dict) -> tuple[list[dict], Optional[int]]:
    """The placement group bundles of one trial, and its number of client pools (Ray backend):
    the driver first (Tune starts the trial there), then one bundle per pool and server block,
    as start_actors creates them. `cluster.num_pools: null` fits the whole cluster (minus the
    driver), so such trials run one at a time. Raises ConfigError if the cluster cannot hold it."""
    from sfl_ray.config_base import ConfigError

    c = cfg.cluster
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    servers = c.num_servers if c.backend == "ray" and algorithm_cls.wants_server_blocks(cfg.algorithm) else 0
    if c.backend == "local":
        bundles, pools = [{"CPU": float(c.torch_threads)}], None
    elif servers and c.exchange == "in_pool":  # pool p hosts server block p (runtime.ray_backend.in_pool_gpus)
        pools = servers
        bundles = [{"CPU": DRIVER_CPUS}] + [{"CPU": c.pool_cpus, "GPU": max(c.client_gpus, c.server_gpus)}] * pools
    else:
        free_cpu = cpus - DRIVER_CPUS - servers * c.server_cpus
        free_gpu = gpus - servers * c.server_gpus
        pools = c.num_pools
        if pools is None:
            limits = [num_clients, int(math.floor(free_cpu / c.pool_cpus + 1e-9))]
            if c.client_gpus > 0:
                limits.append(int(math.floor(free_gpu / c.client_gpus + 1e-9)))
            pools = max(1, min(limits))
        pools = min(pools, num_clients)
        bundles = [{"CPU": DRIVER_CPUS}]
        bundles += [{"CPU": c.pool_cpus, "GPU": c.client_gpus}] * pools
        bundles += [{"CPU": c.server_cpus, "GPU": c.server_gpus}] * servers
    bundles = [{k: float(v) for k, v in b.items() if v > 0} for b in bundles]
    bundles = [b for b in bundles if b]  # a block with no CPU and no GPU reserves nothing
    need = {k: sum(b.get(k, 0.0) for b in bundles) for k in ("CPU", "GPU")}
    for k, have in (("CPU", cpus), ("GPU", gpus)):
        if need[k] > have + 1e-9:
            what = (f"{DRIVER_CPUS:g} for the trial's driver" if c.backend == "ray" else "the local backend's "
                    "cluster.torch_threads")
            raise ConfigError("cluster", f"{cfg.cluster.backend} backend", f"one trial needs {need[k]:g} {k} "
                              f"({what}{', plus pools and server blocks' if c.backend == 'ray' else ''}) > the "
                              f"cluster's {have:g}; set cluster.num_pools / pool_cpus / server_cpus lower, or "
                              f"cluster.backend=local")
    return bundles, pools


def fingerprint(cfg) -> dict:
    """The experiment a trial is (its config without cluster placement or progress display):
    a rerun with another fingerprint is another sweep."""
    d = cfg.model_dump(mode="json")
    d.pop("cluster", None)
    d["output"].pop("progress", None)
    return d


# -- one trial (runs inside a Ray Tune trial actor) ---------------------------------------------
def _report_row(row: dict) -> dict:
    return {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _final_report(summary: dict) -> dict:
    final = summary.get("final") or {}
    totals = summary.get("totals") or {}
    return {**_report_row(final), "rounds": summary.get("rounds"), "stop_reason": summary.get("stop_reason"),
            "gib": totals.get("gib"), FINAL: True}


def _finished(run: Path) -> Optional[dict]:
    """The run's summary if it finished (not interrupted, not failed)."""
    try:
        summary = json.loads((run / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return summary if summary.get("stop_reason") not in ("interrupted", "failed", None) else None


def _newest_usable_checkpoint(run: Path) -> Optional[dict]:
    """The newest checkpoint that loads (a corrupt newest one: the one before)."""
    from sfl_ray.metrics.writer import RunWriter
    from sfl_ray.runtime.checkpoint import Checkpointer, CheckpointError

    if not (run / "config.yaml").is_file():
        return None
    ck = Checkpointer(RunWriter(str(run)))
    try:
        rounds = ck.rounds()
    except CheckpointError:
        return None
    for rnd in reversed(rounds):
        try:
            return ck.load(rnd)
        except CheckpointError as err:
            log.warning("%s: checkpoint of round %d unusable (%s); trying an older one", run.name, rnd, err)
    return None


def run_trial(config: dict, trials: dict, cwd: str) -> None:
    """Tune's function trainable: run (or continue, or just report) the trial `config["run"]`."""
    from sfl_ray.run import run_config

    if os.path.isdir(cwd):  # Tune starts trials in their Tune folder; relative paths mean the sweep's
        os.chdir(cwd)
    trial = trials[config["run"]]
    cfg, run = trial.cfg, Path(trial.cfg.run_dir())
    summary = _finished(run)
    if summary is not None:  # finished before an interruption of the sweep: nothing to run again
        tune.report(_final_report(summary))
        return
    state = _newest_usable_checkpoint(run)
    if state is None and run.exists():  # started but no checkpoint to continue from: start again
        shutil.rmtree(run)
    reported = [state["round"] if state else 0]

    def progress(p: dict) -> None:
        row = p.get("row") or {}
        if row.get("round", 0) > reported[0]:
            reported[0] = row["round"]
            tune.report(_report_row(row))

    # The one code path of a run (checks, run directory, partition.json, summary.json on a failure).
    summary = run_config(cfg, resume=state, progress=progress)
    tune.report(_final_report(summary))


def _trial_resources(trials: dict):
    def resources(config: dict):
        return tune.PlacementGroupFactory(trials[config["run"]].bundles)
    return resources


def _trial_name(trial) -> str:
    return trial.config["run"]


# -- progress on the sweep's terminal ----------------------------------------------------------
def _metric_text(result: dict) -> str:
    parts = []
    for key, label, fmt in (("eval_accuracy", "acc", ".4f"), ("eval_perplexity", "ppl", ".2f"),
                            ("train_loss", "loss", ".4f")):
        if isinstance(result.get(key), (int, float)):
            parts.append(f"{label} {result[key]:{fmt}}")
    return " ".join(parts)


class Progress(tune.Callback):
    """One line on the sweep's terminal when a trial starts, per round it reports, and when it ends."""

    def on_trial_start(self, iteration, trials, trial, **info):
        print(f"sweep: started {trial.config['run']}", flush=True)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if not result.get(FINAL):
            print(f"sweep: {trial.config['run']} round {result.get('round')}: {_metric_text(result)}", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        r = trial.last_result or {}
        print(f"sweep: finished {trial.config['run']} after {r.get('rounds')} rounds ({r.get('stop_reason')}): "
              f"{_metric_text(r)}", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        print(f"sweep: FAILED {trial.config['run']}: {_trial_error(trial.config['run'], trial.path)}", flush=True)


def _trial_error(name: str, tune_trial_dir: Optional[str]) -> str:
    """Why a trial failed, in one line: its run's summary, else the last line of Tune's error.txt."""
    why = None
    trials = _PLAN.get("trials", {})
    if name in trials:
        try:
            why = json.loads((Path(trials[name].cfg.run_dir()) / "summary.json").read_text()).get("error")
        except (OSError, ValueError):
            pass
    error_txt = Path(tune_trial_dir or "") / "error.txt"
    if why is None and error_txt.is_file():
        why = (error_txt.read_text().strip().splitlines() or ["?"])[-1]
    return f"{why or 'see the log above'}" + (f" (traceback: {error_txt})" if error_txt.is_file() else "")


# -- the report -------------------------------------------------------------------------------
def write_summary_table(trials: list[Trial], root: Path) -> Path:
    """`sweep.md`: one row per trial, and per grid point the mean and spread over seeds."""
    import statistics

    rows, by_point = [], {}
    lm = False
    for t in trials:
        s = _finished(Path(t.cfg.run_dir()))
        final = (s or {}).get("final") or {}
        lm = lm or final.get("eval_perplexity") is not None
        rows.append((t, s, final))
    metric, label = ("eval_perplexity", "ppl") if lm else ("eval_accuracy", "acc")
    lines = [f"| trial | seed | rounds | stop | final {label} | GiB moved | wall s |", "|---|---|---|---|---|---|---|"]
    for t, s, final in rows:
        if s is None:
            lines.append(f"| {t.name} | {t.seed} | - | not finished | - | - | - |")
            continue
        v = final.get(metric)
        lines.append(f"| {t.name} | {t.seed} | {s['rounds']} | {s['stop_reason']} | "
                     f"{'-' if v is None else f'{v:.4f}'} | {s['totals']['gib']:.4f} | {s['totals']['wall_s']:.1f} |")
        if isinstance(v, (int, float)):
            by_point.setdefault(json.dumps(t.point), []).append(v)
    lines += ["", f"| grid point | seeds | mean {label} | std |", "|---|---|---|---|"]
    for point, vals in by_point.items():
        text = ", ".join(f"{k}={v}" for k, v in json.loads(point).items()) or "(base config)"
        std = statistics.stdev(vals) if len(vals) > 1 else 0.0
        lines.append(f"| {text} | {len(vals)} | {statistics.fmean(vals):.4f} | {std:.4f} |")
    out = root / "sweep.md"
    out.write_text("\n".join(lines) + "\n")
    return out


def _write_report(trials: list[Trial], root: Path) -> Optional[Path]:
    from sfl_ray.report import write_report

    paths = [t.cfg.run_dir() for t in trials if _finished(Path(t.cfg.run_dir())) is not None]
    if not paths:
        return None
    try:
        return write_report(paths, str(root))
    except Exception as err:  # noqa: BLE001 - the trials' results are on disk whatever the report does
        log.error("the report could not be written (%s); writing the summary table instead", err)
        return write_summary_table(trials, root)


# -- the sweep's own folder -------------------------------------------------------------------
def _root(args, job: str, overrides: list[str]) -> Path:
    from sfl_ray.config import load_config
    from sfl_ray.config_base import ConfigError

    base = load_config(job, overrides)
    if base.output.overwrite:
        raise ConfigError("output.overwrite", True, "a sweep continues what is in its folder; to start over, "
                          "remove it or give another --out")
    root = args.out or f"{base.output.dir.rstrip('/')}/{base.output.name or 'sweep-' + Path(job).stem}"
    if "://" in root:
        raise ConfigError("--out", root, "a sweep root is a local or shared-filesystem folder, not a URI")
    return Path(root).expanduser().resolve()


def _check_root(root: Path, spec: dict) -> bool:
    """True if `root` holds this very sweep (to continue), False if it is new or empty; raises
    ConfigError for anything else."""
    from sfl_ray.config_base import ConfigError

    if root.exists() and not root.is_dir():
        raise ConfigError("--out", str(root), "exists and is not a folder")
    if not root.exists() or not any(p.name != ".lock" for p in root.iterdir()):
        existing = root
        while not existing.exists():
            existing = existing.parent
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError("--out", str(root), f"{existing} is not writable")
        return False
    try:
        old = json.loads((root / SPEC).read_text())
    except (OSError, ValueError):
        raise ConfigError("--out", str(root), f"exists, is not empty and holds no sweep ({SPEC}); "
                          "give another --out") from None
    if old.get("trials") != spec["trials"]:
        changed = sorted(set(old.get("trials", {})) ^ set(spec["trials"])) or sorted(
            n for n in spec["trials"] if old["trials"].get(n) != spec["trials"][n])
        raise ConfigError("--out", str(root), f"holds a sweep with other trials or settings (first difference: "
                          f"{changed[0]}); give another --out to start a new one")
    return True


# -- signals ----------------------------------------------------------------------------------
class _Stop:
    """The first SIGINT/SIGTERM asks Tune to stop (it saves its experiment state and stops the
    trials, whose run directories keep their checkpoints); a second one stops at once."""

    def __init__(self):
        self.signal: Optional[str] = None

    def __call__(self, signum, frame):
        name = "SIGINT" if signum == signal.SIGINT else "SIGTERM"
        if self.signal is None:
            self.signal = name
            print(f"sweep: {name}: stopping the trials (send it again to stop at once)", flush=True)
            tune_handler = signal.getsignal(signal.SIGUSR1)  # Tune's own graceful stop, set during fit()
            if callable(tune_handler):
                tune_handler(signum, frame)
                return
        self.signal = self.signal or name
        raise KeyboardInterrupt

    def code(self) -> int:
        return EXIT_SIGTERM if self.signal == "SIGTERM" else EXIT_SIGINT


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from sfl_ray.config_base import ConfigError
    from sfl_ray.run import _failed, _init_ray

    args = parse_args(argv)
    stop = _Stop()
    main_thread = _main_thread()
    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)} if main_thread else {}
    started_ray = False
    try:
        try:
            grid = parse_grid(args.grid)
            root = _root(args, args.config, args.overrides)
            trials = plan_trials(args.config, grid, args.seeds, args.overrides, str(root))
            checked = [check_trial(t.cfg) for t in trials]
            spec = {"config": str(Path(args.config).resolve()), "grid": args.grid, "seeds": args.seeds,
                    "set": args.overrides, "trials": {t.name: fingerprint(t.cfg) for t in trials}}
            resuming = _check_root(root, spec)
            started_ray = _init_ray(trials[0].cfg)
            if main_thread:  # ray.init puts its own SIGTERM handler (log and exit) in place of ours
                signal.signal(signal.SIGTERM, stop)
            import ray
            resources = ray.cluster_resources()
            for t, (algorithm_cls, n_clients) in zip(trials, checked):
                t.bundles, pools = trial_bundles(t.cfg, algorithm_cls, n_clients, resources)
                if pools is not None and t.cfg.cluster.num_pools != pools:
                    t.cfg.cluster.num_pools = pools  # as planned for its bundles (results do not depend on it)
        except ConfigError as err:
            print(str(err), file=sys.stderr)
            return EXIT_BAD_CONFIG
        except Exception as err:  # noqa: BLE001 - e.g. Ray would not start: report, exit 1
            return _failed(err)
        return _sweep(args, trials, root, spec, resuming, stop)
    except KeyboardInterrupt:
        print(f"sweep: stopped by {stop.signal or 'SIGINT'}; run the same command again to continue", flush=True)
        return stop.code()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        if started_ray:
            import ray
            ray.shutdown()


def _sweep(args, trials: list[Trial], root: Path, spec: dict, resuming: bool, stop: _Stop) -> int:
    import fcntl

    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    lock = open(root / ".lock", "w")  # held while this process runs the sweep; released when it exits
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        print(f"config error: --out={str(root)!r}: another sweep is running in this folder", file=sys.stderr)
        return EXIT_BAD_CONFIG
    try:
        return _tune(args, trials, root, spec, resuming, stop)
    finally:
        lock.close()


def _tune(args, trials: list[Trial], root: Path, spec: dict, resuming: bool, stop: _Stop) -> int:
    """Start or continue the Tune experiment; returns the exit code."""
    if not resuming:
        (root / SPEC).write_text(json.dumps(spec, indent=1) + "\n")
    by_name = {t.name: t for t in trials}
    trainable = tune.with_resources(tune.with_parameters(run_trial, trials=by_name, cwd=os.getcwd()),
                                    _trial_resources(by_name))
    tune_dir = root / TUNE_DIR
    # Tune's hints name Python APIs, not this command, and a failed trial's traceback is in its
    # error.txt: the progress lines say what happened, in this command's terms.
    logging.getLogger("ray.tune").setLevel(logging.CRITICAL)
    _PLAN["trials"] = by_name
    groups = sorted({json.dumps(t.bundles) for t in trials})
    print(f"sweep: {len(trials)} trial(s) in {root}; each reserves "
          + " or ".join(_bundles_text(json.loads(g)) for g in groups), flush=True)
    if resuming and tune.Tuner.can_restore(str(tune_dir)):
        print("sweep: continuing the sweep in this folder (finished trials are not run again)", flush=True)
        tuner = tune.Tuner.restore(str(tune_dir), trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable, param_space={"run": tune.grid_search([t.name for t in trials])},
            tune_config=tune.TuneConfig(max_concurrent_trials=args.max_concurrent, trial_name_creator=_trial_name,
                                        trial_dirname_creator=_trial_name),
            run_config=tune.RunConfig(name=TUNE_DIR, storage_path=str(root), verbose=0,
                                      callbacks=[Progress()],
                                      failure_config=tune.FailureConfig(max_failures=0)))
    usr1 = signal.getsignal(signal.SIGUSR1)
    # Tune's own SIGINT handler would take the first Ctrl-C without telling us (ours forwards it);
    # with verbose=0 the classic reporter is silent, the new one is not.
    saved = {k: os.environ.get(k) for k in ("TUNE_DISABLE_SIGINT_HANDLER", "RAY_AIR_NEW_OUTPUT")}
    os.environ.update(TUNE_DISABLE_SIGINT_HANDLER="1", RAY_AIR_NEW_OUTPUT="0")
    try:
        results = tuner.fit()
    finally:
        signal.signal(signal.SIGUSR1, usr1)  # Tune leaves its handler set; ours must not find it later
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    if stop.signal:
        print(f"sweep: stopped by {stop.signal}; run the same command again to continue", flush=True)
        return stop.code()
    failed = [(r.config["run"], _trial_error(r.config["run"], r.path)) for r in results if r.error is not None]
    report = _write_report(trials, root)
    if report is not None:
        print(f"sweep: report: {report}", flush=True)
    done = sum(_finished(Path(t.cfg.run_dir())) is not None for t in trials)
    print(f"sweep: {done}/{len(trials)} trial(s) finished; run directories in {root}", flush=True)
    for name, why in failed:
        print(f"sweep: trial {name} failed: {why}", file=sys.stderr, flush=True)
    return EXIT_FAILED if failed or done < len(trials) else EXIT_OK


def _bundles_text(bundles: list[dict]) -> str:
    total = {k: sum(b.get(k, 0.0) for b in bundles) for k in ("CPU", "GPU")}
    return " + ".join(f"{v:g} {k}" for k, v in total.items() if v) + f" ({len(bundles)} bundle(s))"


def _main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    raise SystemExit(main())
