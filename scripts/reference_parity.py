"""Run the reference implementation's own code side by side with this project and print one table of
how far every result is apart: heatmaps (ELBO losses, taus, calibrated maps) for every family the
reference supports, generation (noun phrases, per-step weights, final latents, images) at its
defaults and at the edge cases, the evaluator (fixed thresholds, its threshold search, its size
buckets, its dense CRF) and the prompt syntax.

Needs a checkout of the reference (github VCG-team/elbo-t2ialign) and its extra imports `einops`
and `joblib` (`pip install einops joblib`); `cv2`, used by the reference only to write PNGs, is stubbed, and so is its
CRF module `denseCRF` when SimpleCRF is not installed (`pip install simplecrf`; with numpy 2 it
builds with CFLAGS=-DNPY_IN_ARRAY=NPY_ARRAY_IN_ARRAY), which drops the reference CRF rows. Models:
the tiny pipelines of `elbo_t2ialign.devtools.tiny` (attention sharpened for the heatmaps, as the
bench does) and, for the evaluator, the bundled testbed model on shapes images in VOC layout (masks
with a 255 border). Offline, CPU, about two minutes:

    python scripts/reference_parity.py --reference ../elbo-t2ialign
    python scripts/reference_parity.py --reference ../elbo-t2ialign --only heatmaps --families SD1.5
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import runpy
import sys
import tempfile
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image

from elbo_t2ialign import Aligner
from elbo_t2ialign.core.adapters import adapter_for
from elbo_t2ialign.devtools.bench import ATTENTION_SHARPNESS, sharpen_attention
from elbo_t2ialign.devtools.tiny import BUILDERS

ROOT = Path(__file__).resolve().parents[1]
# family name -> (tiny builder, builder kwargs, keep T5)
FAMILIES = {
    "SD1.5": ("sd", {}, True),
    "SDXL": ("sdxl", {}, True),
    "SD3 + T5": ("sd3", {}, True),
    "SD3, no T5": ("sd3", {}, False),
    "SD3.5 (dual attn) + T5": ("sd3", {"dual_attention": True}, True),
}
GEN_FAMILIES = ("SD1.5", "SDXL", "SD3 + T5", "SD3, no T5")
PROMPT = "a photo of a cat and a dog on a red sofa"  # every word is in the tiny tokenizers' vocabulary
# generation settings: (label, steps, strength); 50 steps at 1.2 are the reference's defaults
GEN_SETTINGS = (("defaults", 50, 1.2), ("strength 0.8", 50, 0.8), ("7 steps", 7, 1.2))
SYNTAX_PROMPTS = ("a photo of cat (dog)", "cat+ dog", "cat- dog")


@dataclass
class Row:
    area: str
    family: str
    quantity: str
    input: str
    reference: str
    here: str
    difference: str


def num(x: float) -> str:
    return f"{x:.6g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.2e}"


def build(family: str):
    kind, kwargs, t5 = FAMILIES[family]
    pipe = BUILDERS[kind](**kwargs)
    if not t5:
        from diffusers import StableDiffusion3Pipeline

        pipe = StableDiffusion3Pipeline(**{**pipe.components, "text_encoder_3": None, "tokenizer_3": None})
    return pipe


def import_reference(path: Path) -> dict[str, Any]:
    """The reference's modules, importable offline on a CPU."""
    sys.path.insert(0, str(path))
    torch.compile = lambda module, **kw: module  # the reference compiles its VAE; not needed here
    sys.modules.setdefault("cv2", types.SimpleNamespace(imwrite=lambda *a, **k: None))
    try:
        import denseCRF  # noqa: F401  (SimpleCRF)

        crf = True
    except ImportError:
        sys.modules["denseCRF"] = types.SimpleNamespace(densecrf=None)
        crf = False
    import spacy

    from elbo_t2ialign.core.nlp import load_spacy

    spacy_load, nlp = spacy.load, load_spacy("en_core_web_sm")
    spacy.load = lambda *a, **k: nlp  # the same pipeline, which may be installed under an alias
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            import run_generation
            import run_segmentation
            from utils import attention_control, diffusion
    finally:
        spacy.load = spacy_load
    return {
        "seg": run_segmentation,
        "gen": run_generation,
        "att": attention_control,
        "Diffusion": diffusion.Diffusion,
        "crf": crf,
        "path": path,
    }


