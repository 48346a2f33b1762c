"""Evaluate a generation run folder with the CLIP score (method.md §7).

    python -m elbo_t2ialign.generation.evaluate <run_dir> [--clip ID|FOLDER|tiny] [--batch-size 32]
        [--device auto] [--grid 4] [--truncate]

Scores every image of both variants (100 x cos of CLIP image and prompt embeddings), averages over the
images of a prompt, then over prompts, and writes clip_scores.json, clip_scores.md (with the delta
ELBO - baseline over the prompts that have both) and grid.png (baseline beside weighted). Reads only
files of the run folder.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

from elbo_t2ialign.cli import cli_run, damaged, debug_requested, storage_fault
from elbo_t2ialign.generation.clipscore import DEFAULT_CLIP, ClipScoreError, ClipScorer
from elbo_t2ialign.generation.layout import VARIANTS, GenerationFolder, image_stem
from elbo_t2ialign.runfolder import save_image_atomic, write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)


class EvaluationError(Exception):
    """A run folder, image or prompt the evaluator cannot use."""


def load_image(path: Path) -> Image.Image:
    """RGB image, or an error naming the file and how to regenerate it."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError, SyntaxError) as err:
        if storage_fault(err):
            raise
        raise damaged(
            path,
            err,
            "rerun the generation command with the same config: it moves damaged images to damaged/ "
            "and generates them again",
        ) from None


def read_prompts(folder: GenerationFolder) -> dict[int, dict[str, Any]]:
    if not folder.prompts.is_file():
        raise EvaluationError(
            f"{folder.root} is not a generation run folder (no prompts.json); "
            "run `python -m elbo_t2ialign.generate ...` first"
        )
    entries = folder.read_prompts()
    if not entries:
        raise EvaluationError(f"{folder.prompts} lists no prompts")
    return entries


def score_variant(
    folder: GenerationFolder, variant: str, prompts: dict[int, dict[str, Any]], scorer: ClipScorer
) -> dict[str, Any] | None:
    """Per-image, per-prompt and overall CLIP score of one variant; None when it has no images."""
    items = list(folder.images(variant).items())  # ((index, seed), path)
    if not items:
        return None
    unknown = [str(p) for (i, _), p in items if i not in prompts]
    if unknown:
        raise EvaluationError(
            f"{len(unknown)} image(s) belong to no prompt of prompts.json, e.g. {unknown[0]}"
        )
    for index in sorted({i for (i, _), _ in items}):
        try:
            scorer.check_prompt(prompts[index]["prompt"], what=f"prompt {index}")
        except ClipScoreError as err:
            raise EvaluationError(str(err)) from None
    per_image: dict[str, float] = {}
    for start in range(0, len(items), scorer.batch_size):
        chunk = items[start : start + scorer.batch_size]
        images = [load_image(path) for _, path in chunk]
        scores = scorer.score(images, [prompts[i]["prompt"] for (i, _), _ in chunk])
        per_image.update(
            {image_stem(i, s): float(v) for ((i, s), _), v in zip(chunk, scores.tolist(), strict=True)}
        )
    by_prompt: dict[int, list[float]] = {}
    for (i, s), _ in items:
        by_prompt.setdefault(i, []).append(per_image[image_stem(i, s)])
    per_prompt = {i: sum(v) / len(v) for i, v in sorted(by_prompt.items())}
    return {
        "clip_score": sum(per_prompt.values()) / len(per_prompt),
        "num_prompts": len(per_prompt),
        "num_images": len(items),
        "per_prompt": {str(i): v for i, v in per_prompt.items()},
        "per_image": per_image,
    }


def evaluate(run_dir: str | Path, scorer: ClipScorer, grid: int = 4) -> dict[str, Any]:
    """Score both variants of a run folder and write the JSON, markdown and grid; return the JSON."""
    folder = GenerationFolder(run_dir)
    prompts = read_prompts(folder)
    variants = {v: score_variant(folder, v, prompts, scorer) for v in VARIANTS}
    if variants["elbo"] is None and variants["baseline"] is None:
        raise EvaluationError(f"{folder.root}/images holds no images yet")
    result: dict[str, Any] = {
        "clip_model": scorer.name,
        "metric": "100 * cos(image, prompt), mean over the images of a prompt, then over prompts",
        "variants": variants,
    }
    if variants["elbo"] and variants["baseline"]:
        shared = sorted(
            set(variants["elbo"]["per_prompt"]) & set(variants["baseline"]["per_prompt"]), key=int
        )
        if shared:
            e = sum(variants["elbo"]["per_prompt"][k] for k in shared) / len(shared)
            b = sum(variants["baseline"]["per_prompt"][k] for k in shared) / len(shared)
            result["paired"] = {"num_prompts": len(shared), "elbo": e, "baseline": b, "delta": e - b}
    write_json_atomic(folder.scores, result)
    write_text_atomic(folder.report, markdown(result, prompts))
    if grid > 0 and "paired" in result:
        save_image_atomic(make_grid(folder, result, prompts, grid), folder.grid)
    return result


