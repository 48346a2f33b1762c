"""Generation runner: ELBO-weighted (and baseline) images for the first N prompts of a prompt set.

`run(cfg)` is the pure entry point (Hydra's `main` and the tests call it). It writes the run folder
described in `layout.py`. Resumable: an image is written under a temporary name and renamed, a rerun
skips every image already there, and nothing is ever deleted. Image j of every prompt starts from the
noise of seed `cfg.seed + j`, for the weighted and the baseline image alike.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm import tqdm

from elbo_t2ialign.cli import to_container
from elbo_t2ialign.core import memory
from elbo_t2ialign.core import placement as placing
from elbo_t2ialign.core.adapters import (
    adapter_for,
    load_pipeline,
    place_pipeline,
    resolve_device,
    resolve_dtype,
)
from elbo_t2ialign.generation.config import (
    TINY_PREFIX,
    GenerationError,
    prompt_path,
    read_prompts,
    result_fingerprint,
    validate,
)
from elbo_t2ialign.generation.layout import GenerationFolder
from elbo_t2ialign.generation.phrases import PhraseExtractor
from elbo_t2ialign.generation.sampler import ElboSampler, SampleResult
from elbo_t2ialign.generation.weighting import compel_syntax
from elbo_t2ialign.runfolder import (
    Launch,
    launch,
    model_identity,
    remove_stale_temps,
    save_image_atomic,
    write_json_atomic,
)

log = logging.getLogger(__name__)
# written by a launch before any result, besides RunFolder.launch_files() (removed when a first launch fails)
OWN_FILES = ["prompts.json"]


def run(cfg: Any, sampler: ElboSampler | None = None, extractor: PhraseExtractor | None = None) -> Path:
    """Generate every missing image of the configured run; return the run folder."""
    conf = validate(to_container(cfg, GenerationError))
    prompts = read_prompts(prompt_path(conf["prompts"]["file"], conf["datasets_dir"]))
    limit = conf["num_prompts"]
    selected = list(enumerate(prompts if limit is None else prompts[: int(limit)]))
    folder = GenerationFolder(conf["output_dir"])
    spec = Launch(
        conf=conf,
        fingerprint=result_fingerprint,
        error=GenerationError,
        own_files=OWN_FILES,
        identity={"model": model_identity(str(conf["model"]["id"]))},
        run_info={
            "seed": conf["seed"],
            "model": conf["model"]["name"],
            "model_id": conf["model"]["id"],
            "prompts": conf["prompts"]["name"],
            "torch": torch.__version__,
        },
        details={
            "num_prompts": conf["num_prompts"],
            "images_per_prompt": conf["images_per_prompt"],
            "baseline": conf["baseline"],
        },
    )
    with launch(folder, spec):
        remove_stale_temps(folder.root)
        seeds = [int(conf["seed"]) + j for j in range(int(conf["images_per_prompt"]))]
        variants = ["elbo"] + (["baseline"] if conf["baseline"] else [])
        todo = [
            (i, s, v)
            for i, _ in selected
            for s in seeds
            for v in variants
            if not _intact(folder, folder.image(v, i, s))
        ]
        total = len(selected) * len(seeds) * len(variants)
        log.info(
            "%s: %d prompts x %d images x %s; %d finished, %d to do -> %s",
            conf["prompts"]["name"],
            len(selected),
            len(seeds),
            "+".join(variants),
            total - len(todo),
            len(todo),
            folder.root,
        )
        extractor = extractor or PhraseExtractor.from_config(**conf["phrases"])
        phrases = _write_prompts(folder, selected, extractor)
        if todo:
            sampler = sampler or build_sampler(conf)
            _check_lengths(sampler, {i for i, _, _ in todo}, dict(selected))
        progress = tqdm(
            total=total,
            initial=total - len(todo),
            unit="img",
            desc=conf["prompts"]["name"],
            disable=not conf["progress"],
        )
        texts = dict(selected)
        last = None  # (index, seed, result) of the latest weighted image
        for n, (index, seed, variant) in enumerate(todo):
            prompt = texts[index]
            if variant == "baseline" and last and last[:2] == (index, seed) and _unweighted(last[2]):
                result = last[2]  # all weights 1: the weighted image is the baseline, bit for bit
            else:
                try:
                    result = sampler.sample(prompt, phrases[index], seed, weighted=variant == "elbo")  # type: ignore[union-attr]
                except ValueError as err:  # e.g. a phrase whose tokens cannot be located in the prompt
                    raise GenerationError(f"prompt {index} ({prompt!r}): {err}") from err
            last = (index, seed, result)
            if variant == "elbo":
                write_json_atomic(
                    folder.weights(index, seed),
                    {
                        "index": index,
                        "prompt": prompt,
                        "seed": seed,
                        "phrases": result.phrases,
                        "weights": result.weights,
                        "distances": result.distances,
                        "final_prompt": compel_syntax(prompt, result.phrases, result.weights[-1])
                        if result.phrases
                        else prompt,
                    },
                )
            save_image_atomic(result.image, folder.image(variant, index, seed))
            progress.update(1)
            if n + 1 == len(todo) or todo[n + 1][0] != index:
                _forget(sampler, [prompt, *phrases[index]])  # type: ignore[arg-type]
        progress.close()
        log.info("finished: %d images in %s", total, folder.root / "images")
    return folder.root


def build_sampler(conf: dict[str, Any]) -> ElboSampler:
    """Load the model (a hub id, a folder, or tiny:<family> for a random tiny one) and wrap it."""
    model = conf["model"]
    device = resolve_device(conf["device"])
    dtype = resolve_dtype(model.get("dtype") or "auto", device)
    model_id = str(model["id"])
    log.info("loading model %s (%s) on %s, %s", model["name"], model_id, device, dtype)
    built = None
    if model_id.startswith(TINY_PREFIX):
        from elbo_t2ialign.tiny.models import BUILDERS

        family = model_id[len(TINY_PREFIX) :]
        if family not in BUILDERS:
            raise GenerationError(
                f"unknown tiny model {model_id!r}; choose one of {[TINY_PREFIX + k for k in BUILDERS]}"
            )
        built = BUILDERS[family]()
    try:
        # the memory plan (logged; a plan that cannot fit is refused before loading); the guided
        # steps run the denoiser on batches of 2
        where = memory.plan_and_check(
            model_id,
            placing.Placement.from_mapping(model),
            device,
            dtype,
            batch_size=2,
            resolution=model.get("resolution"),
            pipe=built,
        )
        if built is not None:
            pipe = place_pipeline(built, where, device, dtype)
        else:
            pipe = load_pipeline(model_id, device, dtype, prepare=False, placement=where)
    except FileNotFoundError as err:
        raise GenerationError(str(err)) from None
    except placing.PlacementError as err:
        raise GenerationError(str(err)) from None
    adapter = adapter_for(pipe, device, dtype, model.get("resolution"), model.get("max_sequence_length"))
    try:
        return ElboSampler(
            adapter,
            steps=int(conf["steps"]),
            guidance=conf["guidance"],
            strength=float(conf["strength"]),
            elbo_steps=int(conf["elbo_steps"]),
            after_elbo_steps=conf["after_elbo_steps"],
            steps_rule=conf["steps_rule"],
            prompt_syntax=conf["prompt_syntax"],
        )
    except ValueError as err:
        raise GenerationError(f"model {model['name']}: {err}") from None


def _write_prompts(
    folder: GenerationFolder, selected: list[tuple[int, str]], extractor: PhraseExtractor
) -> dict[int, list[str]]:
    """Noun phrases of every selected prompt, merged into prompts.json; a prompt whose text changed
    since earlier images were made is an error."""
    entries = folder.read_prompts() if folder.prompts.is_file() else {}
    for index, prompt in selected:
        if index in entries and entries[index]["prompt"] != prompt:
            raise GenerationError(
                f"prompt {index} of the prompt file is now {prompt!r} but {folder.root} was generated with "
                f"{entries[index]['prompt']!r}; restore the file or set output_dir=<new folder>"
            )
        entries[index] = {"index": index, "prompt": prompt, "phrases": extractor(prompt)}
    write_json_atomic(folder.prompts, [entries[k] for k in sorted(entries)])
    return {i: entries[i]["phrases"] for i, _ in selected}


def _intact(folder: GenerationFolder, path: Path) -> bool:
    """A finished image that decodes; a damaged one is moved to damaged/ (and generated again)."""
    if not path.is_file():
        return False
    try:
        with Image.open(path) as image:
            image.load()
        return True
    except (OSError, SyntaxError, ValueError) as err:
        target = folder.root / "damaged" / path.relative_to(folder.root)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
        log.warning("%s is unreadable (%s); moved to %s, generating it again", path, err, target)
        return False


def _unweighted(result: SampleResult) -> bool:
    return result.plain


def _check_lengths(sampler: ElboSampler, indices: set[int], texts: dict[int, str]) -> None:
    """Every prompt to generate must fit the text encoder (no silent truncation)."""
    bad = []
    for i in sorted(indices):
        try:
            sampler.adapter.check_prompt_length(texts[i])
        except ValueError:
            bad.append(f"{i} ({len(sampler.adapter.token_ids(texts[i]))} tokens): {texts[i][:60]!r}")
    if bad:
        limit = sampler.adapter.max_prompt_tokens()
        raise GenerationError(
            f"{len(bad)} prompt(s) exceed the text encoder's {limit} tokens: "
            + "; ".join(bad[:10])
            + ("; ..." if len(bad) > 10 else "")
            + ". Shorten them in the prompt file or lower num_prompts."
        )


def _forget(sampler: ElboSampler, prompts: list[str]) -> None:
    """Drop a finished prompt's conditioning from the adapter's per-prompt cache (it grows otherwise)."""
    sampler.adapter.clear_prompt_cache(prompts)
