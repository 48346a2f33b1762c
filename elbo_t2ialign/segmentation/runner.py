"""Segmentation runner: one heatmap per (image, class) for a dataset split.

`run(cfg, aligner=None)` is the pure entry point (Hydra's `main` and the tests
call it). It writes the run folder described in `layout.py`: the map of every
class for every calibration variant (`variants.py`; by default calibrated and
strength 1) from one network pass, so one run yields every row of an ablation.
Resumable (finished images are skipped, an image appears only when complete;
variants added later are written beside the others), shardable by image index
(`shard=i/n` or `accelerate launch`), and a seed per image of
`cfg.seed + image_index` so the shard layout never changes results. With
`dataset.prompt=caption` the images are captioned first (`captioning.py`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image
from tqdm import tqdm

from elbo_t2ialign.captions import fit_words
from elbo_t2ialign.cli import DamagedFileError, one_line, storage_fault, to_container
from elbo_t2ialign.core.finite import NonFiniteError, advice
from elbo_t2ialign.core.options import AlignOptions
from elbo_t2ialign.runfolder import (
    Launch,
    discard_temp_dir,
    launch,
    model_identity,
    read_json,
    remove_stale_temps,
    write_json_atomic,
    writing,
)
from elbo_t2ialign.segmentation.captioning import ensure_captions
from elbo_t2ialign.segmentation.config import (
    ConfigError,
    InputError,
    Shard,
    parse_shard,
    prompt_mode,
    resolve_rank_device,
    result_fingerprint,
    validate,
)
from elbo_t2ialign.segmentation.datasets import ImageInfo, SegDataset
from elbo_t2ialign.segmentation.layout import SegmentationFolder, heatmap_name
from elbo_t2ialign.segmentation.variants import (
    ElboSource,
    VariantMaps,
    VariantPlan,
    merged_scores,
    parse_variants,
    record,
)

log = logging.getLogger(__name__)
# written by a launch before any result, besides RunFolder.launch_files() (removed when a first launch fails)
OWN_FILES = ["variants.json"]


class HeatmapAligner(Protocol):
    """What the runner needs from `elbo_t2ialign.Aligner`: one image's network passes -> its Evidence."""

    def observe(
        self,
        image: Image.Image,
        class_names: list[str],
        phrases: list[str] | None = None,
        seed: int | None = None,
        *,
        prompt: str | None = None,
        need_elbo: bool | None = None,
        elbo_losses: dict[str, float] | None = None,
    ) -> Any: ...


def run(
    cfg: Any, aligner: HeatmapAligner | None = None, on_image: Callable[[int, int], None] | None = None
) -> Path:
    """Segment every image of the configured split (this shard's part); return the run folder.
    `on_image(done, todo)` is called after each image this launch computes (progress, estimates)."""
    conf = to_container(cfg, ConfigError)
    options = validate(conf)
    conf["elbo"] = options.to_dict()  # saved in full, so the folder stays reproducible if defaults change
    plan = VariantPlan(
        parse_variants(conf.get("variants"), options),
        options,
        ElboSource(conf["elbo_from"], conf) if conf.get("elbo_from") else None,
    )
    shard = parse_shard(conf.get("shard"))
    dataset = SegDataset(conf["dataset"])
    folder = SegmentationFolder(conf["output_dir"])
    spec = Launch(
        conf=conf,
        fingerprint=result_fingerprint,
        error=ConfigError,
        own_files=OWN_FILES,
        identity={"dataset": dataset.identity(), "model": model_identity(str(conf["model"]["id"]))},
        run_info={
            "seed": conf.get("seed", 0),
            "dataset": conf["dataset"].get("name"),
            "split": conf["dataset"].get("split"),
            "model": conf["model"]["name"],
        },
        details={"shard": f"{shard.index}/{shard.count}"},
        shard_tag=shard.tag,
        conflicts=(".lock.shard*",) if shard.count == 1 else (".lock",),
    )
    with launch(folder, spec):
        record(folder, plan.variants)
        try:
            items = _select(dataset, conf.get("num_images"), shard)
            remove_stale_temps(folder.root, [folder.temp_dir(n) for _, n in items])
            # damaged finished images are moved aside and computed again; finished ones may lack new variants
            todo = [(i, n) for i, n in items if not _verified(folder, n) or plan.missing(folder, n)]
            if plan.source is not None:
                plan.source.check_images([n for _, n in todo if not folder.is_done(n)])
            log.info(
                "%s/%s: %d images in this shard, %d finished, %d to do -> %s",
                dataset.name,
                dataset.split,
                len(items),
                len(items) - len(todo),
                len(todo),
                folder.root,
            )
            captions = None
            if prompt_mode(conf["dataset"]) == "caption":  # before the model: the captioner is freed first
                captions = ensure_captions(
                    folder.root,
                    dataset,
                    conf,
                    [n for _, n in todo if not folder.is_done(n)],
                    resolve_rank_device(conf.get("device")),
                )
            if todo and aligner is None:
                aligner = build_aligner(conf, options)
            progress = tqdm(
                todo,
                total=len(items),
                initial=len(items) - len(todo),
                unit="img",
                desc=f"{dataset.name}{shard.tag}",
                disable=not conf.get("progress", True),
            )
            fallback, non_finite = 0, []
            for k, (index, name) in enumerate(progress):
                try:
                    source = _process(folder, dataset, aligner, conf, index, name, plan, captions)
                except NonFiniteError as err:
                    source = _non_finite(folder, conf, index, name, err, non_finite, (k + 1, len(todo)))
                fallback += source is not None and source.startswith("class_names (")
                if on_image is not None:
                    on_image(k + 1, len(todo))
            _summarise(folder, dataset, items, fallback)
        finally:
            dataset.labels.save()
    return folder.root