def quiet_diffusion(ref: dict[str, Any], pipe):
    with contextlib.redirect_stdout(io.StringIO()):  # compel's deprecation note for SDXL
        return ref["Diffusion"](pipe)


# ------------------------------------------------------------------ heatmaps


def stage_count(aligner: Aligner) -> int:
    """Runs of equal token-grid resolution among the self-attention layers (the reference's
    `cur_res_idx`, one per stage)."""
    res = [layer.resolution for layer in aligner.layers if layer.kind in ("self", "joint")]
    return 1 + sum(a != b for a, b in zip(res, res[1:], strict=False))


def heatmap_rows(family: str, ref: dict[str, Any], args) -> list[Row]:
    pipe = build(family)
    unet = hasattr(pipe, "unet")
    sharpen_attention(pipe.unet if unet else pipe.transformer, ATTENTION_SHARPNESS / 2)
    aligner = Aligner.from_pipeline(pipe, device="cpu", resolution=32)
    rng = np.random.RandomState(args.seed)
    image = Image.fromarray((rng.rand(args.height, args.width, 3) * 255).astype(np.uint8))
    ours = aligner.heatmaps(image, args.classes, seed=args.seed)
    n = stage_count(aligner)  # the method's [1,0,..,1] / [0,..,1] for this stage count (first_last, last)
    cfg = OmegaConf.create(
        {
            "cross_gaussian_var": aligner.options.gaussian_sigma,
            "self_weight": [[1] + [0] * max(n - 2, 0) + [1] * (n > 1), [0] * (n - 1) + [1]],
        }
    )

    # the reference's per-image loop (run_segmentation.py), fed the noise this project draws
    att = ref["att"]
    (pipe.unet if unet else pipe.transformer).set_attn_processor(
        att.AttnProcessor() if unet else att.JointAttnProcessor()
    )
    hook, diffusion = ref["seg"].AvgAttentionStoreHook(pipe), quiet_diffusion(ref, pipe)
    z = diffusion.encode_vae_image(image).float()
    collect_noise, elbo_noise = aligner._draw_noise(z, aligner.options, args.seed)
    losses = torch.stack(
        [
            sum(
                diffusion.get_elbo(z, diffusion.encode_prompt(f"a photo of {c}"), t, elbo_noise[i : i + 1])
                for i, t in enumerate(aligner.options.elbo_timesteps)
            )
            for c in args.classes
        ]
    )
    taus = 3.0 ** ((losses - losses.min()) / (losses.max() - losses.min() + 1e-10))
    emb = diffusion.encode_prompt("a photo of " + ", ".join(args.classes))
    hook.reset()
    for i, t in enumerate(aligner.options.collect_timesteps):
        diffusion.get_elbo(z, emb, t, collect_noise[i : i + 1], {"attention_hooks": [hook]})
    refined = att.aggregate_self_att(hook, 0, cfg)
    maps, loss_diff, tau_diff, cross_diff = 0.0, 0.0, 0.0, 0.0
    ours_cross = ours.evidence.maps(strength=3.0, refine=False)  # the `cross` variant of a segmentation run
    for k, c in enumerate(args.classes):
        cross = att.aggregate_cross_att(hook, 0, ours.token_positions[c], cfg)
        cross = ((cross - cross.min()) / (cross.max() - cross.min())) ** taus[k]
        r = round(cross.shape[0] ** 0.5)
        # save_cross_att: resized and clamped to [0, 1]; here resized and min-max normalised
        saved = F.interpolate(cross.view(1, 1, r, r), size=(args.height, args.width), mode="bilinear")
        cross_diff = max(cross_diff, float(np.abs(saved.clamp(0, 1)[0, 0].numpy() - ours_cross[c]).max()))
        mask = F.interpolate(
            (refined @ cross).view(1, 1, r, r), size=(args.height, args.width), mode="bilinear"
        )
        mask = ((mask - mask.min()) / (mask.max() - mask.min()))[0, 0].numpy()
        maps = max(maps, float(np.abs(mask - ours.heatmaps[c]).max()))
        loss_diff = max(loss_diff, abs(losses[k].item() - ours.losses[c]) / abs(losses[k].item()))
        tau_diff = max(tau_diff, abs(taus[k].item() - ours.tau[c]))
    latent = float((aligner.adapter.encode_image(image) - z).abs().max())
    shown = ", ".join(args.classes)
    inp = f"{args.width}x{args.height} random image, {shown}"
    ref_taus = " / ".join(f"{t:.4f}" for t in taus.tolist())
    our_taus = " / ".join(f"{ours.tau[c]:.4f}" for c in args.classes)
    return [
        Row(
            "heatmaps",
            family,
            "VAE latent (max abs) / summed ELBO losses (max rel) / calibrated heatmaps (max abs)",
            inp,
            "",
            "",
            f"{num(latent)} / {num(loss_diff)} / {num(maps)}",
        ),
        Row("heatmaps", family, "taus (max abs)", inp, ref_taus, our_taus, num(tau_diff)),
        Row(
            "heatmaps",
            family,
            "cross map before refinement (max abs)",
            inp,
            "clamped",
            "min-max",
            num(cross_diff),
        ),
    ]


