"""`sfl-ray run` (also `python -m sfl_ray.run`, e.g. under `ray job submit`): one experiment.

    sfl-ray run --config FILE_OR_NAME [--set KEY=VALUE ...]
    sfl-ray run --resume RUN_DIR [--resume-round N] [--set cluster.KEY=VALUE ...]
    sfl-ray run --print-schema | --list-jobs

Exit 0 on success, 2 on a bad config or bad arguments (one line naming the key, the value and
what is allowed; nothing is written), 1 on a failure while running (a client error, a NaN/Inf
loss or upload), 130 / 143 when stopped by SIGINT / SIGTERM (the last checkpoint is kept and
summary.json says `interrupted`).

Order matters: every check that can fail with exit 2 — config, run directory, data, model, and
on Ray the cluster topology — runs before the run directory is claimed, so a refused run leaves
nothing on disk.

The module is also callable, as the Python API: `sfl_ray.run(config_or_path, **overrides) -> Run`
(see `sfl_ray.api.run`). The command line and the API share one code path, `run_config`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import types
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import numpy as np

if TYPE_CHECKING:
    from sfl_ray.api import Run
    from sfl_ray.config import ExperimentConfig

EXIT_OK, EXIT_FAILED, EXIT_BAD_CONFIG, EXIT_SIGINT, EXIT_SIGTERM = 0, 1, 2, 130, 143
log = logging.getLogger("sfl_ray")


PROG = "python -m sfl_ray.run"  # what a user types to reach this module without the sfl-ray script


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own exit code is 2 as well; keep it one line
        print(f"{self.prog}: {message}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_CONFIG)


def parse_args(argv: Optional[Sequence[str]], prog: str = PROG) -> argparse.Namespace:
    """The run command's arguments; `prog` is how the user invoked it (shown in help and errors)."""
    p = _Parser(prog=prog, description="Train a split model across many clients: one experiment from a YAML job.")
    p.add_argument("--config", metavar="FILE_OR_NAME",
                   help="YAML job file, or the name of a job shipped with the package (e.g. quickstart; see --list-jobs)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.lr=0.01 (repeatable; with --resume only "
                        "cluster.* and output.progress)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its newest checkpoint")
    p.add_argument("--resume-round", type=int, metavar="N", help="with --resume: from the checkpoint of round N")
    p.add_argument("--print-schema", action="store_true", help="print the config's JSON schema and exit")
    p.add_argument("--list-jobs", action="store_true", help="list the jobs shipped with the package and exit")
    args = p.parse_args(argv)
    args.prog = prog
    if args.print_schema or args.list_jobs:
        return args
    if (args.config is None) == (args.resume is None):
        p.error("give either --config FILE_OR_NAME (a new run) or --resume RUN_DIR (continue a run)")
    if args.resume_round is not None and args.resume is None:
        p.error("--resume-round needs --resume RUN_DIR")
    return args


class Interrupted(BaseException):
    """SIGTERM, raised in the driver like KeyboardInterrupt is for SIGINT."""


def _on_sigterm(signum, frame) -> None:  # noqa: ARG001 - signal handler signature
    raise Interrupted()


