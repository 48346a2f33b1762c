"""Check that a testbed model uses its text, and how well its attention segments.

    python -m elbo_t2ialign.testbed.measure                       # the committed model
    python -m elbo_t2ialign.testbed.measure --model runs/x --images 100

Prints, on held-out scenes of the shapes world:

1. the loss gap: denoising loss (epsilon MSE, shared noise) at several noise
   levels with the right caption, the same shapes with their colours swapped,
   a wrong caption (other shapes and colours), the empty caption, and the
   method's class-list prompt with the right and with wrong classes;
2. the attention mass on the class tokens: inside each object, the share of
   cross-attention probability on that object's class token, on the other
   class tokens of the prompt, and on everything else (BOS, "a photo of",
   commas, padding);
3. raw cross-attention mIoU (PROTOCOL 4-6 without calibration or refinement,
   computed by this module's own probe) against the collection timestep(s),
   beside the trivial baseline that gives every present class a uniform map;
4. with `--full`, the same mIoU from this probe with self-attention
   refinement, with and without the ELBO calibration; and, where the
   package's `Aligner` imports, the full method through it.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from elbo_t2ialign.testbed import world
from elbo_t2ialign.testbed.train import DEFAULT_MODEL_DIR

COLLECT_TIMESTEPS = list(range(20, 201, 20))
ELBO_TIMESTEPS = list(range(1, 999, 50))
THRESHOLDS = np.round(np.arange(0.05, 0.951, 0.05), 2)


# --------------------------------------------------------------- capturing


class _CaptureProcessor:
    """Plain (non-fused) attention that also adds head-averaged probabilities to a store."""

    def __init__(self, store: dict, name: str):
        self.store, self.name = store, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        residual = hidden_states
        batch = hidden_states.shape[0]
        query = attn.to_q(hidden_states)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        key, value = attn.to_k(context), attn.to_v(context)
        q, k, v = (attn.head_to_batch_dim(x) for x in (query, key, value))
        probs = attn.get_attention_scores(q, k, None)  # (B * heads, N, L)
        if self.store.get("on", True):
            mean = probs.view(batch, attn.heads, *probs.shape[1:]).mean(1)  # (B, N, L)
            self.store.setdefault(self.name, []).append(mean.detach().float())
        out = attn.batch_to_head_dim(torch.bmm(probs, v))
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


@dataclass
class Layer:
    name: str
    kind: str  # "cross" or "self"
    path: str  # "down", "mid" or "up"
    resolution: int


def attention_layers(unet, latent_size: int) -> list[Layer]:
    """Attention layers in the order the network runs them, with their resolution."""
    layers = []
    down = [b for b in unet.down_blocks]
    size = latent_size
    for block in down:
        for a in getattr(block, "attentions", []) or []:
            for name, mod in a.named_modules():
                if name.endswith("attn1") or name.endswith("attn2"):
                    full = _full_name(unet, mod)
                    layers.append(Layer(full, "self" if name.endswith("attn1") else "cross", "down", size))
        if getattr(block, "downsamplers", None):
            size //= 2
    for a in getattr(unet.mid_block, "attentions", []) or []:
        for name, mod in a.named_modules():
            if name.endswith("attn1") or name.endswith("attn2"):
                layers.append(Layer(_full_name(unet, mod), "self" if name.endswith("attn1") else "cross", "mid", size))
    for block in unet.up_blocks:
        for a in getattr(block, "attentions", []) or []:
            for name, mod in a.named_modules():
                if name.endswith("attn1") or name.endswith("attn2"):
                    layers.append(Layer(_full_name(unet, mod), "self" if name.endswith("attn1") else "cross", "up", size))
        if getattr(block, "upsamplers", None):
            size *= 2
    return layers


def _full_name(root, module) -> str:
    for name, mod in root.named_modules():
        if mod is module:
            return name
    raise KeyError(module)


def gaussian_weights(layers: list[Layer], sigma: float = 3.0) -> np.ndarray:
    """PROTOCOL 5: Gaussian over the cross layer index, centred on the mid block, summing to the count."""
    n_down = sum(1 for lay in layers if lay.path == "down")
    n_mid = sum(1 for lay in layers if lay.path == "mid")
    centre = n_down + (n_mid - 1) / 2
    w = np.exp(-((np.arange(len(layers)) - centre) ** 2) / (2 * sigma**2))
    return w * len(layers) / w.sum()


# ------------------------------------------------------------------- probe


class Probe:
    """A loaded testbed pipeline with the few operations the measurements need."""

    def __init__(self, folder: str | Path, device: str = "cpu"):
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(
            str(folder), safety_checker=None, requires_safety_checker=False
        )
        self.pipe = pipe
        self.vae, self.unet, self.text_encoder = pipe.vae.eval(), pipe.unet.eval(), pipe.text_encoder.eval()
        self.tokenizer = pipe.tokenizer
        self.device = device
        for m in (self.vae, self.unet, self.text_encoder):
            m.to(device=device, dtype=torch.float32)
        self.alphas = pipe.scheduler.alphas_cumprod.to(device)
        self.latent_size = self.unet.config.sample_size
        layers = attention_layers(self.unet, self.latent_size)
        self.cross = [lay for lay in layers if lay.kind == "cross"]
        self.self_layers = [lay for lay in layers if lay.kind == "self"]
        self.store: dict = {}
        self.cross_weights = gaussian_weights(self.cross)
        self._text_cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def latent(self, image: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(image).permute(2, 0, 1)[None].float().div(127.5).sub(1).to(self.device)
        size = self.vae.config.sample_size
        if x.shape[-1] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        z = self.vae.encode(x).latent_dist.mean
        return z * self.vae.config.scaling_factor  # (1, 4, h, w)

    @torch.no_grad()
    def text(self, prompts: list[str]) -> torch.Tensor:
        missing = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if missing:
            ids = self.tokenizer(
                missing, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt"
            ).input_ids.to(self.device)
            for p, e in zip(missing, self.text_encoder(ids)[0], strict=True):
                self._text_cache[p] = e
        return torch.stack([self._text_cache[p] for p in prompts])

    def noisy(self, z0, t: torch.Tensor, eps):
        a = self.alphas[t].sqrt().view(-1, 1, 1, 1)
        return a * z0 + (1 - self.alphas[t]).sqrt().view(-1, 1, 1, 1) * eps

    @torch.no_grad()
    def losses(self, z0, timesteps, eps, prompts: list[str]) -> np.ndarray:
        """Epsilon MSE per (prompt, timestep): (P, T); eps (T, 4, h, w) shared by all prompts."""
        t = torch.tensor(timesteps, device=self.device)
        zt = self.noisy(z0.expand(len(timesteps), -1, -1, -1), t, eps)  # (T, 4, h, w)
        out = np.zeros((len(prompts), len(timesteps)))
        for i, p in enumerate(prompts):
            cond = self.text([p]).expand(len(timesteps), -1, -1)
            pred = self.unet(zt, t, encoder_hidden_states=cond).sample
            out[i] = ((pred - eps) ** 2).mean(dim=(1, 2, 3)).cpu().numpy()
        return out

    @torch.no_grad()
    def attention(self, z0, prompt: str, timesteps, gen: torch.Generator, self_attention: bool = False):
        """Head- and timestep-averaged attention maps per layer name: cross (N, L), self (N, N)."""
        names = [lay.name for lay in self.cross] + ([lay.name for lay in self.self_layers] if self_attention else [])
        procs = self.unet.attn_processors
        new = {k: (_CaptureProcessor(self.store, k.removesuffix(".processor")) if k.removesuffix(".processor") in names else v) for k, v in procs.items()}
        self.store.clear()
        self.unet.set_attn_processor(new)
        try:
            t = torch.tensor(timesteps, device=self.device)
            eps = torch.randn((len(timesteps), *z0.shape[1:]), generator=gen).to(self.device)
            zt = self.noisy(z0.expand(len(timesteps), -1, -1, -1), t, eps)
            cond = self.text([prompt]).expand(len(timesteps), -1, -1)
            self.unet(zt, t, encoder_hidden_states=cond)
        finally:
            self.unet.set_attn_processor(procs)
        return {k: torch.cat(v).mean(0) for k, v in self.store.items() if k in names}

    def token_positions(self, prompt: str, word: str) -> list[int]:
        ids = self.tokenizer(prompt).input_ids
        sub = self.tokenizer(word, add_special_tokens=False).input_ids
        for i in range(len(ids) - len(sub) + 1):
            if ids[i : i + len(sub)] == sub:
                return list(range(i, i + len(sub)))
        raise ValueError(f"{word!r} is not in the tokens of {prompt!r}")

    def class_maps(self, maps: dict, prompt: str, classes: list[str], layers=None, weights=None) -> np.ndarray:
        """Raw cross-attention map per class at the finest resolution, (K, R, R), not normalised."""
        layers = self.cross if layers is None else layers
        weights = self.cross_weights if weights is None else weights
        res = max(lay.resolution for lay in layers)
        out = []
        for c in classes:
            pos = self.token_positions(prompt, c)
            acc = torch.zeros(res, res, device=self.device)
            for lay, w in zip(layers, weights, strict=True):
                m = maps[lay.name][:, pos].mean(-1).view(1, 1, lay.resolution, lay.resolution)
                acc += w * F.interpolate(m, size=(res, res), mode="bilinear", align_corners=False)[0, 0]
            out.append(acc / sum(weights))
        return torch.stack(out).cpu().numpy()

    def refine(self, maps: dict, cross: np.ndarray) -> np.ndarray:
        """PROTOCOL 5 self-attention refinement with the finest down+up and finest up layers."""
        res = max(lay.resolution for lay in self.self_layers)
        fine = [lay for lay in self.self_layers if lay.resolution == res]
        s1 = torch.stack([maps[lay.name] for lay in fine if lay.path in ("down", "up")]).mean(0)
        s2 = torch.stack([maps[lay.name] for lay in fine if lay.path == "up"]).mean(0)
        a = torch.from_numpy(cross).to(s1).view(len(cross), -1).T  # (R*R, K)
        return (s2 @ (s1 @ a)).T.reshape(cross.shape).cpu().numpy()


def normalise(maps: np.ndarray) -> np.ndarray:
    lo = maps.reshape(len(maps), -1).min(1)[:, None, None]
    hi = maps.reshape(len(maps), -1).max(1)[:, None, None]
    return (maps - lo) / (hi - lo + 1e-10)


def to_image_size(maps: np.ndarray, size: int = world.IMAGE_SIZE) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(maps)).float()[None]
    return F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[0].numpy()


# ---------------------------------------------------------------- metrics


class SweepMIoU:
    """PROTOCOL 6 accumulators for every threshold at once (background = class 0)."""

    def __init__(self, num_classes: int = len(world.CLASSES) + 1, thresholds=THRESHOLDS):
        self.th = np.asarray(thresholds)
        self.n = num_classes
        self.tp = np.zeros((len(self.th), num_classes))
        self.pred = np.zeros((len(self.th), num_classes))
        self.gt = np.zeros(num_classes)

    def add(self, maps: np.ndarray, class_ids: list[int], gt: np.ndarray) -> None:
        """maps (K, H, W) in [0, 1] for the image's classes `class_ids`."""
        best = maps.argmax(0)
        value = maps.max(0)
        ids = np.asarray(class_ids)[best]
        self.gt += np.bincount(gt.ravel(), minlength=self.n)[: self.n]
        for i, th in enumerate(self.th):
            label = np.where(value >= th, ids, 0)
            self.pred[i] += np.bincount(label.ravel(), minlength=self.n)
            self.tp[i] += np.bincount(label[label == gt], minlength=self.n)

    def miou(self) -> np.ndarray:
        """mIoU x 100 per threshold, over classes present in prediction or ground truth."""
        union = self.gt[None] + self.pred - self.tp
        iou = np.where(union > 0, self.tp / np.maximum(union, 1), np.nan)
        return np.nanmean(iou, axis=1) * 100

    def best(self) -> tuple[float, float]:
        m = self.miou()
        i = int(np.nanargmax(m))
        return float(m[i]), float(self.th[i])