# ------------------------------------------------------------------ generation


def reference_generation(ref: dict[str, Any], pipe, text: str, steps: int, strength: float, latent):
    """run_generation.py's per-prompt loop, as it reads, with the reference's own functions; the
    starting noise is given (the reference draws it from the global RNG)."""
    gen, diffusion = ref["gen"], quiet_diffusion(ref, pipe)
    gen.NON_ENTITY_KEYWORDS = set(
        OmegaConf.load(ref["path"] / "configs/run_generation.yaml").non_entity_keywords
    )
    ratio = diffusion.scheduler.config.num_train_timesteps // steps
    timesteps = list(range(diffusion.scheduler.config.num_train_timesteps - 1, 0, -ratio))
    with contextlib.redirect_stdout(io.StringIO()), torch.inference_mode():
        neg = diffusion.encode_prompt("")
        phrases = gen.extract_filtered_noun_phrases(text)
        phrases_emb = [diffusion.encode_prompt(p) for p in phrases]
        text_emb = diffusion.encode_prompt(text)
        weights, per_step = [1.0] * len(phrases), []
        for t_idx, t in enumerate(timesteps):
            pred_all = diffusion.get_model_prediction([latent], [t], [text_emb])
            if t_idx >= 50:  # elbo_timesteps: 50
                weights = [1.0] * len(phrases)
            elif len(phrases_emb) > 1:
                elbo = torch.stack(
                    [
                        F.mse_loss(pred_all, diffusion.get_model_prediction([latent], [t], [p]))
                        for p in phrases_emb
                    ]
                )
                elbo = (elbo - elbo.min()) / (elbo.max() - elbo.min())
                weights = torch.round(torch.pow(strength, elbo), decimals=2).tolist()
            emb = diffusion.encode_prompt(gen.generate_prompt(text, phrases, weights))
            cond, uncond = diffusion.get_model_prediction([latent, latent], [t, t], [emb, neg]).chunk(2)
            latent = diffusion.step(
                latent, t, max(0, t - ratio), diffusion.classifier_free_guidance(uncond, cond)
            )
            per_step.append(list(weights))
        image = diffusion.decode_latent(latent)[0]
    return phrases, per_step, latent, image, len(timesteps)


