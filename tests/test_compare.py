"""The comparison command runs every named algorithm on one job and writes one table."""

import json

from sfl_ray.compare import main


def test_compare_writes_one_row_per_algorithm(tmp_path, capsys):
    code = main(["--config", "jobs/quickstart.yaml", "--algorithms", "fedavg,cse_fsl",
                 "--set", "cluster.backend=local", "--set", "stop.rounds=1", "--set", "stop.target_metric=null",
                 "--set", "data.max_train_samples=400", "--set", "train.num_clients=4",
                 "--set", f"output.dir={tmp_path}", "--set", "output.progress=false",
                 "--algo-set", "cse_fsl:algorithm.upload_every=2"])
    assert code == 0
    table = (tmp_path / "quickstart" / "compare.md").read_text()
    assert [line.split("|")[1].strip() for line in table.splitlines()[2:]] == ["fedavg", "cse_fsl"]
    results = json.loads((tmp_path / "quickstart" / "compare.json").read_text())
    assert results[0]["totals"]["bytes"] > 0 and results[1]["totals"]["bytes"] < results[0]["totals"]["bytes"]
    assert (tmp_path / "quickstart" / "cse_fsl" / "metrics.jsonl").exists()
    assert "upload_every: 2" in (tmp_path / "quickstart" / "cse_fsl" / "config.yaml").read_text()
    assert main(["--config", "jobs/quickstart.yaml", "--algorithms", "nope"]) == 2


def test_compare_seeds_must_be_positive(capsys):
    assert main(["--config", "jobs/quickstart.yaml", "--seeds", "0"]) == 2
    assert capsys.readouterr().err.strip() == "config error: --seeds=0: at least 1"