def _verified(folder: SegmentationFolder, name: str) -> bool:
    """A finished image whose files are all readable; a damaged one is moved to damaged/ and redone."""
    if not folder.is_done(name):
        return False
    problems = folder.problems(name)
    if problems:
        target = folder.damaged_dir(name)
        target.parent.mkdir(exist_ok=True)
        os.rename(folder.image_dir(name), target)
        log.warning("%s: %s; moved to %s, computing it again", name, "; ".join(problems[:3]), target)
    return not problems


def build_aligner(conf: dict[str, Any], options: AlignOptions) -> HeatmapAligner:
    """The real model (imported lazily: a finished run needs no model)."""
    from elbo_t2ialign import Aligner

    device = resolve_rank_device(conf.get("device"))
    log.info("loading model %s (%s) on %s", conf["model"]["name"], conf["model"]["id"], device)
    try:
        if str(conf["model"].get("id")).startswith("tiny:"):  # a random tiny model built in code
            from elbo_t2ialign.tiny.models import tiny_aligner_from_config

            return tiny_aligner_from_config(conf["model"], options, device)
        return Aligner.from_config(conf["model"], options=options, device=device)
    except DamagedFileError:  # a damaged model folder: exit status 3, the line names the file
        raise
    except (FileNotFoundError, ValueError) as err:  # unreachable hub id, unusable folder, bad dtype
        raise ConfigError(one_line(err)) from None


def _select(dataset: SegDataset, limit: Any, shard: Shard) -> list[tuple[int, str]]:
    names = dataset.images if limit in (None, "") else dataset.images[: int(limit)]
    return [(i, n) for i, n in enumerate(names) if shard.owns(i)]


def _process(
    folder: SegmentationFolder,
    dataset: SegDataset,
    aligner: HeatmapAligner,
    conf: dict[str, Any],
    index: int,
    name: str,
    plan: VariantPlan,
    captions: dict[str, str] | None = None,
) -> str | None:
    """Compute and write one image; returns the phrase source, None when skipped."""
    from elbo_t2ialign.core.aligner import PromptTooLong

    try:
        return _compute(folder, dataset, aligner, conf, index, name, plan, captions)
    except (InputError, PromptTooLong) as err:  # an unreadable image, a refused prompt
        if conf.get("on_error", "skip") == "stop":
            raise InputError(f"{err}\n(on_error=stop: finished images are kept; a rerun resumes)") from None
        log.warning("skipping %s: %s", name, err)
        write_json_atomic(folder.skip_record(name), {"image": name, "index": index, "error": str(err)})
        return None


def _compute(
    folder: SegmentationFolder,
    dataset: SegDataset,
    aligner: HeatmapAligner,
    conf: dict[str, Any],
    index: int,
    name: str,
    plan: VariantPlan,
    captions: dict[str, str] | None = None,
) -> str | None:
    image, info = dataset.load_example(name)
    phrases, source = dataset.phrases_for(name, info.class_ids)
    names = [dataset.class_names[i - 1] for i in info.class_ids]
    if phrases is None and source != "class_names":
        log.info("%s: %s; prompting with class names", name, source)
    seed = int(conf.get("seed", 0)) + index
    if folder.is_done(name):  # finished before: only the variants added since, with its recorded prompt
        _add_variants(folder, name, aligner, plan, image, _prompt(conf, dataset, name, phrases, aligner))
        return source
    prompt, extra = _prompt(conf, dataset, name, phrases, aligner), {}
    if captions is not None:
        prompt, appended, dropped = fit_words(captions[name], names, _fits(aligner))
        extra = {"caption": captions[name], "appended_to_caption": appended}
        extra |= {"caption_words_dropped": dropped} if dropped else {}
        source = "caption"
        prompt = _unless_split(conf, prompt, aligner, "its caption with the class words")
    result = plan.compute(aligner, image, name, names, phrases, seed, prompt=prompt)
    if prompt is not None:
        extra["prompt"] = prompt
    save_tokens = bool(conf.get("save_token_maps"))
    _write_image(folder, name, index, seed, info, names, phrases, source, result, extra, save_tokens)
    if folder.skip_record(name).exists():
        os.unlink(folder.skip_record(name))  # an earlier failure that is now fixed
    return source


