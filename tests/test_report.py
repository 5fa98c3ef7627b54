"""Results loaded back, the report (tables, plots, HTML), TensorBoard and MLflow, from real runs:
two algorithms x two seeds made once by `compare --seeds 2` on the local backend. Every number
the report shows is checked against values computed here straight from metrics.jsonl."""

from __future__ import annotations

import json
import math
import os
import statistics
import struct
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import sfl_ray  # noqa: E402
from sfl_ray.compare import main as compare_main  # noqa: E402
from sfl_ray.report import main as report_main, write_report  # noqa: E402
from sfl_ray.report.style import ALGORITHM_COLORS, algorithm_colors  # noqa: E402
from sfl_ray.run import main as run_main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GIB, MIB = 1024 ** 3, 1024 ** 2
TINY = ["--set", "cluster.backend=local", "--set", "data.max_train_samples=600", "--set", "data.max_test_samples=200",
        "--set", "train.num_clients=4", "--set", "train.clients_per_round=3", "--set", "train.batch_size=50",
        "--set", "stop.target_metric=null", "--set", "output.progress=false"]
ALGORITHMS = ["fedavg", "cse_fsl"]


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def compared(tmp_path_factory) -> Path:
    """fedavg and cse_fsl, seeds 0 and 1, 3 rounds, with TensorBoard and MLflow on; device memory
    tracked in some rounds only (null in the others)."""
    tmp = tmp_path_factory.mktemp("compare")
    code = compare_main(["--config", "jobs/quickstart.yaml", "--algorithms", ",".join(ALGORITHMS), "--seeds", "2",
                         *TINY, "--set", "stop.rounds=3", "--set", "metrics.memory_every=2",  # not every round
                         "--set", f"output.dir={tmp}", "--set", "output.name=cmp",
                         "--set", "output.tensorboard=true", "--set", f"output.mlflow_uri=file:{tmp}/mlruns"])
    assert code == 0
    return tmp / "cmp"


def _expected(run: Path) -> dict:
    """A run's table values, computed here from its files alone."""
    rows = _rows(run)
    evals = [r["eval_accuracy"] for r in rows if r["eval_accuracy"] is not None]
    return {"final_metric": evals[-1], "best_metric": max(evals), "rounds": rows[-1]["round"],
            "gib_up": sum(r["bytes_up"] for r in rows) / GIB, "gib_down": sum(r["bytes_down"] for r in rows) / GIB,
            "device_flops": sum(r["device_flops"] for r in rows),
            "device_peak_mem_bytes": max(r["device_peak_mem_bytes"] for r in rows if r["device_peak_mem_bytes"] is not None),
            "wall_s": sum(r["wall_s"] for r in rows), "sim_s": rows[-1]["sim_cum_s"]}


def _md_table(md: str, first_header: str) -> list[list[str]]:
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    out = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        out.append([c.strip() for c in line.strip().strip("|").split("|")])
    return out


def _cell_numbers(cell: str) -> tuple[float, float | None]:
    mean, _, std = cell.partition(" ± ")
    return float(mean), (float(std) if std else None)


