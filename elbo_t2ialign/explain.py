"""Explore one image: where the model puts each word, with and without the ELBO calibration.

    python -m elbo_t2ialign.explain IMAGE WORD [WORD ...] [--prompt "..."] [--caption] [key=value ...]

    python -m elbo_t2ialign.explain datasets/shapes/images/val_00003.png square triangle
    python -m elbo_t2ialign.explain img.png circle --prompt "a photo of a circle and a square"
    python -m elbo_t2ialign.explain cat_dog.jpg cat dog --caption model=sd15 elbo=default elbo.strength=2

Words are class names put into the prompt template ("a photo of square, triangle"), or, with
--prompt, words or phrases of your own prompt; with --caption the prompt is the image's caption
(BLIP by default, cached; words it lacks are appended). Arguments with "=" are Hydra overrides of
configs/explain.yaml (model, elbo, device, output_dir, caption.*). The defaults run offline on the
bundled testbed model. Writes, into a new folder under output_dir: figure.png (per word: the image,
the baseline, ELBO-calibrated and cross-attention maps over it, tau and loss in the titles), each map
as <word>.<kind>.npy (float32 in [0, 1]) and .png (8-bit), tokens.npy (every text token's
cross-attention, (P, R, R, L) float32: any other word's map without a forward) and result.json.
Class lists longer than the text encoder's context are split over several prompts
(elbo.prompt_overflow; result.json "collect_prompts" and "prompt_of").
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from elbo_t2ialign.captions import with_words
from elbo_t2ialign.cli import (
    DamagedFileError,
    check_device,
    check_known,
    cli_run,
    debug_requested,
    hydra_config_dir,
    one_line,
    override_message,
    to_container,
)
from elbo_t2ialign.core.options import AlignOptions
from elbo_t2ialign.runfolder import (
    discard_temp_dir,
    git_revision,
    pid_alive,
    write_json_atomic,
    writing,
)

TOP_KEYS = {"model", "elbo", "device", "output_dir", "alpha", "cmap", "dpi", "caption"}
KINDS = ("baseline", "elbo", "cross")  # plotting kinds, also the file tags
OVERRIDE = re.compile(r"^[+~]{0,2}[A-Za-z_][\w.@/-]*=")


class ExplainError(Exception):
    """Bad input or config; printed as one line, exit status 2 (cli.EXIT_BAD_INPUT)."""


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str], list[str]]:
    """-> (flags, words, Hydra overrides); an argument is an override when it starts with `key=`."""
    parser = argparse.ArgumentParser(
        prog="python -m elbo_t2ialign.explain", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("image", help="an image file")
    parser.add_argument(
        "items", nargs="*", metavar="WORD | key=value", help="words or phrases to map, and config overrides"
    )
    parser.add_argument("--prompt", help="your prompt; the words are located in it")
    parser.add_argument("--caption", action="store_true", help="use the image's caption as the prompt")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an expected error too")
    args = parser.parse_intermixed_args(argv)
    overrides = [a for a in args.items if OVERRIDE.match(a)]
    words = [a for a in args.items if not OVERRIDE.match(a)]
    return args, words, overrides


def compose(overrides: list[str]) -> dict[str, Any]:
    """configs/explain.yaml with the overrides, resolved to a plain dict."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=hydra_config_dir(), version_base="1.3"):
            conf = to_container(hydra_compose("explain", overrides=overrides), ExplainError)
    except (HydraException, OmegaConfBaseException) as err:
        raise ExplainError(override_message(err, "explain", overrides)) from None
    check_known("the explain config", set(conf), TOP_KEYS, ExplainError)
    check_device(conf.get("device"), ExplainError)
    return conf


def staging_folder(root: Path, stem: str) -> Path:
    """<root>/.tmp-<stem>.<pid>, created empty: where one call writes before its folder appears.
    Staging folders of earlier calls that are no longer running (killed) are removed first."""
    root.mkdir(parents=True, exist_ok=True)
    for old in root.glob(".tmp-*"):
        pid = old.name.rsplit(".", 1)[-1]
        if old.is_dir() and pid.isdigit() and (int(pid) == os.getpid() or not pid_alive(int(pid))):
            discard_temp_dir(old)
    stage = root / f".tmp-{stem}.{os.getpid()}"
    stage.mkdir()
    return stage