def generation_rows(family: str, ref: dict[str, Any], args) -> list[Row]:
    from elbo_t2ialign.generation.phrases import PhraseExtractor, load_stopwords
    from elbo_t2ialign.generation.sampler import ElboSampler

    extractor = PhraseExtractor.from_config(stopwords=load_stopwords(ROOT / "configs/phrases/default.yaml"))
    phrases = extractor(PROMPT)
    rows = []
    for label, steps, strength in GEN_SETTINGS:
        inp = f"{label}: {steps} steps, strength {strength}"
        pipe = build(family)
        theirs = None
        for syntax in ("plain", "compel"):
            adapter = adapter_for(pipe, torch.device("cpu"), torch.float32)
            sampler = ElboSampler(adapter, steps=steps, strength=strength, prompt_syntax=syntax)
            ours = sampler.sample(PROMPT, phrases, seed=args.seed)
            if theirs is None:
                start = sampler.initial_latent(args.seed).to(pipe.dtype)
                theirs = reference_generation(ref, pipe, PROMPT, steps, strength, start)
                ref_phrases, ref_weights, _, _, ref_steps = theirs
                rows.append(
                    Row(
                        "generation",
                        family,
                        "noun phrases; steps taken",
                        inp,
                        f"{len(ref_phrases)} phrases; {ref_steps}",
                        f"{len(phrases)} phrases; {len(ours.weights)}",
                        ("same phrases" if ref_phrases == phrases else "other phrases")
                        + f"; {len(ours.weights) - ref_steps:+d} steps",
                    )
                )
            _, ref_weights, ref_latent, ref_image, _ = theirs
            weights = max(
                (
                    abs(a - b)
                    for s, r in zip(ours.weights, ref_weights, strict=True)
                    for a, b in zip(s, r, strict=True)
                ),
                default=0.0,
            )
            latent = float((ours.latent - ref_latent.float()).abs().max())
            pixels = int(np.abs(np.asarray(ours.image, np.int16) - np.asarray(ref_image, np.int16)).max())
            span = f"{min(map(min, ours.weights)):.2f}-{max(map(max, ours.weights)):.2f}"
            ref_span = f"{min(map(min, ref_weights)):.2f}-{max(map(max, ref_weights)):.2f}"
            rows.append(
                Row(
                    "generation",
                    family,
                    f"weights (range; max abs) / final latent (max abs) / image (max levels), prompt_syntax={syntax}",
                    inp,
                    ref_span,
                    span,
                    f"{num(weights)} / {num(latent)} / {pixels}",
                )
            )
    return rows


# ------------------------------------------------------------------ prompts


def prompt_rows(ref: dict[str, Any]) -> list[Row]:
    from elbo_t2ialign.generation.weighting import compel_syntax

    rows = []
    text, phrases, weights = "a cat and a dog and a cat", ["a cat", "a dog", "a cat"], [1.1, 1.0, 1.2]
    theirs, ours = ref["gen"].generate_prompt(text, phrases, weights), compel_syntax(text, phrases, weights)
    rows.append(
        Row(
            "prompts",
            "all",
            "weighted prompt with a repeated phrase",
            f'"{text}", weights {weights}',
            f'"{theirs}"',
            f'"{ours}"',
            "differ" if theirs != ours.replace(")1 ", ")1.0 ") else "same",
        )
    )
    for family in ("SD1.5", "SDXL"):
        pipe = build(family)
        diffusion = quiet_diffusion(ref, pipe)
        for syntax in ("plain", "compel"):
            ad = adapter_for(pipe, torch.device("cpu"), torch.float32)
            ad.set_prompt_syntax(syntax)
            worst = 0.0
            for prompt in SYNTAX_PROMPTS:
                with contextlib.redirect_stdout(io.StringIO()):
                    emb = diffusion.encode_prompt(prompt)
                emb = emb[0] if isinstance(emb, tuple) else emb
                worst = max(
                    worst, float((ad.encode_prompt(prompt)["encoder_hidden_states"] - emb).abs().max())
                )
            rows.append(
                Row(
                    "prompts",
                    family,
                    f"token embeddings (max abs), prompt_syntax={syntax}",
                    ", ".join(f'"{p}"' for p in SYNTAX_PROMPTS),
                    "Compel",
                    syntax,
                    num(worst),
                )
            )
    return rows


