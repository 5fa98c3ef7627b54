"""Every shipped job validates, and so do the reduced-size `--set` lines in its header (the
commands the README points users to on a laptop)."""

import re
from pathlib import Path

import pytest
import yaml

from sfl_ray.config import load_config

JOBS = sorted(Path(__file__).resolve().parent.parent.glob("jobs/*.yaml"))


def header_overrides(path: Path) -> list[str]:
    """The `--set` items of the header's reduced command: comment lines that start with `--set`."""
    out = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        if line.lstrip("# ").startswith("--set"):
            out += re.findall(r"--set\s+(\S+=\S+)", line)
    return out


@pytest.mark.parametrize("job", JOBS, ids=[j.stem for j in JOBS])
def test_job_and_its_reduced_command_validate(job):
    cfg = load_config(str(job), [])
    overrides = header_overrides(job)
    reduced = load_config(str(job), overrides)
    for item in overrides:
        key, value = item.split("=", 1)
        node = reduced
        for part in key.split("."):
            node = getattr(node, part)
        assert node == yaml.safe_load(value), (key, node, value)
    assert cfg.output.name == reduced.output.name


@pytest.mark.parametrize("job", [j for j in JOBS if header_overrides(j)], ids=lambda j: j.stem)
def test_reduced_commands_fit_a_two_core_cpu_machine(job):
    c = load_config(str(job), header_overrides(job)).cluster
    assert c.server_gpus == 0 and c.client_gpus == 0
    assert (c.num_pools or 1) * c.pool_cpus + c.num_servers * c.server_cpus <= 2