# ---------------------------------------------------------- measurements


def _wrong_classes(classes, rng) -> list[str]:
    """As many classes as the scene has, none of them in it."""
    others = [c for c in world.CLASSES if c not in classes]
    return [others[i] for i in rng.choice(len(others), size=len(classes), replace=False)]


def loss_gap(probe: Probe, samples, levels=(50, 200, 400, 600, 800, 950), seed: int = 0) -> dict:
    """Mean epsilon MSE per caption kind and noise level, the same noise for every caption."""
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    rows = ["right", "one class left out", "wrong", "empty", "class list right", "class list wrong"]
    acc = {r: np.zeros(len(levels)) for r in rows}
    samples = [s for s in samples if len(s.objects) >= 2]  # so that one class can be left out
    for s in samples:
        z0 = probe.latent(s.image)
        eps = torch.randn((len(levels), *z0.shape[1:]), generator=gen).to(probe.device)
        wrong = _wrong_classes(s.classes, rng)
        prompts = [
            world.caption(s.classes),
            world.caption(s.classes[1:]),
            world.caption(wrong),
            "",
            world.class_list_caption(s.classes),
            world.class_list_caption(wrong),
        ]
        loss = probe.losses(z0, list(levels), eps, prompts)
        for r, row in zip(rows, loss, strict=True):
            acc[r] += row
    out = {r: (acc[r] / len(samples)).tolist() for r in rows}
    return {"levels": list(levels), "loss": out, "images": len(samples)}


