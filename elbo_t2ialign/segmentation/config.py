"""Validation of the segmentation config: known keys, shard spec, device.

Hydra's struct mode already rejects unknown command-line keys; this module
gives the same guarantee to configs built in code (tests, notebooks) and turns
the core's option errors into messages that name the offending keys.
"""

from __future__ import annotations

import os
from typing import Any

from elbo_t2ialign.cli import check_device, check_integer, check_known
from elbo_t2ialign.core import placement as placing
from elbo_t2ialign.core.adapters import resolve_device
from elbo_t2ialign.core.options import AlignOptions
from elbo_t2ialign.runfolder import Shard
from elbo_t2ialign.runfolder import parse_shard as runfolder_parse_shard

TOP_KEYS = {
    "model",
    "dataset",
    "elbo",
    "seed",
    "device",
    "output_dir",
    "on_error",
    "shard",
    "num_images",
    "progress",
    "datasets_dir",
    "hydra",
    "variants",
    "elbo_from",  # calibration variants of one run, ELBO losses from another (variants.py)
    "caption",  # the captioner of dataset.prompt=caption (elbo_t2ialign/captions.py)
    "save_token_maps",  # keep every text token's cross-attention (tokens.npy per image)
}
DATASET_KEYS = {
    "name",
    "root",
    "metadata",
    "data_root",
    "image_path",
    "gt_path",
    "split",
    "ignore_index",
    "id_shift",
    "max_id",
    "phrase_path",
    "label_cache",
    "prompt",  # template | caption: how each image's collection prompt is built
}
PROMPTS = ("template", "caption")
# Keys whose change makes existing outputs of a run folder invalid.
RESULT_KEYS = ("model", "elbo", "seed")  # model.dtype is part of "model"
RESULT_DATASET_KEYS = ("name", "split", "ignore_index", "id_shift", "max_id", "phrase_path")


class SegmentationError(Exception):
    """A problem the user can fix (config, data, paths); printed without a traceback."""


class ConfigError(SegmentationError):
    pass


class InputError(SegmentationError):
    """One image or mask cannot be used; the run skips it or stops (cfg.on_error)."""


def _unknown(section: str, got: set[str], known: set[str]) -> None:
    check_known(section, got, known, ConfigError)


def validate(cfg: dict[str, Any]) -> AlignOptions:
    """Check keys and values of a resolved config; return the method options."""
    _unknown("the segmentation config", set(cfg), TOP_KEYS)
    for key in ("model", "dataset"):
        if not isinstance(cfg.get(key), dict):
            raise ConfigError(f"config needs a '{key}' section (e.g. {key}=...)")
    _unknown("dataset", set(cfg["dataset"]), DATASET_KEYS)
    for key in ("name", "id"):
        if not cfg["model"].get(key):
            raise ConfigError(f"model config needs '{key}'")
    try:
        placing.check_model_keys(cfg["model"])
    except placing.PlacementError as err:
        raise ConfigError(str(err)) from None
    if cfg.get("on_error", "skip") not in ("skip", "stop"):
        raise ConfigError(f"on_error must be 'skip' or 'stop', got {cfg.get('on_error')!r}")
    if not isinstance(cfg.get("output_dir"), str) or not cfg["output_dir"].strip():
        raise ConfigError(f"output_dir must be a folder path, got {cfg.get('output_dir')!r}")
    check_integer("num_images", cfg.get("num_images"), 0, ConfigError, none="the whole split")
    check_integer("seed", cfg.get("seed", 0), 0, ConfigError)
    for key, default in (("progress", True), ("save_token_maps", False)):
        if not isinstance(cfg.get(key, default), bool):
            raise ConfigError(f"{key} must be true or false, got {cfg.get(key)!r}")
    parse_shard(cfg.get("shard"))
    resolve_rank_device(cfg.get("device"))
    _check_prompt(cfg)
    try:
        return AlignOptions.from_mapping(cfg.get("elbo"))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"in elbo: {err}") from None


def prompt_mode(dataset: dict[str, Any]) -> str:
    """dataset.prompt: "template" (class names in elbo.collect_prompt; also when absent, as in folders
    written before the key) or "caption" (the image's caption, class words it lacks appended)."""
    return dataset.get("prompt") or "template"


def _check_prompt(cfg: dict[str, Any]) -> None:
    from elbo_t2ialign.captions import CONFIG_KEYS

    mode = prompt_mode(cfg["dataset"])
    if mode not in PROMPTS:
        raise ConfigError(f"dataset.prompt must be one of {list(PROMPTS)}, got {mode!r}")
    caption = cfg.get("caption")
    if caption is not None and not isinstance(caption, dict):
        raise ConfigError(f"caption must be a section of captioner settings, got {caption!r}")
    _unknown("caption", set(caption or {}), CONFIG_KEYS)
    if mode == "caption" and cfg["dataset"].get("phrase_path"):
        raise ConfigError(
            "dataset.prompt=caption builds the prompt from the caption and the class names, so it "
            "cannot use dataset.phrase_path too; unset one of them"
        )


def parse_shard(spec: Any, env: dict[str, str] | None = None) -> Shard:
    """`runfolder.parse_shard`, a bad spec as a ConfigError."""
    return runfolder_parse_shard(spec, env, ConfigError)


def resolve_rank_device(name: str | None, env: dict[str, str] | None = None) -> str:
    """The device of this process in a (possibly sharded) run, as a name: unlike the core's
    `resolve_device`, 'auto' (or empty) picks this process's own GPU, `LOCAL_RANK` as `accelerate
    launch` sets it, so that shards do not share one GPU; other names are checked (ConfigError)."""
    import torch

    env = os.environ if env is None else env
    if name in (None, "", "auto") and torch.cuda.is_available():
        return f"cuda:{int(env.get('LOCAL_RANK', '0')) % torch.cuda.device_count()}"
    check_device(name, ConfigError)
    return str(resolve_device(None if name == "" else name))


def result_fingerprint(cfg: dict[str, Any]) -> dict[str, Any]:
    """The part of a config that determines the files a run writes (defaults filled in)."""
    out = {key: cfg.get(key) for key in RESULT_KEYS}
    out["model"] = placing.result_model(cfg["model"])  # where the weights live changes no map
    out["elbo"] = AlignOptions.from_mapping(cfg.get("elbo")).to_dict()
    out["seed"] = cfg.get("seed", 0)
    out["dataset"] = {key: cfg["dataset"].get(key) for key in RESULT_DATASET_KEYS}
    out["dataset"]["prompt"] = prompt_mode(cfg["dataset"])
    if out["dataset"]["prompt"] == "caption":  # where the cache lives does not change a caption
        out["caption"] = {k: v for k, v in (cfg.get("caption") or {}).items() if k != "cache"}
    return out
