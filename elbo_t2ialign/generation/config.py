"""Generation config: known keys, values, what a resumed run must keep, and the prompt file.

Hydra's struct mode already rejects unknown command-line keys; `validate` gives configs built in code
(tests, notebooks) the same guarantee, with messages that name the offending keys.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from elbo_t2ialign.cli import check_device, check_integer, check_known
from elbo_t2ialign.core import placement as placing

# What determines the files of a run folder; a resume must not change these.
RESULT_KEYS = (
    "model",
    "prompts",
    "phrases",
    "steps",
    "steps_rule",
    "guidance",
    "strength",
    "elbo_steps",
    "after_elbo_steps",
    "prompt_syntax",
    "seed",
)
# keys that change how a run goes, not what it writes
RUN_KEYS = {
    "num_prompts",
    "images_per_prompt",
    "baseline",
    "device",
    "datasets_dir",
    "progress",
    "output_dir",
}
TOP_KEYS = {*RESULT_KEYS, *RUN_KEYS, "hydra"}
# model keys; the placement ones (placement, offload_type, ...: core/placement.py) change no number
MODEL_KEYS = {"name", "id", "resolution", "max_sequence_length", "dtype", *placing.MODEL_KEYS}
PROMPTS_KEYS = {"name", "file"}
PHRASES_KEYS = {"spacy_model", "stopwords", "match", "dedupe"}
BUNDLED_PROMPTS = Path(__file__).resolve().parent / "prompts"
TINY_PREFIX = "tiny:"  # model.id "tiny:<family>" builds elbo_t2ialign.devtools.tiny.BUILDERS[<family>]()


class GenerationError(Exception):
    """A problem the user can fix (config, prompt file, run folder); printed without a traceback."""


def _unknown(section: str, got: set[str], known: set[str]) -> None:
    check_known(section, got, known, GenerationError)


def validate(cfg: dict[str, Any]) -> dict[str, Any]:
    """Check keys and values of a resolved config; return it with defaults filled in."""
    _unknown("the generation config", set(cfg), TOP_KEYS)
    for key, known in (("model", MODEL_KEYS), ("prompts", PROMPTS_KEYS), ("phrases", PHRASES_KEYS)):
        if not isinstance(cfg.get(key), dict):
            raise GenerationError(f"config needs a '{key}' section (e.g. {key}=...)")
        _unknown(key, set(cfg[key]), known)
    for key in ("name", "id"):
        if not cfg["model"].get(key):
            raise GenerationError(f"model config needs '{key}'")
    try:
        placing.check_model_keys(cfg["model"])
    except placing.PlacementError as err:
        raise GenerationError(str(err)) from None
    if not cfg["prompts"].get("file"):
        raise GenerationError(
            "prompts config needs 'file' (e.g. prompts=ane, or prompts.file=/path/to/file.txt)"
        )
    out = {
        "steps": 50,
        "steps_rule": "stride",
        "guidance": None,
        "strength": 1.2,
        "elbo_steps": 50,
        "after_elbo_steps": "reset",
        "prompt_syntax": "plain",
        "seed": 4307,
        "num_prompts": None,
        "images_per_prompt": 1,
        "baseline": True,
        "device": "auto",
        "datasets_dir": "datasets",
        "progress": True,
        **cfg,
    }
    for key in ("steps", "images_per_prompt"):
        check_integer(key, out[key], 1, GenerationError)
    check_integer("elbo_steps", out["elbo_steps"], 0, GenerationError)
    check_integer("seed", out["seed"], 0, GenerationError)
    check_integer("num_prompts", out["num_prompts"], 1, GenerationError, none="all")
    for key, low in (("strength", "> 0"), ("guidance", ">= 0")):
        value = out[key]
        if key == "guidance" and value is None:
            continue
        if (
            not isinstance(value, (int, float))
            or isinstance(value, bool)
            or not math.isfinite(value)
            or (value <= 0 if key == "strength" else value < 0)
        ):
            raise GenerationError(f"{key} must be a finite number {low}, got {value!r}")
    if out["steps_rule"] not in ("stride", "exact"):
        raise GenerationError(
            f"steps_rule must be 'stride' (the reference's stride 1000 // steps down from 999: 8 steps "
            f"for 7) or 'exact' (exactly `steps` steps), got {out['steps_rule']!r}"
        )
    if out["prompt_syntax"] not in ("plain", "compel"):
        raise GenerationError(f"prompt_syntax must be 'plain' or 'compel', got {out['prompt_syntax']!r}")
    if out["after_elbo_steps"] not in ("reset", "hold"):
        raise GenerationError(f"after_elbo_steps must be 'reset' or 'hold', got {out['after_elbo_steps']!r}")
    for key in ("baseline", "progress"):
        if not isinstance(out[key], bool):
            raise GenerationError(f"{key} must be true or false, got {out[key]!r}")
    if not isinstance(out.get("output_dir"), str) or not out["output_dir"].strip():
        raise GenerationError("config needs output_dir (a folder path)")
    check_device(out["device"], GenerationError)
    return out


def result_fingerprint(cfg: dict[str, Any]) -> dict[str, Any]:
    """The part of a config that determines the files a run writes."""
    out = {key: cfg.get(key) for key in RESULT_KEYS}
    # folders from before `steps_rule` took exactly `steps` steps; both rules agree when steps divides 1000
    steps = cfg.get("steps")
    rule = cfg.get("steps_rule") or "exact"
    out["steps_rule"] = None if isinstance(steps, int) and steps > 0 and 1000 % steps == 0 else rule
    out["prompt_syntax"] = cfg.get("prompt_syntax") or "plain"  # folders from before the key: plain
    out["model"] = {k: cfg["model"].get(k) for k in ("id", "resolution", "max_sequence_length", "dtype")}
    # storage precision changes the images; unset, it is left out (folders from before the keys match)
    out["model"].update(
        {
            k: v
            for k, v in placing.result_model(cfg["model"]).items()
            if k in ("storage_dtype", "quantization")
        }
    )
    return out


def prompt_path(file: str, datasets_dir: str | Path) -> Path:
    """An absolute path as given; a relative one under datasets_dir, else among the bundled prompt files."""
    given = Path(file).expanduser()
    candidates = [given] if given.is_absolute() else [Path(datasets_dir) / given, BUNDLED_PROMPTS / given]
    for path in candidates:
        if path.is_file():
            return path
    raise GenerationError(
        f"prompt file {file!r} not found (looked at {', '.join(str(p) for p in candidates)}). "
        "Download the prompt sets with `python -m elbo_t2ialign.prepare_data`, set datasets_dir=<folder>, "
        "or pass prompts.file=/path/to/prompts.txt (one prompt per line)."
    )


def read_prompts(path: Path) -> list[str]:
    """One prompt per line; blank lines are skipped, so a prompt's index is its rank among the others."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise GenerationError(f"cannot read prompt file {path}: {err}") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise GenerationError(f"prompt file {path} holds no prompts (expected one prompt per line)")
    return prompts
