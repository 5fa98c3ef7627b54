"""One command: `sfl-ray run|compare|report|sweep`, each subcommand's help showing the command the
user typed; `--print-schema` and `--list-jobs`; shipped jobs found by name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
import types
from pathlib import Path

import pytest
import yaml

from sfl_ray import __version__, cli
from sfl_ray.config import ExperimentConfig, dump_config, load_config
from sfl_ray.job_files import JOBS_DIR, shipped_jobs

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--set", "cluster.backend=local", "--set", "stop.rounds=1", "--set", "stop.target_metric=null",
        "--set", "data.max_train_samples=200", "--set", "data.max_test_samples=100", "--set", "train.num_clients=2",
        "--set", "output.progress=false", "--set", "output.checkpoint_every=0"]


def _exit(fn, *args) -> int:
    try:
        return fn(*args)
    except SystemExit as e:  # argparse's --help and errors
        return int(e.code or 0)


def test_help_lists_every_subcommand_in_one_line_each(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: sfl-ray {run,compare,report,sweep}")
    for name in ("run", "compare", "report", "sweep"):
        (line,) = [ln for ln in out.splitlines() if ln.split()[:1] == [name]]
        assert len(line.split()) > 2  # a name and what it does
    assert cli.main([]) == 2 and "usage: sfl-ray" in capsys.readouterr().err  # no subcommand: bad input


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"sfl-ray {__version__}"


@pytest.mark.parametrize("sub, module", [("run", "sfl_ray.run"), ("compare", "sfl_ray.compare")])
def test_subcommand_help_shows_the_command_used(capsys, sub, module):
    import importlib

    assert _exit(cli.main, [sub, "--help"]) == 0
    assert capsys.readouterr().out.startswith(f"usage: sfl-ray {sub} ")
    assert _exit(importlib.import_module(module).main, ["--help"]) == 0
    assert capsys.readouterr().out.startswith(f"usage: python -m {module} ")


def test_argument_errors_name_the_command_in_one_line(capsys):
    assert _exit(cli.main, ["run", "--bogus"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sfl-ray run: ")
    assert cli.main(["nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'nope'" in err[0] and "run, compare, report, sweep" in err[0]


def test_run_dispatches_and_runs_a_shipped_job_by_name(tmp_path, capsys):
    assert cli.main(["run", "--config", "quickstart", *TINY, "--set", f"output.dir={tmp_path}"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "quickstart" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1] and 0 <= rows[0]["eval_accuracy"] <= 1
    assert cli.main(["run", "--config", "no_such_job"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no_such_job" in err[0] and "quickstart" in err[0]  # the shipped jobs are listed


def test_compare_dispatches_with_its_prog(monkeypatch):
    import sfl_ray.compare

    seen = []
    monkeypatch.setattr(sfl_ray.compare, "main", lambda argv, prog: seen.append((argv, prog)) or 0)
    assert cli.main(["compare", "--config", "compare_mnist", "--algorithms", "sl"]) == 0
    assert seen == [(["--config", "compare_mnist", "--algorithms", "sl"], "sfl-ray compare")]


def test_config_errors_from_any_subcommand_are_one_line(capsys):
    # compare validates its base config itself; a data error surfaces from inside its loop.
    code = cli.main(["compare", "--config", "quickstart", "--algorithms", "fedavg", *TINY,
                     "--set", "data.path=./no/such/folder"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.path='./no/such/folder'" in err[0]


@pytest.mark.parametrize("sub, module", [("report", "sfl_ray.report"), ("sweep", "sfl_ray.sweep")])
def test_report_and_sweep_are_wired_by_module_name(monkeypatch, sub, module):
    seen = []
    fake = types.ModuleType(module)
    fake.main = lambda argv: seen.append(argv) or 3  # a main without `prog` is called with argv alone
    monkeypatch.setitem(sys.modules, module, fake)
    assert cli.SUBCOMMANDS[sub][0] == module
    assert cli.main([sub, "a", "--b"]) == 3 and seen == [["a", "--b"]]


def test_a_subcommand_whose_module_is_absent_is_one_line_exit_2(monkeypatch, capsys):
    monkeypatch.setitem(cli.SUBCOMMANDS, "later", ("sfl_ray.no_such_module", "not written yet"))
    assert cli.main(["later"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["sfl-ray later: not available in this installation (sfl_ray.no_such_module is missing)"]


def test_console_script_is_the_cli():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"sfl-ray": "sfl_ray.cli:main"}


def test_print_schema_is_pydantics_and_validates_every_shipped_job(capsys):
    jsonschema = pytest.importorskip("jsonschema")

    assert cli.main(["run", "--print-schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema == ExperimentConfig.model_json_schema()
    for job in shipped_jobs():
        jsonschema.validate(yaml.safe_load(dump_config(load_config(job))), schema)
    with pytest.raises(jsonschema.ValidationError):  # the schema says what the loader says
        jsonschema.validate({"train": {"lr": -1}}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"trian": {}}, schema)


def test_list_jobs_names_every_shipped_job(capsys):
    assert cli.main(["run", "--list-jobs"]) == 0
    listed = [ln.strip() for ln in capsys.readouterr().out.splitlines()[1:]]
    assert listed == sorted(p.stem for p in JOBS_DIR.glob("*.yaml")) and "quickstart" in listed


def test_jobs_are_package_data_and_the_repository_jobs_folder_is_them():
    assert (ROOT / "jobs").is_symlink() and (ROOT / "jobs").resolve() == JOBS_DIR
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["sfl_ray"]
    assert "jobs/*.yaml" in data


@pytest.mark.parametrize("given", ["quickstart", "quickstart.yaml", "jobs/quickstart.yaml"])
def test_a_shipped_job_is_found_by_name_from_any_folder(tmp_path, monkeypatch, given):
    monkeypatch.chdir(tmp_path)  # no jobs/ here
    assert load_config(given).output.name == "quickstart"
    (tmp_path / "quickstart.yaml").write_text("train:\n  lr: 0.5\n")  # a file of that name wins
    assert load_config("quickstart.yaml").train.lr == 0.5


@pytest.mark.parametrize("prog, shown", [("sfl-ray run", "sfl-ray run --resume"),
                                         ("python -m sfl_ray.run", "python -m sfl_ray.run --resume")])
def test_the_resume_hint_is_the_command_that_was_used(tmp_path, monkeypatch, caplog, prog, shown):
    import sfl_ray.runtime.launch as launch
    from sfl_ray.run import main

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(launch, "run_experiment", interrupted)
    assert main(["--config", "quickstart", *TINY, "--set", f"output.dir={tmp_path}"], prog=prog) == 130
    hints = [r.getMessage() for r in caplog.records if "resume with" in r.getMessage()]
    assert hints == [f"interrupted by SIGINT; resume with: {shown} {tmp_path}/quickstart"]


def test_python_m_sfl_ray_run_keeps_working_without_a_runpy_warning():
    """`python -m sfl_ray.run` (what `ray job submit` runs): help names it, and importing the
    package first does not import the module twice (runpy would warn)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", "sfl_ray.run", "--list-jobs"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "run one with: python -m sfl_ray.run --config NAME" in out.stdout and "quickstart" in out.stdout


def test_ray_working_dir_upload_carries_the_jobs_symlink_as_files(tmp_path):
    """`ray job submit --working-dir .` zips the repository; the `jobs` symlink must arrive as the
    job files themselves (the job then reads jobs/quickstart.yaml from its copy)."""
    import zipfile

    packaging = pytest.importorskip("ray._private.runtime_env.packaging")
    out = tmp_path / "wd.zip"
    packaging._zip_files(str(ROOT), [".git", "runs", "tests", "bench", "cluster", "sfl_ray"], str(out),
                         include_parent_dir=False, include_gitignore=True)
    with zipfile.ZipFile(out) as z:
        shipped = {n: z.read(n) for n in z.namelist() if n.startswith("jobs/")}
    assert shipped == {f"jobs/{p.name}": p.read_bytes() for p in JOBS_DIR.glob("*.yaml")}