def signal_behind(err: BaseException) -> Optional[BaseException]:
    """The KeyboardInterrupt / Interrupted that `err` is, or that it came from. A signal handler
    raising while a C extension runs (e.g. Ray's CoreWorker.wait) surfaces as a SystemError
    ("returned a result with an exception set") caused by it: still an interruption."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, (KeyboardInterrupt, Interrupted)):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def load_resume(run_dir: str, overrides: Sequence[str] = (), resume_round: Optional[int] = None) -> tuple:
    """(config, checkpoint state) of the run in `run_dir` (its own config, with `cluster.*` /
    `output.progress` overrides only), to continue from its newest checkpoint or that of
    `resume_round`. Raises ConfigError."""
    from pathlib import Path

    from sfl_ray.config import load_config
    from sfl_ray.config_base import ConfigError
    from sfl_ray.metrics.writer import RunWriter
    from sfl_ray.runtime.checkpoint import Checkpointer, CheckpointError

    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise ConfigError("--resume", run_dir, "not a run directory (no config.yaml)")
    bad = [o for o in overrides if not (o.startswith("cluster.") or o.startswith("output.progress="))]
    if bad:
        raise ConfigError("--set", bad[0], "a resumed run keeps its experiment: only cluster.* and output.progress")
    cfg = load_config(str(run / "config.yaml"), list(overrides) + [f"output.dir={run.resolve().parent}",
                                                                   f"output.name={run.name}"])
    summary = run / "summary.json"
    if summary.is_file():
        import json
        reason = json.loads(summary.read_text()).get("stop_reason")
        if reason not in ("interrupted", "failed"):
            raise ConfigError("--resume", run_dir, f"this run has finished (stop_reason {reason!r})")
    if cfg.output.checkpoint_every == 0:
        raise ConfigError("--resume", run_dir, "this run wrote no checkpoints (output.checkpoint_every=0)")
    try:
        state = Checkpointer(RunWriter(str(run))).load(resume_round)
    except CheckpointError as err:
        raise ConfigError("--resume", run_dir, str(err)) from None
    return cfg, state


def _write_stop(run_dir: str, reason: str, error: Optional[str] = None, prog: str = PROG) -> None:
    """summary.json of a run that did not finish: why, how far it got, what it can resume from."""
    from sfl_ray.metrics.writer import RunWriter
    from sfl_ray.runtime.checkpoint import Checkpointer

    try:
        writer = RunWriter(run_dir)
        rows = writer.read_rows()
        try:
            rounds = Checkpointer(writer).rounds()
        except Exception:  # noqa: BLE001 - a broken manifest must not hide the stop itself
            rounds = []
        writer.write_json("summary.json", {
            "stop_reason": reason, "error": error, "rounds": rows[-1]["round"] if rows else 0,
            "final": rows[-1] if rows else None, "last_checkpoint_round": rounds[-1] if rounds else None,
            "resume": f"{prog} --resume {run_dir}" if rounds else None})
    except Exception as err:  # noqa: BLE001 - reporting the stop is best effort
        log.warning("could not write summary.json: %s", err)


def prepare(cfg):
    """Everything that can be checked before any actor starts: the algorithm, the data, the
    partition, the model, its cut and the auxiliary head. Raises ConfigError."""
    from sfl_ray.algorithms import get_algorithm
    from sfl_ray.data import label_histograms, load_source, partition
    from sfl_ray.models.split import build_parts

    algorithm_cls = get_algorithm(cfg.algorithm.name)
    if (algorithm_cls.wants_server_blocks(cfg.algorithm) and algorithm_cls.max_servers is not None
            and cfg.cluster.num_servers > algorithm_cls.max_servers):
        from sfl_ray.config_base import ConfigError
        raise ConfigError("cluster.num_servers", cfg.cluster.num_servers,
                          f"{cfg.algorithm.name} trains one server model: at most {algorithm_cls.max_servers}")
    if getattr(cfg.algorithm, "server_trainer", "actor") == "ray_train" and cfg.cluster.backend != "ray":
        from sfl_ray.config_base import ConfigError
        raise ConfigError("algorithm.server_trainer", "ray_train", "needs cluster.backend=ray (or use 'actor')")
    data = load_source(cfg.data)
    from sfl_ray.config_base import ConfigError
    if cfg.data.augment != "none" and (data.task != "classification" or len(data.input_shape) != 3):
        raise ConfigError("data.augment", cfg.data.augment, f"needs images (C, H, W); {cfg.data.name} gives "
                          f"{data.task} inputs of shape {data.input_shape}: use none")
    keys, n_keys = data.train_y, data.num_classes
    if cfg.partition.field is not None or (data.task == "lm" and cfg.partition.name != "iid"):
        field = cfg.partition.field
        if field not in data.groups:
            raise ConfigError("partition.field", field, f"a metadata field of this data set: "
                              f"{', '.join(k for k in data.groups if not k.endswith('_names')) or 'none'}")
        keys = np.asarray(data.groups[field])
        n_keys = int(keys.max()) + 1
    shards = partition(keys, cfg.partition, cfg.train.num_clients, cfg.seed)
    if shards.sizes.min() == 0:
        raise ConfigError("train.num_clients", cfg.train.num_clients, "some clients would hold no samples")
    parts = build_parts(cfg.model.name, cfg.model.cut, data.input_shape, data.num_classes, cfg.seed, cfg.model)
    _check_single_sample_batches(parts, data.input_shape, shards.sizes, cfg)
    aux_cfg = getattr(cfg.algorithm, "aux", None)
    if aux_cfg is not None:  # as every process will build it: its errors (budget, nothing to train) come now
        from sfl_ray.models.aux import build_aux
        build_aux(aux_cfg, parts.act_shape, data.num_classes, cfg.seed, parts.aux_factory, server=parts.server)
    hist = label_histograms(keys, shards, n_keys) if keys.ndim == 1 else None
    return algorithm_cls, data, shards, hist


def _check_single_sample_batches(parts, input_shape, sizes: np.ndarray, cfg) -> None:
    """A client whose size leaves one sample over forms a last batch of one; a BatchNorm that
    sees one value per channel (a 1x1 map, as resnet18's last stage on small images) cannot
    train on it, and the run would fail mid-round. Refuse it now, naming batch sizes that work."""
    import torch

    bs = cfg.train.batch_size
    one_over = np.flatnonzero(sizes % bs == 1)
    model = parts.full()
    if not len(one_over) or not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return
    model.train()  # prepare's own copy: its BatchNorm statistics are not kept
    try:
        with torch.no_grad():
            model(torch.zeros((1, *input_shape)))
    except Exception as e:  # noqa: BLE001 - only BatchNorm's refusal is ours to report here
        if "Expected more than 1 value per channel" not in str(e):
            return
        from sfl_ray.config_base import ConfigError
        c = int(one_over[0])
        good = sorted((b for b in range(max(2, bs // 2), 2 * bs + 1) if not (sizes % b == 1).any()),
                      key=lambda b: (abs(b - bs), b))[:3]
        hint = (f"Choose a train.batch_size that leaves no client one sample over (e.g. {', '.join(map(str, good))})"
                if good else "Choose other client sizes")
        raise ConfigError("train.batch_size", bs, f"client {c} holds {int(sizes[c])} samples, so its last batch has "
                          f"one; {cfg.model.name} has a BatchNorm that cannot train on one sample ({e}). {hint}.") from None


def _init_ray(cfg) -> bool:
    """Join the job's cluster or start a local one; True if this process started Ray."""
    import ray

    if ray.is_initialized():
        return False
    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS")
    # No address and no job cluster: start a new local Ray instance. Not ray.init()'s default,
    # which joins whatever /tmp/ray/ray_current_cluster names and waits for ever if that head died.
    import signal
    import threading

    main_thread = threading.current_thread() is threading.main_thread()
    ours = signal.getsignal(signal.SIGTERM) if main_thread else None
    ray.init(address=address or "local", include_dashboard=False if address is None else None,
             logging_level=logging.WARNING, log_to_driver=True)
    if main_thread and ours is not None:
        # ray.init installs its own SIGTERM handler (log, exit 1): the caller's (exit 143 with a
        # resumable summary.json) must stay in force.
        signal.signal(signal.SIGTERM, ours)
    return address is None


def _check_topology(cfg, algorithm_cls, shards) -> None:
    """The cluster must hold the pools and server blocks (needs Ray up); raises ConfigError."""
    from sfl_ray.runtime.ray_backend import plan_topology

    plan_topology(cfg.cluster, len(shards), algorithm_cls.wants_server_blocks(cfg.algorithm))


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [repr(err)])[0]