def _non_finite(
    folder: SegmentationFolder,
    conf: dict[str, Any],
    index: int,
    name: str,
    err: NonFiniteError,
    failed: list[str],
    progress: tuple[int, int],
) -> None:
    """An image whose latents, losses or attention hold NaN or infinity: no maps are written; the
    image is recorded and skipped, or (on_error=stop) the run stops naming it. When the first images
    of this launch (3, or all if fewer) all fail so, the model or its dtype is at fault, not the
    images: the run stops."""
    if conf.get("on_error", "skip") == "stop":
        raise InputError(
            f"{name}: {err} (on_error=stop: finished images are kept; a rerun resumes)"
        ) from None
    log.warning("skipping %s: %s", name, err)
    write_json_atomic(folder.skip_record(name), {"image": name, "index": index, "error": str(err)})
    failed.append(err.what)
    done, todo = progress
    if len(failed) == done >= min(3, todo):
        raise ConfigError(
            f"the first {done} image(s) of this launch all gave non-finite numbers (in "
            f"{' and '.join(sorted(set(failed)))}), so the model or its dtype is at fault, not the images; "
            f"{advice(_dtype_of(conf))}; finished images are kept"
        )


def _dtype_of(conf: dict[str, Any]) -> Any:
    """The dtype the model runs in (for the advice of a non-finite failure)."""
    from elbo_t2ialign.core.adapters import resolve_dtype

    return resolve_dtype(conf["model"].get("dtype", "auto"), resolve_rank_device(conf.get("device")))


def _prompt(
    conf: dict[str, Any], dataset: SegDataset, name: str, phrases: list[str] | None, aligner: Any = None
) -> str | None:
    """The collection prompt of a phrase file: as the reference, every phrase of the image in order
    (None: the aligner fills elbo.collect_prompt with the class names, or the phrases, splitting them
    over several prompts when they do not fit; so too a phrase-file prompt that does not fit)."""
    if phrases is None:
        return None
    prompt = conf["elbo"]["collect_prompt"].format(", ".join(dataset.phrase_lists(name)[1]))
    return _unless_split(conf, prompt, aligner, "every phrase of its phrase file")


def _unless_split(conf: dict[str, Any], prompt: str | None, aligner: Any, what: str) -> str | None:
    """`prompt`, or None (the aligner's template prompts, split as needed) when it does not fit the
    text encoder and elbo.prompt_overflow is split."""
    fits = _fits(aligner)
    if prompt is None or fits is None or fits(prompt):
        return prompt
    if conf["elbo"].get("prompt_overflow", "split") != "split":
        return prompt  # refused or truncated by the aligner
    log.info("the prompt of %s does not fit the text encoder; its classes go into split prompts", what)
    return None


def _save_tokens(folder: Path, tokens: Any) -> None:
    """save_token_maps: every text token's cross-attention map, (P, R, R, L) in the capture precision
    (bfloat16 as float32: numpy has no bfloat16), as tokens.npy beside the maps."""
    import torch

    arr = tokens.detach().cpu()
    if arr.dtype == torch.bfloat16:
        arr = arr.float()
    p, rr, length = arr.shape
    side = int(round(rr**0.5))
    np.save(folder / "tokens.npy", arr.reshape(p, side, side, length).numpy(), allow_pickle=False)


def _fits(aligner: Any) -> Callable[[str], bool] | None:
    """Whether a prompt fits the aligner's text encoder (None for a stand-in without an adapter)."""
    adapter = getattr(aligner, "adapter", None)
    if adapter is None:
        return None
    return lambda prompt: len(adapter.token_ids(prompt)) <= adapter.max_prompt_tokens()