# ------------------------------------------------------------------ evaluator


def write_voc_set(root: Path, count: int) -> Path:
    """The first `count` shapes val scenes in VOC layout (masks with 255 on object borders), and one
    more whose mask holds no object class (COCO has such images)."""
    from elbo_t2ialign.devtools.fixtures import encode_mask, write_dataset
    from elbo_t2ialign.testbed import world

    samples = {}
    for i in range(count + 1):
        s = world.generate(i, split="val")
        mask = encode_mask(s.mask.astype(np.int64), "voc") if i < count else np.zeros_like(s.mask)
        samples[s.name] = (s.image, mask)
    return write_dataset(root, list(world.CLASSES), samples, name="shapes-voc")


def segment(data: Path, out: Path) -> Path:
    from elbo_t2ialign.devtools.fixtures import fixture_config
    from elbo_t2ialign.segmentation import run

    model = {
        "name": "shapes",
        "id": str(ROOT / "elbo_t2ialign/testbed/model"),
        "resolution": None,
        "max_sequence_length": None,
        "dtype": "float32",
    }
    elbo = {
        "strength": 3.0,
        "self_weights_1": [0, 1, 0],
        "self_weights_2": [0, 1, 0],
    }  # configs/elbo/shapes.yaml
    return run(fixture_config(data, out, "voc", model=model, elbo=elbo, variants=["baseline", "elbo"]))


def reference_layout(run_dir: Path, data: Path, variant: str, out: Path) -> Path:
    """The run's maps as the reference's evaluator reads them, and its dataset config."""
    from elbo_t2ialign.testbed import world

    names = (data / "val_id.txt").read_text().split()
    (out / "heatmaps").mkdir(parents=True, exist_ok=True)
    for idx, name in enumerate(names):
        scores = json.loads((run_dir / "maps" / name / "scores.json").read_text())
        for cid in scores["class_ids"]:
            src = run_dir / "maps" / name / f"{variant}_{cid:03d}.png"
            Image.open(src).save(out / "heatmaps" / f"{idx}_{world.CLASSES[cid - 1]}.png")
    labels = {}
    for name in names:
        mask = np.asarray(Image.open(data / "masks" / f"{name}.png"))
        labels[name] = np.array([float(c in mask) for c in range(1, len(world.CLASSES) + 1)])
    np.save(out / "cls_labels.npy", labels, allow_pickle=True)  # the reference's format (a pickled dict)
    info = {
        "dataset": "voc",  # its ignore-pixel handling
        "data_root": str(data),
        "data_name_list": str(data / "val_id.txt"),
        "name_to_cls_labels": str(out / "cls_labels.npy"),
        "img_path": "{data_root}/images/{img_name}.png",
        "gt_path": "{data_root}/masks/{img_name}.png",
        "num_cls": len(world.CLASSES),
        "category": {c: [c] for c in world.CLASSES},
    }
    OmegaConf.save(OmegaConf.create(info), out / "info.yaml")
    return out


def reference_evaluate(ref: dict[str, Any], folder: Path) -> dict[str, Any]:
    """evaluate_segmentation.py run as a script (its binary search is in its __main__ block)."""
    argv = sys.argv
    sys.argv = [
        "evaluate_segmentation.py",
        "--dataset-cfg",
        str(folder / "info.yaml"),
        "--io-cfg",
        str(ref["path"] / "configs/io.yaml"),
        "--method-cfg",
        str(ref["path"] / "configs/evaluate_segmentation.yaml"),
        f"output_path={folder}",
        "n_jobs=1",
        f"enable_crf={ref['crf']}",
    ]
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            module = runpy.run_path(str(ref["path"] / "evaluate_segmentation.py"), run_name="__main__")
    finally:
        sys.argv = argv
    return module


