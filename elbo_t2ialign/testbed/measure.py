"""Check that a testbed model uses its text, and how well its attention segments, measured through
the package's core (`Aligner`, its adapter and recorder) and the segmentation metrics: the numbers
are those of the method itself, not of a second implementation.

    python -m elbo_t2ialign.testbed.measure                       # the committed model
    python -m elbo_t2ialign.testbed.measure --model runs/x --images 100

Prints, on held-out scenes of the shapes world:

1. the loss gap: denoising loss (`core.elbo.elbo_losses`, shared noise) at several noise
   levels with the right caption, the caption with one class left out, a wrong caption (other
   shapes and colours), the empty caption, and the method's class-list prompt with the right and
   with wrong classes;
2. the attention mass on the class tokens: inside each object, the share of cross-attention
   probability on that object's class tokens, on the other class tokens of the prompt, and on
   everything else (BOS, "a photo of", commas, padding), per cross layer (`Aligner.record`);
3. the mIoU of the cross-attention maps (`cross`: no exponent, no refinement) per set of
   collection timesteps, beside the trivial baseline that gives every present class a uniform map;
4. with `--full`, the method's maps from the same network passes (`Evidence`): `elbo`
   (ELBO-calibrated, refined), `baseline` (tau 1, refined) and `cross_elbo` (calibrated, unrefined).

mIoU is the evaluator's: maps quantised to 8 bits as a run folder stores them, every threshold
0.01-0.99 read from one histogram (`segmentation.metrics.SweepAccumulator`), the best reported.
The Aligner's options are `configs/elbo/shapes.yaml` (the demo's; `--elbo NAME` for another).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from elbo_t2ialign.cli import hydra_config_dir
from elbo_t2ialign.core import calibrate
from elbo_t2ialign.core.aligner import Aligner
from elbo_t2ialign.core.elbo import elbo_losses
from elbo_t2ialign.core.options import AlignOptions
from elbo_t2ialign.segmentation.metrics import SweepAccumulator, best_threshold
from elbo_t2ialign.segmentation.runner import to_uint8
from elbo_t2ialign.testbed import world
from elbo_t2ialign.testbed.train import DEFAULT_MODEL_DIR

NUM_CLASSES = len(world.CLASSES) + 1  # with background
LOSS_LEVELS = (50, 200, 400, 600, 800, 950)


def method_options(elbo: str = "shapes") -> AlignOptions:
    """The method options of `configs/elbo/<elbo>.yaml` (shapes: the demo's)."""
    with initialize_config_dir(config_dir=hydra_config_dir(), version_base="1.3"):
        cfg = compose("segment", overrides=[f"elbo={elbo}"])
    return AlignOptions.from_mapping(dict(cfg.elbo))


def load(model: str | Path, device: str = "cpu", elbo: str = "shapes") -> Aligner:
    return Aligner.from_pretrained(str(model), device=device, dtype="float32", options=method_options(elbo))


class Sweep:
    """mIoU of image-sized [0, 1] maps at the best threshold, as the evaluator computes it."""

    def __init__(self) -> None:
        self.acc = SweepAccumulator(NUM_CLASSES)

    def add(self, maps: list[np.ndarray], class_ids: list[int], gt: np.ndarray) -> None:
        quantised = [to_uint8(m, gt.shape, "map") for m in maps]
        self.acc.add(gt, class_ids, np.stack(quantised))

    def best(self) -> tuple[float, float]:
        """(mIoU x 100, threshold) at the best threshold."""
        curve = self.acc.curve()
        th = best_threshold(curve)
        return float(np.nanmax(curve)), th


def class_ids(classes: list[str]) -> list[int]:
    return [world.CLASSES.index(c) + 1 for c in classes]


# ---------------------------------------------------------------- 1. loss gap


def _wrong_classes(classes: list[str], rng: np.random.Generator) -> list[str]:
    """As many classes as the scene has, none of them in it."""
    others = [c for c in world.CLASSES if c not in classes]
    return [others[i] for i in rng.choice(len(others), size=len(classes), replace=False)]


def loss_gap(aligner: Aligner, samples, levels=LOSS_LEVELS, seed: int = 0) -> dict:
    """Mean diffusion loss per caption kind and noise level, the same noise for every caption."""
    adapter = aligner.adapter
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    rows = ["right", "one class left out", "wrong", "empty", "class list right", "class list wrong"]
    total = np.zeros((len(rows), len(levels)))
    samples = [s for s in samples if len(s.objects) >= 2]  # so that one class can be left out
    for s in samples:
        z0 = adapter.encode_image(Image.fromarray(s.image))
        noise = torch.randn((len(levels), *z0.shape[1:]), generator=gen)
        wrong = _wrong_classes(s.classes, rng)
        prompts = [
            world.caption(s.classes),
            world.caption(s.classes[1:]),
            world.caption(wrong),
            "",
            world.class_list_caption(s.classes),
            world.class_list_caption(wrong),
        ]
        conds = [adapter.encode_prompt(p) for p in prompts]
        losses, _ = elbo_losses(adapter, z0, conds, list(levels), noise, aligner.options.batch_size)
        total += losses.numpy()
    mean = total / max(len(samples), 1)
    return {
        "levels": list(levels),
        "loss": dict(zip(rows, mean.tolist(), strict=True)),
        "images": len(samples),
    }


# ------------------------------------------------------- 2. attention mass


def downsample_mask(mask: np.ndarray, res: int) -> np.ndarray:
    """Majority label of each cell of a res x res grid over the mask."""
    f = mask.shape[0] // res
    cells = mask.reshape(res, f, res, f).transpose(0, 2, 1, 3).reshape(res, res, -1)
    counts = np.stack([(cells == c).sum(-1) for c in range(NUM_CLASSES)])
    return counts.argmax(0)


def token_mass(cross: np.ndarray, gt: np.ndarray, ids: list[int], positions: list[list[int]]):
    """For each class present in `gt` (the layer's grid, flattened): (own, other classes) mean mass
    of its pixels' attention rows (cross: (R*R, L) probabilities) on its tokens / the others'."""
    all_pos = sorted(p for ps in positions for p in ps)
    out = []
    for c_id, pos in zip(ids, positions, strict=True):
        inside = gt == c_id
        if inside.any():
            own = cross[inside][:, pos].sum(-1).mean()
            out.append((c_id, float(own), float(cross[inside][:, all_pos].sum(-1).mean() - own)))
    return out


def attention_mass(aligner: Aligner, samples, seed: int = 0) -> dict:
    """Share of each object's cross-attention on its own class tokens, per cross layer, and at the
    finest cross layers: own, other classes, rest."""
    opts = aligner.options
    start = calibrate.template_start(aligner.adapter.token_ids, opts.collect_prompt)
    cross_layers = [layer for layer in aligner.layers if layer.has_cross]
    finest = max(layer.resolution for layer in cross_layers)
    per_layer: dict[str, list[float]] = {layer.name: [] for layer in cross_layers}
    mass: dict[str, list[float]] = {"own": [], "other classes": [], "rest": []}
    for i, s in enumerate(samples):
        classes = list(dict.fromkeys(s.classes))
        prompt = opts.collect_prompt.format(", ".join(classes))
        found = calibrate.class_token_positions(aligner.adapter.token_ids, prompt, classes, start)
        rec = aligner.record(Image.fromarray(s.image), prompt, seed=seed + i)
        for layer in cross_layers:
            cross = rec.layer_mean(layer.name, "cross").cpu().numpy()
            gt = downsample_mask(s.mask, layer.resolution).ravel()
            for _, own, other in token_mass(cross, gt, class_ids(classes), [found[c] for c in classes]):
                per_layer[layer.name].append(own)
                if layer.resolution == finest:
                    mass["own"].append(own)
                    mass["other classes"].append(other)
                    mass["rest"].append(1 - own - other)
    return {
        "finest": {k: float(np.mean(v)) for k, v in mass.items()},
        "own_per_layer": {k: float(np.mean(v)) for k, v in per_layer.items()},
    }


# ------------------------------------------------------------------ 3-4. mIoU


def segmentation_miou(
    aligner: Aligner, samples, timestep_sets: dict, full: bool = False, seed: int = 0
) -> dict:
    """mIoU of the cross-attention maps per collection-timestep set, of uniform maps, and with
    `full` of the method's maps (first timestep set), each image's maps from one `observe`."""
    opts = aligner.options
    uniform = Sweep()
    cross = {key: Sweep() for key in timestep_sets}
    method = {k: Sweep() for k in (("elbo", "baseline", "cross_elbo") if full else ())}
    first = next(iter(timestep_sets))
    for i, s in enumerate(samples):
        classes = list(dict.fromkeys(s.classes))
        ids = class_ids(classes)
        uniform.add([np.full(s.mask.shape, 0.5)] * len(ids), ids, s.mask)
        for key, timesteps in timestep_sets.items():
            with_elbo = full and key == first
            evidence = aligner.observe(
                Image.fromarray(s.image),
                classes,
                seed=seed + i,
                options=opts.replace(collect_timesteps=list(timesteps)),
                need_elbo=with_elbo,
            )
            maps = evidence.maps(1.0, refine=False)
            cross[key].add([maps[c] for c in classes], ids, s.mask)
            if with_elbo:
                settings = {
                    "elbo": evidence.maps(opts.strength),
                    "baseline": evidence.maps(1.0),
                    "cross_elbo": evidence.maps(opts.strength, refine=False),
                }
                for name, got in settings.items():
                    method[name].add([got[c] for c in classes], ids, s.mask)
    return {
        "uniform": uniform.best(),
        "cross": {key: sweep.best() for key, sweep in cross.items()},
        "method": {key: sweep.best() for key, sweep in method.items()},
    }


# ---------------------------------------------------------------- report


def print_report(gap: dict, mass: dict, miou: dict) -> None:
    print(
        f"\nLoss gap (diffusion loss x 1000, shared noise, {gap['images']} held-out images with 2-3 shapes)"
    )
    print(f"{'caption':<20}" + "".join(f"{'t=' + str(t):>9}" for t in gap["levels"]) + f"{'mean':>9}")
    for row, values in gap["loss"].items():
        print(f"{row:<20}" + "".join(f"{1000 * x:9.2f}" for x in values) + f"{1000 * np.mean(values):9.2f}")
    m = mass["finest"]
    print("\nCross-attention mass inside each object (finest layers, collection prompt 'a photo of c1, c2'):")
    print(
        f"  own class tokens {m['own']:.3f}   other class tokens {m['other classes']:.3f}   rest {m['rest']:.3f}"
    )
    per_layer = ", ".join(f"{v:.3f}" for v in mass["own_per_layer"].values())
    print(f"  own class tokens per cross layer (down, mid, up): {per_layer}")
    print(f"\nmIoU (x100, best threshold), uniform maps: {miou['uniform'][0]:.1f}")
    for key, (value, th) in miou["cross"].items():
        print(f"  cross (no exponent, no refinement), t={key}: {value:.1f} (th {th:.2f})")
    for key, (value, th) in miou["method"].items():
        print(f"  {key}: {value:.1f} (th {th:.2f})")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Loss gap, attention mass and mIoU of a testbed model.")
    p.add_argument(
        "--model", default=str(DEFAULT_MODEL_DIR), help="pipeline folder, or a training checkpoint.pt"
    )
    p.add_argument("--images", type=int, default=100, help="held-out scenes (val split)")
    p.add_argument("--split", default="val")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--full", action="store_true", help="also the method's maps (elbo, baseline, cross_elbo)")
    p.add_argument("--sweep-timesteps", action="store_true", help="cross mIoU per single collection timestep")
    p.add_argument(
        "--elbo", default="shapes", help="method options: configs/elbo/<name>.yaml (default: the demo's)"
    )
    p.add_argument("--json", default=None, help="also write the numbers here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if args.model.endswith(".pt"):  # a training checkpoint: export it as a pipeline first
        from elbo_t2ialign.testbed.train import export_checkpoint

        folder = Path(args.model).with_suffix("")
        export_checkpoint(args.model, folder)
        args.model = str(folder)
    aligner = load(args.model, args.device, args.elbo)
    samples = [world.generate(i, split=args.split) for i in range(args.images)]
    gap = loss_gap(aligner, samples[: min(len(samples), 150)])
    mass = attention_mass(aligner, samples)
    sets = {"20..200": aligner.options.collect_timesteps}
    if args.sweep_timesteps:
        sets |= {str(t): [t] for t in (20, 100, 200, 400, 600, 800)}
    miou = segmentation_miou(aligner, samples, sets, full=args.full)
    print_report(gap, mass, miou)
    print(f"\n({len(samples)} images, {time.perf_counter() - t0:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps({"loss_gap": gap, "attention": mass, "miou": miou}, indent=1))


if __name__ == "__main__":
    main()