def test_report_tables_equal_the_metrics_files(compared):
    # compare wrote the report into its root; the table there is the one checked
    report = json.loads((compared / "report.json").read_text())
    assert report["metric"] == "eval_accuracy" and report["target"]["value"] is not None
    md = (compared / "report.md").read_text()
    table = _md_table(md, "group")
    assert table[0] == report["group_table"]["headers"]
    assert [row[0] for row in table[2:]] == ALGORITHMS  # one row per group, registry order
    for group, row in zip(report["groups"], table[2:]):
        runs = [compared / group["algorithm"] / f"s{seed}" for seed in (0, 1)]
        assert group["runs"] == [f"{group['algorithm']}/s0", f"{group['algorithm']}/s1"] and row[1] == "2"
        expected = [_expected(r) for r in runs]
        for key, col in group["columns"].items():
            if key == "gib_to_target":
                continue
            values = [e[key] for e in expected]
            assert col["values"] == pytest.approx(values, rel=1e-12), key
            assert col["mean"] == pytest.approx(statistics.mean(values), rel=1e-12), key
            assert col["std"] == pytest.approx(statistics.stdev(values), rel=1e-9, abs=1e-15), key
            cell = row[2 + list(group["columns"]).index(key)]
            assert cell == col["cell"], key
            mean, std = _cell_numbers(cell)
            assert mean == pytest.approx(col["mean"] / col["scale"], rel=5e-4), key
            if len(set(values)) > 1:  # std shown exactly where the seeds differ
                assert std == pytest.approx(col["std"] / col["scale"], rel=5e-2), key
            else:
                assert std is None, key
        # the same numbers as the runs' own summary.json
        for r, e in zip(runs, expected):
            totals = json.loads((r / "summary.json").read_text())["totals"]
            assert totals["device_flops"] == e["device_flops"] and totals["sim_s"] == pytest.approx(e["sim_s"])
        # GiB to target: the first evaluated round at or above the target, else "not reached"
        target = report["target"]["value"]
        reach = []
        for r in runs:
            hit = [x["bytes_cum"] / GIB for x in _rows(r) if (x["eval_accuracy"] or -1) >= target]
            reach.append(hit[0] if hit else None)
        assert group["columns"]["gib_to_target"]["values"] == reach
    # the seeds differ: the accuracy shows a std (no run was given the same numbers twice)
    assert any(" ± " in row[2] for row in table[2:])


def test_the_target_decides_what_is_reached(compared, tmp_path):
    runs = [compared / a / f"s{s}" for a in ALGORITHMS for s in (0, 1)]
    first = min(x["eval_accuracy"] for r in runs for x in _rows(r))
    write_report([compared], tmp_path, target=first)  # every run reaches its own first accuracy or more
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["target"] == {"value": first, "source": "given with --target"}
    for g in report["groups"]:
        col = g["columns"]["gib_to_target"]
        assert None not in col["values"] and "reached" not in col["cell"]
    write_report([compared], tmp_path, target=1.01)
    cells = [g["columns"]["gib_to_target"]["cell"] for g in json.loads((tmp_path / "report.json").read_text())["groups"]]
    assert cells == ["not reached", "not reached"]


def _colours(png: Path) -> set[tuple[int, int, int]]:
    from PIL import Image

    with Image.open(png) as im:
        return {c[:3] for _, c in im.convert("RGB").getcolors(maxcolors=1 << 20)}


def _rgb(hex_colour: str) -> tuple[int, int, int]:
    return tuple(int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))