def evaluator_rows(ref: dict[str, Any], args) -> list[Row]:
    from elbo_t2ialign.segmentation import evaluate
    from elbo_t2ialign.segmentation.crf import require

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = write_voc_set(tmp / "data", args.eval_images)
        run_dir = segment(data, tmp / "run")
        crf = True
        try:
            require()
        except Exception:  # noqa: BLE001  (pydensecrf missing: no CRF rows on either side)
            crf = False
        ours = {
            (search, buckets): evaluate(
                run_dir,
                out_dir=tmp / f"ours-{search}-{buckets}",
                progress=False,
                overlays=0,
                search=search,
                buckets=buckets,
                crf=crf and search == "binary",
            )
            for search, buckets in (("sweep", "equal"), ("binary", "fixed-size"))
        }
        confidence = (
            evaluate(
                run_dir,
                out_dir=tmp / "ours-confidence",
                progress=False,
                overlays=0,
                search="binary",
                crf=crf,
                crf_unary="confidence",
            )
            if crf
            else None
        )
        inp = f"testbed model, {args.eval_images} + 1 object-free shapes val images, VOC layout"
        for variant in ("baseline", "elbo"):
            folder = reference_layout(run_dir, data, variant, tmp / f"ref-{variant}")
            g = reference_evaluate(ref, folder)
            saved = json.loads((folder / "segmentation_metrics.json").read_text())
            mine, sweep = ours[("binary", "fixed-size")][variant], ours[("sweep", "equal")][variant]
            gt_and_predict = g["gt_and_predict"]
            worst = max(
                abs(
                    g["get_key_metric"](gt_and_predict, th)["key_metric"]
                    - sweep["curve"]["mIoU"][round(th * 100) - 1]
                )
                for th in (0.1, 0.3, 0.5, 0.7, 0.9)
            )
            rows.append(
                Row(
                    "evaluator",
                    variant,
                    "mIoU at fixed thresholds 0.1/0.3/0.5/0.7/0.9 (max abs)",
                    inp,
                    "",
                    "",
                    num(worst),
                )
            )
            ref_th, ref_miou = saved["best threshold"], saved["overall"]["m_IoU"][0]
            rows.append(
                Row(
                    "evaluator",
                    variant,
                    "threshold, reference's binary search (--search binary)",
                    inp,
                    f"{ref_th:.2f}",
                    f"{mine['threshold']:.2f}",
                    num(abs(ref_th - mine["threshold"])),
                )
            )
            rows.append(
                Row(
                    "evaluator",
                    variant,
                    "mIoU at that threshold",
                    inp,
                    f"{ref_miou:.4f}",
                    f"{mine['mIoU']:.4f}",
                    num(abs(ref_miou - mine["mIoU"])),
                )
            )
            rows.append(
                Row(
                    "evaluator",
                    variant,
                    "threshold and mIoU, exact sweep (default)",
                    inp,
                    f"{ref_th:.2f}: {ref_miou:.4f}",
                    f"{sweep['threshold']:.2f}: {sweep['mIoU']:.4f}",
                    num(sweep["mIoU"] - ref_miou),
                )
            )
            ref_buckets = saved["foreground(sort by t_area)"]["m_IoU"]
            our_buckets = [b["mIoU"] for b in mine["size_buckets"]]
            bucket_diff = max(
                (abs(a - b) for a, b in zip(ref_buckets, our_buckets, strict=True) if np.isfinite(a)),
                default=0.0,
            )
            same_empty = [not np.isfinite(a) for a in ref_buckets] == [
                not np.isfinite(b) for b in our_buckets
            ]
            counts = [b["count"] for b in mine["size_buckets"]]
            rows.append(
                Row(
                    "evaluator",
                    variant,
                    "10 size buckets, --buckets fixed-size (max abs mIoU)",
                    inp,
                    "",
                    f"counts {counts}",
                    num(bucket_diff) + ("" if same_empty else ", empty ones differ"),
                )
            )
            equal = [b["mIoU"] for b in sweep["size_buckets"]]
            rows.append(
                Row(
                    "evaluator",
                    variant,
                    "10 size buckets, equal counts (default) vs the reference's",
                    inp,
                    " / ".join(f"{x:.1f}" for x in ref_buckets),
                    " / ".join(f"{x:.1f}" for x in equal),
                    "max "
                    + num(max(abs(a - b) for a, b in zip(ref_buckets, equal, strict=True) if np.isfinite(a))),
                )
            )
            if not (crf and ref["crf"]):
                continue
            ref_crf = json.loads((folder / "segmentation_metrics_crf.json").read_text())["overall"]["m_IoU"][
                0
            ]
            # the same CRF with SimpleCRF's int8 labels widened first: ignore pixels stay 255, not -1
            module = g["densecrf"].__globals__  # run_path returns a copy; the functions keep the original
            real = module["denseCRF"]
            module["denseCRF"] = types.SimpleNamespace(
                densecrf=lambda i, p, param, real=real: real.densecrf(i, p, param).astype(np.uint8)
            )
            try:
                with contextlib.redirect_stderr(io.StringIO()):
                    stats = g["apply_threshold"](gt_and_predict, ref_th, enable_crf=True)
            finally:
                module["denseCRF"] = real
            fixed = g["apply_metrics"](stats, bucket_num=1)["m_IoU"][0]
            rows.append(
                Row(
                    "evaluator",
                    variant,
                    "CRF mIoU, onehot unary (default)",
                    inp,
                    f"{fixed:.4f} (int8 bug: {ref_crf:.4f})",
                    f"{mine['crf']['mIoU']:.4f}",
                    num(abs(fixed - mine["crf"]["mIoU"])),
                )
            )
            rows.append(
                Row(
                    "evaluator",
                    variant,
                    "CRF mIoU, reference's int8 ignore-pixel bug costs",
                    inp,
                    f"{ref_crf:.4f}",
                    f"{fixed:.4f}",
                    num(ref_crf - fixed),
                )
            )
            rows.append(
                Row(
                    "evaluator",
                    variant,
                    "CRF mIoU, --crf-unary confidence (0.7)",
                    inp,
                    f"{fixed:.4f}",
                    f"{confidence[variant]['crf']['mIoU']:.4f}",
                    num(confidence[variant]["crf"]["mIoU"] - fixed),
                )
            )
    return rows


