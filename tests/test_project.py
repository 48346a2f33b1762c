"""Project-level consistency: every config loads, pins agree between pyproject and environment.yaml."""

import re
from pathlib import Path

import tomllib
import yaml

from elbo_t2ialign import AlignOptions

ROOT = Path(__file__).resolve().parents[1]


def test_pins_agree():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = [d for group in deps["optional-dependencies"].values() for d in group]  # dev, crf, mmseg
    pinned = {re.split("==", d)[0].lower(): d for d in deps["dependencies"] + extras}
    env = yaml.safe_load((ROOT / "environment.yaml").read_text())
    pip = [p for p in env["dependencies"] if isinstance(p, dict)][0]["pip"]
    env_pins = {re.split("==", p)[0].lower(): p for p in pip if "==" in p}
    assert env_pins == pinned


def test_elbo_config_matches_options_defaults():
    cfg = yaml.safe_load((ROOT / "configs/elbo/default.yaml").read_text())
    assert AlignOptions.from_mapping(cfg) == AlignOptions()


def test_every_model_config_has_the_same_keys():
    for path in sorted((ROOT / "configs/model").glob("*.yaml")):
        cfg = yaml.safe_load(path.read_text())
        assert {"name", "id", "resolution", "max_sequence_length", "dtype"} <= set(cfg), path.name
        assert cfg["name"] == path.stem