def markdown(result: dict[str, Any], prompts: dict[int, dict[str, Any]]) -> str:
    """Summary table, delta, then one row per prompt."""
    lines = [
        f"# CLIP score ({result['clip_model']})",
        "",
        "| variant | prompts | images | CLIP score |",
        "|---|---:|---:|---:|",
    ]
    for name, v in result["variants"].items():
        if v:
            lines.append(f"| {name} | {v['num_prompts']} | {v['num_images']} | {v['clip_score']:.2f} |")
    if "paired" in result:
        p = result["paired"]
        lines += [
            "",
            f"Over the {p['num_prompts']} prompts with both variants: baseline {p['baseline']:.2f}, "
            f"ELBO {p['elbo']:.2f}, **delta {p['delta']:+.2f}**.",
        ]
    lines += ["", "| # | prompt | phrases | baseline | ELBO | delta |", "|---:|---|---|---:|---:|---:|"]
    e = (result["variants"]["elbo"] or {}).get("per_prompt", {})
    b = (result["variants"]["baseline"] or {}).get("per_prompt", {})
    for key in sorted(set(e) | set(b), key=int):
        entry = prompts[int(key)]
        delta = f"{e[key] - b[key]:+.2f}" if key in e and key in b else ""
        cells = [
            key,
            entry["prompt"].replace("|", "\\|"),
            ", ".join(entry["phrases"]),
            f"{b[key]:.2f}" if key in b else "",
            f"{e[key]:.2f}" if key in e else "",
            delta,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def make_grid(
    folder: GenerationFolder,
    result: dict[str, Any],
    prompts: dict[int, dict[str, Any]],
    rows: int,
    cell: int = 256,
) -> Image.Image:
    """The first `rows` prompts with both variants: baseline | ELBO (first seed), captioned with scores."""
    shared = sorted(
        result["variants"]["elbo"]["per_prompt"].keys() & result["variants"]["baseline"]["per_prompt"].keys(),
        key=int,
    )[:rows]
    caption = 34
    font = ImageFont.load_default()
    canvas = Image.new("RGB", (2 * cell, len(shared) * (cell + caption)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, key in enumerate(shared):
        top = r * (cell + caption)
        draw.text((4, top + 2), f"{key}: {prompts[int(key)]['prompt'][:70]}", fill="black", font=font)
        for c, variant in enumerate(("baseline", "elbo")):
            paths = [p for (i, _), p in folder.images(variant).items() if i == int(key)]
            canvas.paste(load_image(paths[0]).resize((cell, cell), Image.BILINEAR), (c * cell, top + caption))
            score = result["variants"][variant]["per_prompt"][key]
            draw.text((c * cell + 4, top + 17), f"{variant} {score:.2f}", fill="black", font=font)
    return canvas


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument(
        "--clip", default=DEFAULT_CLIP, help=f"CLIP hub id, local folder or 'tiny' ({DEFAULT_CLIP})"
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto", help="auto: cuda when available, else cpu")
    parser.add_argument("--grid", type=int, default=4, help="prompts in grid.png (0: none)")
    parser.add_argument(
        "--truncate", action="store_true", help="score over-long prompts by their first tokens"
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of an expected error too")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    from elbo_t2ialign.core.adapters import resolve_device

    def scored() -> dict[str, Any]:
        scorer = ClipScorer.from_pretrained(
            args.clip, device=resolve_device(args.device), batch_size=args.batch_size, truncate=args.truncate
        )
        return evaluate(args.run_dir, scorer, grid=args.grid)

    debug = debug_requested(["--debug"] if args.debug else [])[0]
    result, code = cli_run(scored, (EvaluationError, ClipScoreError), debug)
    if code:
        return code
    for name, v in result["variants"].items():
        if v:
            print(
                f"{name:9s} CLIP score {v['clip_score']:.2f} over {v['num_prompts']} prompts, {v['num_images']} images"
            )
    if "paired" in result:
        print(
            f"delta (ELBO - baseline) {result['paired']['delta']:+.2f} over {result['paired']['num_prompts']} prompts"
        )
    print(f"wrote {GenerationFolder(args.run_dir).report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