def _downsample_mask(mask: np.ndarray, res: int) -> np.ndarray:
    f = mask.shape[0] // res
    # majority label of each f x f cell
    cells = mask.reshape(res, f, res, f).transpose(0, 2, 1, 3).reshape(res, res, -1)
    counts = np.stack([(cells == c).sum(-1) for c in range(len(world.CLASSES) + 1)])
    return counts.argmax(0)


def attention_and_miou(probe: Probe, samples, timestep_sets: dict, seed: int = 0, full: bool = False) -> dict:
    """Attention mass on class tokens and mIoU per collection-timestep set (raw cross attention)."""
    gen = torch.Generator().manual_seed(seed + 1)
    sweeps = {k: SweepMIoU() for k in timestep_sets}
    uniform = SweepMIoU()
    extra = {k: SweepMIoU() for k in (["refined", "refined+calibrated"] if full else [])}
    mass = {"own": [], "other classes": [], "rest": []}
    per_layer_own: dict[str, list] = {lay.name: [] for lay in probe.cross}
    default_key = next(iter(timestep_sets))
    for s in samples:
        z0 = probe.latent(s.image)
        classes = list(dict.fromkeys(s.classes))
        ids = [world.CLASSES.index(c) + 1 for c in classes]
        prompt = world.class_list_caption(classes)
        uniform.add(np.full((len(ids), *s.mask.shape), 0.5), ids, s.mask)
        for key, ts in timestep_sets.items():
            maps = probe.attention(z0, prompt, ts, gen, self_attention=full and key == default_key)
            cross = probe.class_maps(maps, prompt, classes)
            sweeps[key].add(to_image_size(normalise(cross)), ids, s.mask)
            if key != default_key:
                continue
            positions = [probe.token_positions(prompt, c) for c in classes]
            all_pos = sorted(p for ps in positions for p in ps)
            for lay in probe.cross:
                m = maps[lay.name].cpu().numpy()  # (N, L)
                gt = _downsample_mask(s.mask, lay.resolution).ravel()
                for c_id, pos in zip(ids, positions, strict=True):
                    inside = gt == c_id
                    if not inside.any():
                        continue
                    own = m[inside][:, pos].sum(-1).mean()
                    other = m[inside][:, all_pos].sum(-1).mean() - own
                    per_layer_own[lay.name].append(own)
                    if lay.resolution == max(x.resolution for x in probe.cross):
                        mass["own"].append(own)
                        mass["other classes"].append(other)
                        mass["rest"].append(1 - own - other)
            if full:
                refined = probe.refine(maps, normalise(cross))
                extra["refined"].add(to_image_size(normalise(refined)), ids, s.mask)
                tau = elbo_tau(probe, z0, classes, gen)
                cal = normalise(cross) ** tau[:, None, None]
                extra["refined+calibrated"].add(to_image_size(normalise(probe.refine(maps, cal))), ids, s.mask)
    result = {
        "attention_mass_finest": {k: float(np.mean(v)) for k, v in mass.items()},
        "own_class_mass_per_layer": {k: float(np.mean(v)) for k, v in per_layer_own.items()},
        "uniform_miou": uniform.best()[0],
        "raw_miou": {k: sw.best() for k, sw in sweeps.items()},
    }
    for k, sw in extra.items():
        result[f"{k}_miou"] = sw.best()
    return result