def publish(stage: Path, root: Path, stem: str) -> Path:
    """Rename the finished staging folder to <root>/<stem>-<n>, the first n not taken (by an earlier
    call, or by a concurrent one that renamed first)."""
    n = 1
    while True:
        folder = root / f"{stem}-{n}"
        if not folder.exists():
            try:
                os.rename(stage, folder)
                return folder
            except OSError as err:
                if err.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
        n += 1


def file_names(words: list[str]) -> dict[str, str]:
    """A distinct file-name stem per word ('red sofa' -> 'red_sofa')."""
    out: dict[str, str] = {}
    for word in words:
        base = re.sub(r"[^\w-]+", "_", word).strip("_") or "word"
        stem, n = base, 2
        while stem in out.values():
            stem, n = f"{base}-{n}", n + 1
        out[word] = stem
    return out


def _options(conf: dict[str, Any]) -> AlignOptions:
    try:
        return AlignOptions.from_mapping(conf.get("elbo"))
    except (TypeError, ValueError) as err:
        raise ExplainError(f"in elbo: {err}") from None


def _image(path: str) -> Image.Image:
    from elbo_t2ialign.core.images import as_image

    try:
        return as_image(path)
    except (FileNotFoundError, ValueError) as err:
        raise ExplainError(str(err)) from None


def load_aligner(conf: dict[str, Any], options: AlignOptions):
    from elbo_t2ialign import Aligner

    try:
        if str(conf["model"].get("id")).startswith("tiny:"):  # a random tiny model built in code
            from elbo_t2ialign.tiny.models import tiny_aligner_from_config

            return tiny_aligner_from_config(conf["model"], options, conf.get("device", "auto"))
        return Aligner.from_config(conf["model"], options=options, device=conf.get("device", "auto"))
    except DamagedFileError:  # a damaged model folder: exit status 3, the line names the file
        raise
    except (OSError, ValueError) as err:
        raise ExplainError(one_line(err)) from None


def caption_prompt(
    conf: dict[str, Any], image: Image.Image, words: list[str]
) -> tuple[str, bool, str, list[str]]:
    """(caption, whether it came from the cache, prompt, appended words) with the configured captioner."""
    from elbo_t2ialign import captions
    from elbo_t2ialign.core.adapters import resolve_device

    try:
        captioner, cache = captions.from_config(conf.get("caption") or {}, resolve_device(conf.get("device")))
        text = cache.caption(image, captioner)
    except captions.DamagedCacheError:
        raise
    except captions.CaptionError as err:
        raise ExplainError(str(err)) from None
    return (text, cache.hits > 0, *with_words(text, words))


def run(
    conf: dict[str, Any],
    image_path: str,
    words: list[str],
    prompt: str | None = None,
    caption: bool = False,
    aligner: Any = None,
) -> dict[str, Any]:
    """Compute the maps and write the folder; returns what result.json holds (with "folder").
    `aligner`: an already loaded one (its options are replaced by the config's)."""
    options = _options(conf)
    if not words:
        raise ExplainError(
            "give at least one word to map, e.g. `python -m elbo_t2ialign.explain img.png cat dog`"
        )
    if prompt is not None and caption:
        raise ExplainError("give --prompt or --caption, not both")
    if prompt is not None and not prompt.strip():
        raise ExplainError("--prompt is empty")
    image = _image(image_path)
    text = appended = cached = None
    if caption:
        text, cached, prompt, appended = caption_prompt(conf, image, words)
    aligner = aligner or load_aligner(conf, options)
    try:
        if prompt is None:
            result = aligner.heatmaps(image, list(words), **options.to_dict())
        else:
            result = aligner.heatmaps(image, list(words), prompt=prompt, **options.to_dict())
    except (TypeError, ValueError) as err:
        raise ExplainError(one_line(err)) from None

    from elbo_t2ialign.captions import image_digest

    info = {
        "image": str(image_path),
        "image_sha256": image_digest(image),
        "words": list(result.heatmaps),
        "mode": "caption" if caption else "prompt" if prompt is not None else "classes",
        "caption": text,
        "caption_from_cache": cached,
        "appended_to_caption": appended,
        "prompts": result.prompts,
        "collect_prompts": result.evidence.collect_prompts if result.evidence is not None else None,
        "prompt_of": result.prompt_of,
        "token_positions": result.token_positions,
        "tau": result.tau,
        "losses": result.losses,
        "files": None,
        "model": conf.get("model"),
        "elbo_options": options.to_dict(),
        "git": git_revision(),
    }
    root, stem = Path(conf.get("output_dir") or "runs/explain"), Path(image_path).stem
    stage = staging_folder(root, stem)
    try:
        with writing(root):
            info["files"] = write_maps(stage, conf, options, result, image)
            write_json_atomic(stage / "result.json", info)
            folder = publish(stage, root, stem)
    except BaseException:  # a full disk, Ctrl-C: no half-written folder is left
        discard_temp_dir(stage)
        raise
    return info | {"folder": str(folder)}