def _failed(err: BaseException) -> int:
    from sfl_ray.runtime.coordinator import ClientFailed
    from sfl_ray.runtime.finite import NonFiniteError

    first = _first_line(err)
    if isinstance(err, NonFiniteError) or "NonFiniteError: " in first:  # the one line says it all
        log.error("run failed: %s (training diverged: lower the learning rate?)", first.split("NonFiniteError: ")[-1])
    else:  # a client failure already carries the client's traceback; others need their own
        log.error("run failed: %s", err, exc_info=not isinstance(err, ClientFailed))
    return EXIT_FAILED


def run_config(cfg: "ExperimentConfig", resume: Optional[dict] = None, prog: str = PROG,
               echo: Optional[Callable[[str], None]] = None,
               progress: Optional[Callable[[dict], None]] = None) -> dict:
    """Run one experiment: the code path of `sfl-ray run`, `sfl_ray.run(...)` and every caller
    that runs configs (compare, sweeps). Returns the run's summary (as in summary.json).

    Every check that can fail with ConfigError — run directory, data, model, and on Ray the
    cluster topology — comes before the run directory is claimed (nothing is written); then
    partition.json is written and the experiment runs. `resume`: a checkpoint state from
    `load_resume` (the run directory is reused, not claimed). Raises ConfigError (nothing left
    on disk), KeyboardInterrupt / Interrupted (summary.json says `interrupted`, with the resume
    command `<prog> --resume <run dir>`), or the run's own exception (summary.json says
    `failed`). Ray: joins `cluster.address`, RAY_ADDRESS or an already initialised Ray; a Ray
    instance this call starts is shut down before it returns. `echo` receives the start and
    end lines (None: silent); `progress` the coordinator's progress after every round (its
    `row`: the round's metrics).
    """
    from sfl_ray.config_base import ConfigError
    from sfl_ray.config import dump_config
    from sfl_ray.metrics.run_dir import check_run_dir, claim_run_dir
    from sfl_ray.metrics.writer import RunWriter
    from sfl_ray.runtime import launch

    say = echo or (lambda line: None)
    started_ray, run_dir = False, None
    try:
        if resume is None:
            check_run_dir(cfg)  # cheap, so before the data: a taken name fails fast
        algorithm_cls, data, shards, hist = prepare(cfg)
        if cfg.cluster.backend == "ray":
            started_ray = _init_ray(cfg)
            _check_topology(cfg, algorithm_cls, shards)
        path = cfg.run_dir()
        if resume is None:
            run_dir = claim_run_dir(cfg, dump_config(cfg))
            # One line, not indented: ten thousand clients' histograms stay a few hundred KB.
            RunWriter(run_dir.path).write_json("partition.json", {
                "num_clients": len(shards), "sizes": shards.sizes.tolist(), "label_histograms": hist}, indent=None)
        how = f"resumed after round {resume['round']}" if resume else f"{cfg.train.num_clients} clients"
        say(f"sfl_ray: {cfg.algorithm.name} on {cfg.data.name}/{cfg.model.name}, {how}, "
            f"backend {cfg.cluster.backend}; run dir {path}")
        try:
            summary = launch.run_experiment(algorithm_cls, cfg, data, shards, progress=progress, resume=resume)
        except ConfigError:  # a check only the running backend can make: leave nothing behind
            if run_dir is not None:
                run_dir.release()
            raise
        except (KeyboardInterrupt, Interrupted, Exception) as err:
            sig = signal_behind(err)
            if sig is None:
                _write_stop(path, "failed", _first_line(err), prog)
                raise
            name = "SIGINT" if isinstance(sig, KeyboardInterrupt) else "SIGTERM"
            _write_stop(path, "interrupted", name, prog)
            log.warning("interrupted by %s; resume with: %s --resume %s", name, prog, path)
            if sig is err:
                raise
            raise type(sig)() from err
        final = summary.get("final") or {}
        metric = ("eval_perplexity" if final.get("eval_perplexity") is not None else "eval_accuracy")
        say(f"sfl_ray: done after {summary['rounds']} rounds ({summary['stop_reason']}); "
            f"{metric}={final.get(metric)} GiB={summary['totals']['gib']:.4f}")
        return summary
    finally:
        if started_ray:  # a Ray instance this run started ends with it (no agents left behind)
            import ray
            ray.shutdown()