def elbo_tau(probe: Probe, z0, classes, gen, strength: float = 3.0) -> np.ndarray:
    eps = torch.randn((len(ELBO_TIMESTEPS), *z0.shape[1:]), generator=gen).to(probe.device)
    loss = probe.losses(z0, ELBO_TIMESTEPS, eps, [f"a photo of {c}" for c in classes]).sum(1)
    n = (loss - loss.min()) / (loss.max() - loss.min() + 1e-10)
    return strength**n


def aligner_miou(folder, samples, device: str = "cpu") -> dict | None:
    """The full method through the package's Aligner, if it is importable."""
    try:
        from elbo_t2ialign import Aligner  # type: ignore[attr-defined]
    except ImportError:
        return None
    from PIL import Image

    aligner = Aligner.from_pretrained(str(folder), device=device, dtype="float32")
    cal, raw = SweepMIoU(), SweepMIoU()
    for s in samples:
        classes = list(dict.fromkeys(s.classes))
        ids = [world.CLASSES.index(c) + 1 for c in classes]
        res = aligner.heatmaps(Image.fromarray(s.image), classes)
        cal.add(np.stack([np.asarray(res.heatmaps[c], np.float32) for c in classes]), ids, s.mask)
        raw.add(np.stack([np.asarray(res.raw_heatmaps[c], np.float32) for c in classes]), ids, s.mask)
    return {"calibrated": cal.best(), "uncalibrated": raw.best()}


