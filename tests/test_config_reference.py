"""The README's config reference is generated from the pydantic config, and says every key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import Field

from sfl_ray.algorithms import algorithm_names
from sfl_ray.config import dump_config, load_config
from sfl_ray.config_base import Section
from sfl_ray.config_reference import BEGIN, END, _rows, main, reference, rewrite

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_holds_the_generated_reference():
    text = README.read_text(encoding="utf-8")
    assert text.count(BEGIN) == 1 and text.count(END) == 1
    assert rewrite(text) == text, "run: python -m sfl_ray.config_reference --write README.md"


def _keys(node: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in node.items():
        out.append(prefix + k)
        if isinstance(v, dict):
            out += _keys(v, prefix + k + ".")
    return out


@pytest.mark.parametrize("algorithm", algorithm_names())
def test_every_key_of_every_algorithm_is_in_the_reference(algorithm):
    ref = reference()
    cfg = load_config(None, [f"algorithm.name={algorithm}", "model.lora={}", "stop.target_metric.value=0.9"])
    raw = yaml.safe_load(dump_config(cfg))
    sections = {k for k, v in raw.items() if isinstance(v, dict)}  # headings, not rows
    keys = [k for k in _keys(raw) if k not in sections and k != "algorithm.name"]
    missing = [k for k in keys if f"| `{k}` |" not in ref]
    assert not missing and len(keys) > 80
    assert f"#### `algorithm.name: {algorithm}`" in ref


def test_defaults_are_the_sections_own():
    ref = reference()
    # CSE-FSL's aux defaults to linear although the aux class defaults to auto (Ampere's).
    cse = ref.split("#### `algorithm.name: cse_fsl`")[1].split("####")[0]
    ampere = ref.split("#### `algorithm.name: ampere`")[1].split("###")[0]
    assert "| `algorithm.aux.kind` | `linear` |" in cse and "| `algorithm.aux.kind` | `auto` |" in ampere
    assert "| `train.clients_per_round` | `1.0` | int or float > 0 |" in ref


def test_a_key_without_a_description_is_refused():
    class Undocumented(Section):
        fine: int = Field(1, description="Documented.")
        bare: int = 2

    with pytest.raises(ValueError, match="Undocumented.bare has no Field"):
        _rows(Undocumented, "x.", None)


def test_check_and_write(tmp_path, capsys):
    stale = tmp_path / "README.md"
    stale.write_text(f"# title\n\n{BEGIN}\n| old | table |\n{END}\n\nafter\n", encoding="utf-8")
    assert main(["--check", str(stale)]) == 1
    assert "out of date" in capsys.readouterr().err
    assert main(["--write", str(stale)]) == 0
    text = stale.read_text(encoding="utf-8")
    assert main(["--check", str(stale)]) == 0 and "| old |" not in text
    assert text.startswith("# title\n\n") and text.endswith(f"{END}\n\nafter\n") and reference() in text