def _write_image(
    folder: SegmentationFolder,
    name: str,
    index: int,
    seed: int,
    info: ImageInfo,
    names: list[str],
    phrases: list[str] | None,
    source: str,
    result: VariantMaps,
    extra: dict[str, Any] | None = None,
    save_tokens: bool = False,
) -> None:
    """Write into maps/.tmp-<name>/, then rename it to maps/<name>/ in one step. When a write fails
    (a full disk) or the run is interrupted, the staging folder is removed at once (its space freed)."""
    tmp = _fresh_temp(folder, name)
    scores = {
        "image": name,
        "index": index,
        "seed": seed,
        "size": list(info.size),
        "class_ids": info.class_ids,
        "classes": names,
        "phrases": phrases,
        "phrase_source": source,
        **result.scores(),  # elbo, tau, variants (and elbo_from when the losses were reused)
        **(extra or {}),  # prompt (phrase files, captions), caption, appended_to_caption
    }
    try:
        with writing(folder.image_dir(name)):
            _save_maps(tmp, name, info.class_ids, names, info.size, result)
            if save_tokens and result.tokens is not None:
                _save_tokens(tmp, result.tokens)
            write_json_atomic(tmp / "scores.json", scores)
            _finish(folder, tmp, name)
    except BaseException:
        discard_temp_dir(tmp)
        raise


def _finish(folder: SegmentationFolder, tmp: Path, name: str) -> None:
    """The staged folder becomes maps/<name>/ in one rename."""
    try:
        os.rename(tmp, folder.image_dir(name))
    except OSError as err:
        if storage_fault(err):
            raise
        raise ConfigError(
            f"cannot finish {name}: {folder.image_dir(name)} exists but is incomplete ({err}); "
            "move it away and rerun"
        ) from None


def _fresh_temp(folder: SegmentationFolder, name: str) -> Path:
    tmp = folder.temp_dir(name)
    tmp.mkdir(parents=True, exist_ok=True)
    for stale in tmp.iterdir():  # files of an attempt at this image that was killed
        stale.unlink()
    return tmp


def _save_maps(
    tmp: Path, name: str, class_ids: list[int], names: list[str], size: tuple[int, int], result: VariantMaps
) -> None:
    for class_id, class_name in zip(class_ids, names, strict=True):
        for variant, maps in result.maps.items():
            pixels = to_uint8(maps[class_name], size, f"{variant} map of {class_name!r} for {name}")
            Image.fromarray(pixels).save(tmp / heatmap_name(variant, class_id), format="PNG")


def _add_variants(
    folder: SegmentationFolder,
    name: str,
    aligner: HeatmapAligner,
    plan: VariantPlan,
    image: Any,
    prompt: str | None,
) -> None:
    """Maps of variants added to a finished image: written beside the others, then scores.json lists
    them (a kill in between leaves files that the next launch writes again)."""
    scores = read_json(folder.image_dir(name) / "scores.json")
    prompt = scores.get("prompt", prompt)  # the prompt the image was computed with (a caption's)
    result = plan.compute(
        aligner, image, name, scores["classes"], scores["phrases"], scores["seed"], scores, prompt=prompt
    )
    tmp = _fresh_temp(folder, name)
    try:
        with writing(folder.image_dir(name)):
            _save_maps(tmp, name, scores["class_ids"], scores["classes"], tuple(scores["size"]), result)
    except BaseException:
        discard_temp_dir(tmp)
        raise
    for f in tmp.iterdir():
        os.replace(f, folder.image_dir(name) / f.name)
    tmp.rmdir()
    write_json_atomic(folder.image_dir(name) / "scores.json", merged_scores(scores, result))


def to_uint8(heat: Any, size: tuple[int, int], what: str) -> np.ndarray:
    """(H, W) float heatmap in [0, 1] -> (H, W) uint8, value round(255 * heat)."""
    arr = np.asarray(heat, dtype=np.float32)
    if arr.shape != tuple(size):
        raise RuntimeError(
            f"{what}: aligner returned shape {arr.shape}, expected the image size {tuple(size)}"
        )
    if not np.isfinite(arr).all():
        raise RuntimeError(f"{what}: aligner returned non-finite values")
    return np.round(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8)


def _summarise(
    folder: SegmentationFolder, dataset: SegDataset, items: list[tuple[int, str]], fallback: int
) -> None:
    skipped = [n for _, n in items if folder.skip_record(n).exists() and not folder.is_done(n)]
    done = sum(folder.is_done(n) for _, n in items)
    log.info("finished %d of %d images of this shard", done, len(items))
    if skipped:
        log.warning("%d image(s) skipped, see %s: %s", len(skipped), folder.skipped, ", ".join(skipped[:10]))
    if items and not done:
        raise InputError(
            f"every image of this run ({len(items)}) was skipped; the reasons are in {folder.skipped}"
        )
    if fallback:
        log.warning(
            "%d image(s) had no phrase file (%s); their prompts used class names",
            fallback,
            dataset.phrase_template,
        )