def print_schema() -> None:
    """The config's JSON schema (pydantic's), on stdout."""
    import json

    from sfl_ray.config import ExperimentConfig
    print(json.dumps(ExperimentConfig.model_json_schema(), indent=2))


def main(argv: Optional[Sequence[str]] = None, prog: str = PROG) -> int:
    """The run command; returns the exit code. `prog`: how it was invoked (`sfl-ray run` or
    `python -m sfl_ray.run`), shown in help, errors and the resume hint."""
    args = parse_args(argv, prog)
    if args.print_schema:
        print_schema()
        return EXIT_OK
    if args.list_jobs:
        from sfl_ray.job_files import JOBS_DIR, shipped_jobs
        print(f"jobs shipped in {JOBS_DIR} (run one with: {prog} --config NAME):")
        for name in shipped_jobs():
            print(f"  {name}")
        return EXIT_OK
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import signal

    from sfl_ray.config import load_config
    from sfl_ray.config_base import ConfigError

    previous = signal.signal(signal.SIGTERM, _on_sigterm) if _main_thread() else None
    try:
        if args.resume:
            cfg, state = load_resume(args.resume, args.overrides, args.resume_round)
        else:
            cfg, state = load_config(args.config, args.overrides), None
        run_config(cfg, state, prog, echo=lambda line: print(line, flush=True))
        return EXIT_OK
    except ConfigError as err:
        print(str(err), file=sys.stderr)
        return EXIT_BAD_CONFIG
    except (KeyboardInterrupt, Interrupted, Exception) as err:  # noqa: BLE001 - reported, not raised
        sig = signal_behind(err)  # the run (if it started) has said how to resume
        if sig is not None:
            return EXIT_SIGINT if isinstance(sig, KeyboardInterrupt) else EXIT_SIGTERM
        return _failed(err)  # e.g. Ray would not start, a client failed: report, exit 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


class _CallableModule(types.ModuleType):
    """This module's class, so that `sfl_ray.run(...)` runs an experiment.

    `sfl_ray.run` is both this module (what `python -m sfl_ray.run` executes, and what `import
    sfl_ray.run` binds as the package's attribute `run`) and the Python API's entry point. A
    function named `run` in `sfl_ray/__init__.py` would be replaced by this module the moment
    anything imports the submodule, so the module itself is made callable instead: whatever the
    import order, `sfl_ray.run` is this module and calling it calls `sfl_ray.api.run`.
    """

    def __call__(self, config_or_path: Any, **overrides: Any) -> "Run":
        """Run one experiment in this process and return its `Run`: `sfl_ray.api.run`, which
        documents the arguments (a path, a shipped job's name, a dict or an ExperimentConfig;
        overrides as `train__lr=0.01` or `**{"train.lr": 0.01}`)."""
        from sfl_ray.api import run
        return run(config_or_path, **overrides)


sys.modules[__name__].__class__ = _CallableModule


if __name__ == "__main__":
    raise SystemExit(main())
