"""Project-level consistency: every config loads, pins agree between pyproject and environment.yaml."""

import re
import tomllib
from pathlib import Path

import yaml

from elbo_t2ialign import AlignOptions

ROOT = Path(__file__).resolve().parents[1]


def _pins(lines) -> dict[str, str]:
    """name (normalised) -> version of every `name==version` line."""
    out = {}
    for line in lines:
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            out[re.sub(r"[-_.]+", "-", name.strip().lower())] = version.strip()
    return out


def _ranges() -> dict[str, str]:
    """name -> specifier of every dependency and extra in pyproject.toml."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"] + [d for group in project["optional-dependencies"].values() for d in group]
    out = {}
    for dep in deps:
        name, spec = re.match(r"([A-Za-z0-9_.-]+)(.*)", dep).groups()
        out[re.sub(r"[-_.]+", "-", name.lower())] = spec.strip()
    return out


def _lower_bound(spec: str) -> str | None:
    match = re.search(r"(?:>=|==)\s*([0-9][^,\s]*)", spec)
    return match.group(1) if match else None


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.match(r"\d+(?:\.\d+)*", version).group(0).split("."))


# the quantization extras (model.quantization): declared with the ranges their diffusers configs
# need, but not installed in the tested set (no GPU here), so neither pinned nor locked
UNTESTED_EXTRAS = {"bitsandbytes", "torchao", "optimum-quanto"}


def test_environment_yaml_pins_the_locked_versions():
    env = yaml.safe_load((ROOT / "environment.yaml").read_text())
    pip = [p for p in env["dependencies"] if isinstance(p, dict)][0]["pip"]
    pinned = _pins(pip)
    locked = _pins((ROOT / "requirements/current.txt").read_text().splitlines())
    assert set(pinned) == set(_ranges()) - UNTESTED_EXTRAS  # every dependency and tested extra
    assert {name: locked.get(name) for name in pinned} == pinned


def test_ranges_start_at_the_floor_and_admit_the_locked_set():
    ranges = _ranges()
    floor = _pins((ROOT / "requirements/floor.txt").read_text().splitlines())
    locked = _pins((ROOT / "requirements/current.txt").read_text().splitlines())
    runtime = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in runtime:
        name = re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.-]+", dep).group(0).lower())
        if name != "torch":  # the floor environment's torch is the local build; 2.5.1 was run by hand
            assert _lower_bound(ranges[name]) == floor[name], name
    for name, spec in ranges.items():
        if name in UNTESTED_EXTRAS:
            continue
        bound = _lower_bound(spec)
        assert bound and _release(locked[name]) >= _release(bound), (name, spec, locked[name])
        upper = re.search(r"<\s*([0-9][^,\s]*)", spec)
        assert not upper or _release(locked[name]) < _release(upper.group(1)), (name, spec)


def test_elbo_config_matches_options_defaults():
    cfg = yaml.safe_load((ROOT / "configs/elbo/default.yaml").read_text())
    assert AlignOptions.from_mapping(cfg) == AlignOptions()


def test_every_model_config_has_the_same_keys():
    for path in sorted((ROOT / "configs/model").glob("*.yaml")):
        cfg = yaml.safe_load(path.read_text())
        assert {"name", "id", "resolution", "max_sequence_length", "dtype"} <= set(cfg), path.name
        assert cfg["name"] == path.stem