def print_table(rows: list[Row]) -> None:
    header = ["area", "family / variant", "quantity", "input", "reference", "here", "difference"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        cells = [r.area, r.family, r.quantity, r.input, r.reference, r.here, r.difference]
        print("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")


def main(argv: list[str] | None = None) -> list[Row]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reference", required=True, help="folder of a checkout of the reference implementation")
    p.add_argument(
        "--only",
        nargs="+",
        choices=["heatmaps", "generation", "prompts", "evaluator"],
        default=["heatmaps", "generation", "prompts", "evaluator"],
    )
    p.add_argument("--families", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    p.add_argument("--width", type=int, default=56)
    p.add_argument("--height", type=int, default=40)
    p.add_argument("--seed", type=int, default=4307)
    p.add_argument("--classes", nargs="+", default=["cat", "plant", "dog"])
    p.add_argument("--eval-images", type=int, default=20, help="shapes images for the evaluator rows")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    start = time.time()
    import diffusers
    import transformers

    transformers.logging.set_verbosity_error()  # the reference's SD3 prompts are truncated, with a warning each
    diffusers.logging.set_verbosity_error()
    ref = import_reference(Path(args.reference).resolve())
    rows: list[Row] = []
    if "heatmaps" in args.only:
        for family in args.families:
            rows += heatmap_rows(family, ref, args)
    if "generation" in args.only:
        for family in (f for f in args.families if f in GEN_FAMILIES):
            rows += generation_rows(family, ref, args)
    if "prompts" in args.only:
        rows += prompt_rows(ref)
    if "evaluator" in args.only:
        rows += evaluator_rows(ref, args)
    print(f'generation: prompt "{PROMPT}", seed {args.seed}; heatmaps: seed {args.seed}\n')
    print_table(rows)
    print(
        f"\n{len(rows)} rows in {time.time() - start:.0f} s; SimpleCRF {'found' if ref['crf'] else 'not installed'}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps([r.__dict__ for r in rows], indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