def print_report(gap: dict, att: dict, full: dict | None) -> None:
    print(f"\nLoss gap (epsilon MSE x 1000, shared noise, {gap['images']} held-out images with 2-3 shapes)")
    print(f"{'caption':<20}" + "".join(f"{'t=' + str(t):>9}" for t in gap["levels"]) + f"{'mean':>9}")
    for r, v in gap["loss"].items():
        print(f"{r:<20}" + "".join(f"{1000 * x:9.2f}" for x in v) + f"{1000 * np.mean(v):9.2f}")
    m = att["attention_mass_finest"]
    print("\nCross-attention mass inside each object (finest layers, collection prompt 'a photo of c1, c2'):")
    print(f"  own class token {m['own']:.3f}   other class tokens {m['other classes']:.3f}   rest {m['rest']:.3f}")
    print("  own class token per cross layer (down, mid, up): " + ", ".join(f"{v:.3f}" for v in att["own_class_mass_per_layer"].values()))
    print(f"\nmIoU (x100, best threshold), uniform maps: {att['uniform_miou']:.1f}")
    for k, (v, th) in att["raw_miou"].items():
        print(f"  raw cross attention, t={k}: {v:.1f} (th {th:.2f})")
    for k in ("refined_miou", "refined+calibrated_miou"):
        if k in att:
            print(f"  probe {k.removesuffix('_miou')}: {att[k][0]:.1f} (th {att[k][1]:.2f})")
    if full is not None:
        print(f"  Aligner full method: calibrated {full['calibrated'][0]:.1f} (th {full['calibrated'][1]:.2f}), "
              f"uncalibrated {full['uncalibrated'][0]:.1f} (th {full['uncalibrated'][1]:.2f})")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Loss gap, attention mass and mIoU of a testbed model.")
    p.add_argument("--model", default=str(DEFAULT_MODEL_DIR), help="pipeline folder, or a training checkpoint.pt")
    p.add_argument("--images", type=int, default=100, help="held-out scenes (val split)")
    p.add_argument("--split", default="val")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--full", action="store_true", help="also refinement + calibration (probe) and the Aligner")
    p.add_argument("--sweep-timesteps", action="store_true", help="mIoU per single collection timestep")
    p.add_argument("--json", default=None, help="also write the numbers here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if args.model.endswith(".pt"):  # a training checkpoint: export it as a pipeline first
        from elbo_t2ialign.testbed.train import export_checkpoint

        folder = Path(args.model).with_suffix("")
        export_checkpoint(args.model, folder)
        args.model = str(folder)
    probe = Probe(args.model, args.device)
    samples = [world.generate(i, split=args.split) for i in range(args.images)]
    gap = loss_gap(probe, samples[: min(len(samples), 150)])
    sets = {"20..200": COLLECT_TIMESTEPS}
    if args.sweep_timesteps:
        for t in (20, 100, 200, 400, 600, 800):
            sets[str(t)] = [t]
    att = attention_and_miou(probe, samples, sets, full=args.full)
    full = aligner_miou(args.model, samples, args.device) if args.full else None
    print_report(gap, att, full)
    print(f"\n({len(samples)} images, {time.perf_counter() - t0:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps({"loss_gap": gap, "attention": att, "aligner": full}, indent=1))


if __name__ == "__main__":
    main()