def test_plots_exist_with_each_algorithms_colour_in_every_plot(compared):
    report = json.loads((compared / "report.json").read_text())
    files = {p["file"] for p in report["plots"]}
    assert files == {"plots/metric_vs_gib.png", "plots/metric_vs_round.png", "plots/metric_vs_sim_time.png",
                     "plots/device_cost.png"}  # no alpha plot: the runs share one alpha
    for f in files:
        png = compared / f
        assert png.stat().st_size > 20_000, f
        colours = _colours(png)
        assert len(colours) > 20, f  # lines, bands, text: not a blank canvas
        for algorithm in ALGORITHMS:  # the same colour for an algorithm in every plot
            assert _rgb(ALGORITHM_COLORS[algorithm]) in colours, (f, algorithm)
    md = (compared / "report.md").read_text()
    assert all(f"]({f})" in md for f in files)
    html = (compared / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(files)
    assert "<link" not in html and "<script" not in html and "http" not in html.replace("http-equiv", "")


def test_load_runs_frames(compared):
    runs = sfl_ray.load_runs([compared])
    names = [f"{a}/s{s}" for a in sorted(ALGORITHMS) for s in (0, 1)]
    assert runs.names == names and len(runs) == 4
    assert list(runs.summary["run"]) == names and list(runs.config.index) == names
    assert list(runs.summary["algorithm"]) == ["cse_fsl", "cse_fsl", "fedavg", "fedavg"]
    assert list(runs.summary["seed"]) == [0, 1, 0, 1]
    assert (runs.summary["status"] == "finished").all()
    n_rows = {n: len(_rows(compared / n)) for n in names}
    assert len(runs.rows) == sum(n_rows.values())
    assert list(runs.rows.columns[:3]) == ["run", "algorithm", "seed"]
    for n in names:
        mine = runs.rows[runs.rows["run"] == n]
        assert list(mine["eval_accuracy"]) == [r["eval_accuracy"] for r in _rows(compared / n)]
        assert list(mine["bytes_cum"]) == [r["bytes_cum"] for r in _rows(compared / n)]
        s = runs.summary.set_index("run").loc[n]
        assert s["final_metric"] == _rows(compared / n)[-1]["eval_accuracy"]
        assert s["gib"] == json.loads((compared / n / "summary.json").read_text())["totals"]["gib"]
    # the config: one row per run; seed and output.* never count as differences
    assert runs.config.loc["fedavg/s1", "seed"] == 1 and runs.config.loc["fedavg/s1", "train.lr"] == 0.05
    assert "seed" not in runs.varying and not any(k.startswith("output.") for k in runs.varying)
    assert "algorithm.upload_every" in runs.varying  # cse_fsl's own key, absent for fedavg
    one = sfl_ray.load_run(compared / "fedavg" / "s0")
    assert one.config["algorithm"]["name"] == "fedavg" and one.flat_config["partition.alpha"] == 0.5
    assert len(one.rows) == 3 and one.summary["stop_reason"] == "rounds" and one.status == "finished"


def test_nothing_found_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: no run directory"):
        sfl_ray.load_runs([tmp_path / "empty"])
    assert report_main([str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sfl-ray report: ") and "empty" in err
    assert report_main([str(tmp_path / "missing")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    assert report_main([str(tmp_path), "--target", "x"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def _events(folder: Path) -> list:
    """Every event in the TensorBoard files of `folder` (the TFRecord framing, read by hand)."""
    from tensorboardX.proto import event_pb2

    out = []
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, i = path.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            ev = event_pb2.Event()
            ev.ParseFromString(data[i + 12:i + 12 + n])
            out.append(ev)
            i += 12 + n + 4
    return out


def _tb_scalars(folder: Path) -> dict[tuple[str, int], float]:
    """(tag, step) -> value, as TensorBoard shows it: a purge_step drops earlier events at or after it."""
    seen: dict[tuple[str, int], float] = {}
    for ev in _events(folder):
        if ev.HasField("session_log") and ev.step > 0:  # a resumed writer: purge_step
            seen = {k: v for k, v in seen.items() if k[1] < ev.step}
        for v in ev.summary.value:
            seen[(v.tag, ev.step)] = v.simple_value
    return seen


def _numbers(row: dict) -> dict[str, float]:
    out = {}
    for k, v in row.items():
        if isinstance(v, dict):
            out.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and k != "round":
            out[k] = v
    return out


def test_tensorboard_events_equal_the_metrics_rows(compared):
    import numpy as np

    run = compared / "cse_fsl" / "s1"
    scalars = _tb_scalars(run / "tensorboard")
    expected = {(k, r["round"]): v for r in _rows(run) for k, v in _numbers(r).items()}
    assert set(scalars) == set(expected)  # nulls are left out, not logged as 0
    for key, v in expected.items():
        assert scalars[key] == pytest.approx(float(np.float32(v)), rel=1e-6), key  # TB keeps float32
    assert ("eval_accuracy", 3) in scalars and ("bytes_by_kind.up/activations", 1) in scalars
    unmeasured = [r["round"] for r in _rows(run) if r["device_peak_mem_bytes"] is None]
    assert unmeasured and all(("device_peak_mem_bytes", n) not in scalars for n in unmeasured)  # null: not 0


def _mlflow_run(uri: str, run_dir: Path):
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    ids = json.loads((run_dir / "mlflow.json").read_text())
    client = MlflowClient(tracking_uri=uri)
    return client, client.get_run(ids["run_id"])


def test_mlflow_metrics_params_and_summary_read_back(compared):
    run = compared / "fedavg" / "s0"
    client, ml = _mlflow_run(f"file:{compared.parent}/mlruns", run)
    assert ml.info.run_name == "s0" and ml.info.status == "FINISHED"
    assert ml.data.params["train.lr"] == "0.05" and ml.data.params["algorithm.name"] == "fedavg"
    assert ml.data.params["seed"] == "0"
    rows = _rows(run)
    for key in ("eval_accuracy", "bytes_cum", "train_loss", "device_flops"):
        history = sorted((m.step, m.value) for m in client.get_metric_history(ml.info.run_id, key))
        assert history == [(r["round"], pytest.approx(r[key], rel=1e-12)) for r in rows], key
    totals = json.loads((run / "summary.json").read_text())["totals"]
    assert ml.data.metrics["summary.gib"] == pytest.approx(totals["gib"], rel=1e-12)
    assert ml.data.tags["sfl_ray.stop_reason"] == "rounds"


def test_mlflow_uri_without_mlflow_is_a_config_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed
    code = run_main(["--config", "jobs/quickstart.yaml", *TINY, "--set", f"output.dir={tmp_path}",
                     "--set", f"output.mlflow_uri=file:{tmp_path}/mlruns"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'pip install "sfl_ray[mlflow]"' in err and "output.mlflow_uri" in err
    assert not any(tmp_path.iterdir())


def test_a_failed_run_is_reported_marked_and_resumes_without_duplicate_steps(tmp_path, monkeypatch):
    """A NaN test loss in round 2: the run fails (exit 1) after writing that row, and the report
    shows the NaN and marks the run; resumed from the round-1 checkpoint with TensorBoard and
    MLflow on, both end with metrics.jsonl's values, round 2's NaN replaced."""
    from sfl_ray.metrics.evaluate import Evaluator

    real, calls = Evaluator.evaluate, []

    def diverge(self, *weights):
        calls.append(1)
        out = real(self, *weights)
        return {**out, "eval_accuracy": float("nan"), "eval_loss": float("nan")} if len(calls) == 2 else out

    monkeypatch.setattr(Evaluator, "evaluate", diverge)
    uri = f"file:{tmp_path}/mlruns"
    args = ["--config", "jobs/quickstart.yaml", *TINY, "--set", "stop.rounds=3", "--set", f"output.dir={tmp_path}",
            "--set", "output.name=run", "--set", "output.tensorboard=true", "--set", f"output.mlflow_uri={uri}"]
    assert run_main(args) == 1
    run = tmp_path / "run"
    assert [r["eval_accuracy"] for r in _rows(run)][1] == "NaN"
    out = tmp_path / "report"
    write_report([run], out)
    report = json.loads((out / "report.json").read_text())
    assert report["runs"][0]["status"] == "failed" and "round 2" in report["runs"][0]["error"]
    cols = report["groups"][0]["columns"]
    assert cols["final_metric"]["cell"] == "NaN" and cols["best_metric"]["cell"] == "NaN"  # not hidden
    md = (out / "report.md").read_text()
    assert "⚠ 1 of 1 failed" in md and "run (failed)" in md
    assert math.isnan(sfl_ray.load_run(run).rows["eval_accuracy"].iloc[-1])
    client, ml = _mlflow_run(uri, run)
    assert ml.info.status == "FAILED"

    monkeypatch.setattr(Evaluator, "evaluate", real)
    assert run_main(["--resume", str(run)]) == 0
    rows = _rows(run)
    assert [r["round"] for r in rows] == [1, 2, 3] and all(isinstance(r["eval_accuracy"], float) for r in rows)
    scalars = _tb_scalars(run / "tensorboard")
    assert {step for tag, step in scalars if tag == "eval_accuracy"} == {1, 2, 3}
    for r in rows:
        assert scalars[("eval_accuracy", r["round"])] == pytest.approx(r["eval_accuracy"], rel=1e-6)
    client, ml = _mlflow_run(uri, run)
    assert ml.info.status == "FINISHED"
    history = client.get_metric_history(ml.info.run_id, "eval_accuracy")
    last = {}
    for m in sorted(history, key=lambda m: m.timestamp):  # MLflow keeps round 2's NaN too; the last wins
        last[m.step] = m.value
    assert last == {r["round"]: pytest.approx(r["eval_accuracy"], rel=1e-12) for r in rows}
    write_report([run], out)
    assert json.loads((out / "report.json").read_text())["runs"][0]["status"] == "finished"


def test_alpha_plot_only_when_alphas_differ_and_labels_say_alpha(tmp_path):
    for alpha in ("0.1", "1.0"):
        assert run_main(["--config", "jobs/quickstart.yaml", *TINY, "--set", "stop.rounds=1",
                         "--set", "algorithm.name=fedavg", "--set", f"partition.alpha={alpha}",
                         "--set", f"output.dir={tmp_path}/runs", "--set", f"output.name=a{alpha}"]) == 0
    write_report([tmp_path / "runs"], tmp_path / "out")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [g["label"] for g in report["groups"]] == ["fedavg α=0.1", "fedavg α=1"]
    assert "plots/metric_vs_alpha.png" in {p["file"] for p in report["plots"]}
    png = tmp_path / "out" / "plots" / "metric_vs_alpha.png"
    assert png.stat().st_size > 20_000 and _rgb(ALGORITHM_COLORS["fedavg"]) in _colours(png)
    finals = [_rows(tmp_path / "runs" / f"a{a}")[-1]["eval_accuracy"] for a in ("0.1", "1.0")]
    assert [g["columns"]["final_metric"]["mean"] for g in report["groups"]] == finals


def test_measure_off_skips_the_plots_it_cannot_draw_and_says_so(tmp_path):
    assert run_main(["--config", "jobs/quickstart.yaml", *TINY, "--set", "stop.rounds=1", "--set", "metrics.measure=off",
                     "--set", f"output.dir={tmp_path}", "--set", "output.name=unmeasured"]) == 0
    write_report([tmp_path / "unmeasured"], tmp_path / "out")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert {p["file"] for p in report["plots"]} == {"plots/metric_vs_gib.png", "plots/metric_vs_round.png"}
    assert any("simulated time" in n and "measure=off" in n for n in report["notes"])
    assert any("FLOPs" in n and "measure=off" in n for n in report["notes"])
    cols = report["groups"][0]["columns"]
    assert cols["device_flops"]["values"] == [None] and cols["device_flops"]["cell"] == "-"  # not 0
    assert cols["sim_s"]["cell"] == "-"


def test_language_model_perplexity_lower_is_better(tmp_path):
    e2e = ["--set", "data.name=e2e", "--set", "model.name=gpt2", "--set", "model.cut=block1",
           "--set", "model.transformer.n_layer=2", "--set", "model.transformer.n_embd=16",
           "--set", "model.transformer.n_head=2", "--set", "data.max_train_samples=20",
           "--set", "data.max_test_samples=10", "--set", "partition.name=iid", "--set", "train.num_clients=2",
           "--set", "train.clients_per_round=2"]
    assert run_main(["--config", "jobs/quickstart.yaml", *TINY, *e2e, "--set", "stop.rounds=2",
                     "--set", f"output.dir={tmp_path}", "--set", "output.name=lm"]) == 0
    rows = _rows(tmp_path / "lm")
    ppl = [r["eval_perplexity"] for r in rows]
    write_report([tmp_path / "lm"], tmp_path / "out")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["metric"] == "eval_perplexity" and report["higher_is_better"] is False
    cols = report["groups"][0]["columns"]
    assert cols["best_metric"]["values"] == [min(ppl)] and cols["final_metric"]["values"] == [ppl[-1]]
    assert report["target"]["value"] == pytest.approx(1.1 * ppl[-1])  # default: 10% above the best final
    hit = [r["bytes_cum"] / GIB for r in rows if r["eval_perplexity"] <= report["target"]["value"]]
    assert cols["gib_to_target"]["values"] == [hit[0]]
    assert "perplexity" in report["group_table"]["headers"][2]


def test_plug_in_algorithms_get_stable_distinct_colours():
    a = algorithm_colors(["fedavg", "my_algo", "other_algo"])
    b = algorithm_colors(["other_algo", "my_algo"])
    assert a["my_algo"] == b["my_algo"] and a["other_algo"] == b["other_algo"]
    assert len(set(a.values())) == 3 and a["my_algo"] not in ALGORITHM_COLORS.values()


@pytest.mark.slow
def test_python_m_sfl_ray_report(compared, tmp_path):
    done = subprocess.run([sys.executable, "-m", "sfl_ray.report", str(compared), "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "report.md").read_text() == (compared / "report.md").read_text()