def write_maps(
    folder: Path, conf: dict[str, Any], options: AlignOptions, result: Any, image: Image.Image
) -> dict[str, dict[str, str]]:
    """Each word's maps (.npy, .png) and figure.png into `folder`; returns word -> kind -> file stem."""
    from elbo_t2ialign.plotting import heatmap
    from elbo_t2ialign.segmentation.runner import to_uint8

    files: dict[str, dict[str, str]] = {}
    for word, stem in file_names(list(result.heatmaps)).items():
        files[word] = {}
        for kind in KINDS:
            heat = np.asarray(heatmap(result, word, kind), dtype=np.float32)
            np.save(folder / f"{stem}.{kind}.npy", heat)
            Image.fromarray(to_uint8(heat, heat.shape, f"{word} {kind}")).save(folder / f"{stem}.{kind}.png")
            files[word][kind] = f"{stem}.{kind}"
    evidence = getattr(result, "evidence", None)
    if evidence is not None and evidence.tokens is not None:  # every word of the prompt(s), later
        tokens = evidence.tokens.detach().cpu().float()
        side = evidence.grid
        np.save(
            folder / "tokens.npy", tokens.reshape(len(tokens), side, side, -1).numpy(), allow_pickle=False
        )
    title = f"{result.prompts['collect']}   (strength {options.strength:g})"
    fig = result.plot(
        image, alpha=float(conf.get("alpha", 0.5)), cmap=str(conf.get("cmap", "jet")), title=title
    )
    fig.savefig(folder / "figure.png", dpi=int(conf.get("dpi", 100)))
    return files


def report(info: dict[str, Any]) -> str:
    lines = []
    if info["caption"] is not None:
        source = " (from the cache)" if info["caption_from_cache"] else ""
        lines.append(
            f"caption{source}: {info['caption']}"
            + (
                f"  (appended: {', '.join(info['appended_to_caption'])})"
                if info["appended_to_caption"]
                else ""
            )
        )
    lines.append(f"prompt: {info['prompts']['collect']}")
    width = max(len(w) for w in info["words"])
    for word in info["words"]:
        loss = info["losses"][word]
        lines.append(
            f"  {word:<{width}}  tokens {info['token_positions'][word]}  "
            f"loss {'-' if loss is None else f'{loss:.5g}'}  tau {info['tau'][word]:.3g}"
        )
    folder = Path(info["folder"])
    lines.append(f"figure: {folder / 'figure.png'}")
    lines.append(f"maps:   {folder}/<word>.{{baseline,elbo,cross}}.{{npy,png}}, tokens.npy, result.json")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args, words, overrides = parse_args(argv)
    debug = debug_requested(["--debug"] if args.debug else [])[0]
    from elbo_t2ialign.core.memory import print_plans

    print_plans()  # the memory plan, before the model loads
    info, code = cli_run(
        lambda: run(compose(overrides), args.image, words, prompt=args.prompt, caption=args.caption),
        (ExplainError,),
        debug,
    )
    if code:
        return code
    print(report(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
