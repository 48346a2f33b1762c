"""Train the testbed model: a tiny Stable-Diffusion-architecture pipeline on the shapes world.

    python -m elbo_t2ialign.testbed.train                 # the committed model
    python -m elbo_t2ialign.testbed.train --set steps=300 --out runs/testbed/try

The pipeline is a standard diffusers `StableDiffusionPipeline` folder
(AutoencoderKL, UNet2DConditionModel, CLIPTextModel, CLIPTokenizer,
DDPMScheduler), loadable with `StableDiffusionPipeline.from_pretrained`.

Stages, all deterministic by seed (CPU, fixed thread count):
1. generate the training scenes in memory (`world.generate(i, "train")`);
2. train the VAE briefly as an autoencoder (factor 2: 64x64x3 -> 32x32x4) and
   set its scaling factor so that scaled latents have unit variance;
3. cache the posterior-mean latents of all scenes;
4. train the UNet with the epsilon objective over all 1000 timesteps,
   high-noise steps weighted up (`high_noise_weight_cap`), self-attention keys
   tied to queries (`self_attention_similarity`). The
   CLIP text encoder stays frozen at its random initialisation, so token
   embeddings are distinct from the first step. Each class has a typical
   colour and the caption names the shapes ("a photo of a circle and a
   square"), so at high noise the words say which colours and outlines to
   restore, and the network has to link each word to its object's pixels; a
   share of captions uses the method's own prompt forms ("a photo of circle,
   square"; a subset of the classes; empty).

Checkpoints go to `<work>/checkpoint.pt` every `checkpoint_every` steps; a
rerun with the same settings resumes from the last one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from elbo_t2ialign.testbed import world

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "model"
MAX_TEXT_LENGTH = 20  # the longest caption (3 shapes) is 13 tokens with BOS/EOS; prompts of 5 classes fit


@dataclass
class TrainConfig:
    seed: int = 0
    threads: int = 2
    device: str = "cpu"
    # data
    train_images: int = 20000
    # VAE (autoencoder stage)
    vae_channels: tuple = (16, 32)  # two levels: downsample factor 2, 32x32x4 latents
    vae_steps: int = 400
    vae_batch: int = 16
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-6
    # UNet
    unet_channels: tuple = (32, 64)  # levels at 32x32 and 16x16, cross attention at both + mid
    unet_heads: tuple = (2, 4)  # attention heads per level (diffusers: attention_head_dim)
    unet_layers: int = 1
    # Self-attention (attn1) query and key projections tied (key = query) and frozen, scaled by
    # this factor, so that self-attention compares features (a learned non-local-means kernel).
    # Trained freely, the finest self-attention of this small model stayed uniform (about 1000
    # of 1024 positions attended), and the method's refinement then averages the maps away.
    # 0 keeps ordinary trainable self-attention.
    self_attention_similarity: float = 4.0
    norm_groups: int = 16
    steps: int = 2400
    batch: int = 32
    lr: float = 1e-3
    warmup: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    # Loss weight min(max(1/SNR, 1), cap); 1 = plain epsilon MSE. The words matter most at high
    # noise, where epsilon errors are small: weighting them up made the model use its text sooner
    # (400-step pilots: raw cross-attention mIoU 27.7 with cap 10, 19.4 without; testbed/README.md).
    high_noise_weight_cap: float = 10.0
    ema_decay: float = 0.0  # 0 disables the EMA copy
    # text encoder (frozen at its random initialisation unless train_text)
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 2
    train_text: bool = False
    # The random CLIP init mixes every token with all earlier ones so strongly that a
    # class word's state depends more on its position than on the word (cosine 0.96
    # between "square" and "circle" at the same place). Scaling the token embeddings
    # keeps each state mostly the word itself, with some context.
    text_embedding_scale: float = 10.0
    # caption mixture (the rest: "a photo of a circle and a square")
    p_class_list: float = 0.3  # "a photo of circle, square"
    p_subset: float = 0.1  # "a photo of circle" (a subset of the classes, list form)
    p_empty: float = 0.1  # ""
    # bookkeeping
    checkpoint_every: int = 400
    log_every: int = 50
    extra: dict = field(default_factory=dict)


# ------------------------------------------------------------ the components


def build_tokenizer():
    from elbo_t2ialign.tiny.tokenizers import build_clip_tokenizer

    # Longest words first: the BPE merges of a long word must come before those of
    # shorter words that share letter pairs ("green" before "red"), or it splits.
    words = sorted(world.VOCABULARY, key=lambda w: (-len(w), w))
    tok = build_clip_tokenizer(words, model_max_length=MAX_TEXT_LENGTH)
    split = [w for w in world.VOCABULARY if len(tok(w, add_special_tokens=False).input_ids) != 1]
    if split:
        raise RuntimeError(f"the testbed tokenizer splits {split} into several tokens")
    return tok


def build_text_encoder(cfg: TrainConfig, tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    conf = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.text_hidden,
        intermediate_size=cfg.text_hidden * 2,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        max_position_embeddings=MAX_TEXT_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=cfg.text_hidden,
    )
    model = CLIPTextModel(conf)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(cfg.text_embedding_scale)
    return model


def build_vae(cfg: TrainConfig):
    from diffusers import AutoencoderKL

    n = len(cfg.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.vae_channels),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=world.IMAGE_SIZE,
        mid_block_add_attention=False,
    )


def build_unet(cfg: TrainConfig):
    from diffusers import UNet2DConditionModel

    n = len(cfg.unet_channels)
    latent = world.IMAGE_SIZE // 2 ** (len(cfg.vae_channels) - 1)
    return UNet2DConditionModel(
        sample_size=latent,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * n,
        up_block_types=("CrossAttnUpBlock2D",) * n,
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=tuple(cfg.unet_channels),
        layers_per_block=cfg.unet_layers,
        attention_head_dim=tuple(cfg.unet_heads),  # diffusers' name for the number of heads
        cross_attention_dim=cfg.text_hidden,
        norm_num_groups=cfg.norm_groups,
    )


def tie_self_attention(unet, scale: float) -> None:
    """Key projection = query projection (scaled) in every self-attention layer, both frozen."""
    if not scale:
        return
    with torch.no_grad():
        for name, module in unet.named_modules():
            if name.endswith("attn1"):
                module.to_q.weight.mul_(scale)
                module.to_k.weight.copy_(module.to_q.weight)
                module.to_q.weight.requires_grad_(False)
                module.to_k.weight.requires_grad_(False)


def build_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
        steps_offset=1,
    )


def count_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------- captions


def sample_caption(objects, rng: np.random.Generator, cfg: TrainConfig) -> str:
    """One training caption for a scene, drawn from the caption mixture."""
    r = rng.uniform()
    classes = [o.cls for o in objects]
    order = rng.permutation(len(objects))
    if r < cfg.p_empty:
        return ""
    r -= cfg.p_empty
    if r < cfg.p_class_list:
        return world.class_list_caption([classes[i] for i in order])
    r -= cfg.p_class_list
    if r < cfg.p_subset:
        k = int(rng.integers(1, len(classes) + 1))
        return world.class_list_caption([classes[i] for i in order[:k]])
    return world.caption([classes[i] for i in order])


def encode_text(tokenizer, text_encoder, captions, device="cpu") -> torch.Tensor:
    ids = tokenizer(
        list(captions), padding="max_length", max_length=MAX_TEXT_LENGTH, truncation=True, return_tensors="pt"
    ).input_ids.to(device)
    return text_encoder(ids)[0]  # (B, L, D)


# ------------------------------------------------------------------ stages


def generate_scenes(n: int, seed: int):
    images = np.empty((n, world.IMAGE_SIZE, world.IMAGE_SIZE, 3), np.uint8)
    objects = []
    for i in range(n):
        s = world.generate(i, split=world.TRAIN_SPLIT, seed=seed)
        images[i] = s.image
        objects.append(s.objects)
    return images, objects


def to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)  # (B, 3, H, W) in [-1, 1]


def train_vae(vae, images, cfg: TrainConfig, gen: torch.Generator, progress=True):
    from tqdm import tqdm

    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    vae.train()
    bar = tqdm(range(cfg.vae_steps), desc="vae", disable=not progress, mininterval=2)
    n = len(images)
    for step in bar:
        lr = cfg.vae_lr * min(1.0, (step + 1) / 50) * (0.5 * (1 + math.cos(math.pi * step / cfg.vae_steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(0, n, (cfg.vae_batch,), generator=gen).numpy()
        x = to_tensor(images[idx]).to(cfg.device)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen).to(cfg.device)
        rec = vae.decode(z).sample
        rec_loss = F.mse_loss(rec, x)
        kl = post.kl().mean() / z[0].numel()
        loss = rec_loss + cfg.vae_kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 20 == 0:
            bar.set_postfix(rec=f"{rec_loss.item():.4f}", kl=f"{kl.item():.2f}")
    vae.eval()
    return float(rec_loss.item())


@torch.no_grad()
def encode_latents(vae, images, batch: int = 256, device="cpu") -> torch.Tensor:
    """Posterior means, unscaled, (N, 4, h, w)."""
    out = []
    for i in range(0, len(images), batch):
        out.append(vae.encode(to_tensor(images[i : i + batch]).to(device)).latent_dist.mean.cpu())
    return torch.cat(out)


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    p = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def save_pipeline(out: Path, vae, text_encoder, tokenizer, unet, scheduler, info: dict | None = None):
    from diffusers import StableDiffusionPipeline

    from elbo_t2ialign.tiny.tokenizers import add_bpe_files

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    # files every supported transformers release loads: 4.x reads vocab.json/merges.txt and the
    # text encoder's weights under "text_model.", the layout of the hub's CLIP checkpoints
    add_bpe_files(out / "tokenizer")
    classic_text_encoder_keys(out / "text_encoder" / "model.safetensors")
    if info is not None:
        (out / "testbed.json").write_text(json.dumps(info, indent=1) + "\n")


def classic_text_encoder_keys(path: Path) -> None:
    """Prefix the CLIP text encoder's weight names with "text_model." where transformers 5 saved them
    without it; transformers 4.x would otherwise initialise the encoder at random, and 5.x loads both."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(path, "pt") as f:
        metadata = f.metadata()
        if all(key.startswith("text_model.") for key in f.keys()):
            return
        tensors = {
            ("" if k.startswith("text_model.") else "text_model.") + k: f.get_tensor(k) for k in f.keys()
        }
    save_file(tensors, path, metadata=metadata)


def export_checkpoint(checkpoint: str | Path, out: str | Path) -> Path:
    """Write the pipeline folder of a training checkpoint (to measure a run while it trains).

    The VAE scaling factor is recomputed from the checkpoint's training scenes
    exactly as `train` computes it.
    """
    ckpt = torch.load(checkpoint, weights_only=True)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(
        **{k: (tuple(v) if isinstance(v, list) else v) for k, v in ckpt["config"].items() if k in fields}
    )
    torch.manual_seed(cfg.seed)
    tokenizer = build_tokenizer()
    text_encoder, vae, unet = build_text_encoder(cfg, tokenizer), build_vae(cfg), build_unet(cfg)
    vae.load_state_dict(ckpt["vae"])
    unet.load_state_dict(ckpt["unet"])
    text_encoder.load_state_dict(ckpt["text_encoder"])
    images, _ = generate_scenes(cfg.train_images, cfg.seed)
    vae.eval()
    vae.register_to_config(scaling_factor=float(1.0 / encode_latents(vae, images).std()))
    info = {"checkpoint": str(checkpoint), "step": ckpt["step"], "config": dataclasses.asdict(cfg)}
    save_pipeline(Path(out), vae, text_encoder.eval(), tokenizer, unet.eval(), build_scheduler(), info)
    return Path(out)


# ------------------------------------------------------------------- main


def _identity(config: dict) -> dict:
    """The settings that define the result (thread count and logging do not)."""
    return {
        k: v for k, v in config.items() if k not in ("threads", "device", "checkpoint_every", "log_every")
    }


def train(cfg: TrainConfig, out: Path, work: Path, progress: bool = True) -> dict:
    from tqdm import tqdm

    t_start = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    np_rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    device = cfg.device
    work.mkdir(parents=True, exist_ok=True)
    timings = {}

    t0 = time.perf_counter()
    images, objects = generate_scenes(cfg.train_images, cfg.seed)
    timings["data_s"] = time.perf_counter() - t0
    print(f"generated {len(images)} training scenes in {timings['data_s']:.1f} s", flush=True)

    tokenizer = build_tokenizer()
    text_encoder = build_text_encoder(cfg, tokenizer).to(device)
    vae = build_vae(cfg).to(device)
    unet = build_unet(cfg).to(device)
    tie_self_attention(unet, cfg.self_attention_similarity)
    scheduler = build_scheduler()
    params = {
        "vae": count_params(vae),
        "unet": count_params(unet),
        "text_encoder": count_params(text_encoder),
    }
    print(f"parameters: {params}", flush=True)

    ckpt_path = work / "checkpoint.pt"
    ckpt = torch.load(ckpt_path, weights_only=True) if ckpt_path.exists() else None
    if ckpt is not None and _identity(ckpt.get("config", {})) != _identity(dataclasses.asdict(cfg)):
        print(f"ignoring {ckpt_path}: it was written with other settings", flush=True)
        ckpt = None

    t0 = time.perf_counter()
    if ckpt is not None:
        vae.load_state_dict(ckpt["vae"])
        vae.eval()
        vae_rec = ckpt["vae_rec"]
    else:
        vae_rec = train_vae(vae, images, cfg, gen, progress)
    timings["vae_s"] = time.perf_counter() - t0
    vae.requires_grad_(False)
    latents = encode_latents(vae, images, device=device)
    scale = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scale)
    latents = (latents * scale).to(device)
    print(
        f"VAE reconstruction MSE {vae_rec:.4f}; latents {tuple(latents.shape[1:])}, scale {scale:.4f}",
        flush=True,
    )

    text_encoder.requires_grad_(cfg.train_text)
    text_encoder.train(cfg.train_text)
    train_params = [p for p in unet.parameters() if p.requires_grad]
    train_params += list(text_encoder.parameters()) if cfg.train_text else []
    opt = torch.optim.AdamW(train_params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = None
    if cfg.ema_decay > 0:
        ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    alphas = scheduler.alphas_cumprod.to(device)
    start = 0
    losses: list[float] = []
    if ckpt is not None and "unet" in ckpt:
        unet.load_state_dict(ckpt["unet"])
        text_encoder.load_state_dict(ckpt["text_encoder"])
        opt.load_state_dict(ckpt["opt"])
        ema = ckpt.get("ema")
        gen.set_state(ckpt["gen"])
        np_rng.bit_generator.state = ckpt["np_rng"]
        start, losses = ckpt["step"], ckpt["losses"]
        print(f"resumed from {ckpt_path} at step {start}", flush=True)

    def save_checkpoint(step):
        tmp = work / "checkpoint.pt.tmp"
        torch.save(
            {
                "config": dataclasses.asdict(cfg),
                "vae": vae.state_dict(),
                "vae_rec": vae_rec,
                "unet": unet.state_dict(),
                "text_encoder": text_encoder.state_dict(),
                "opt": opt.state_dict(),
                "ema": ema,
                "gen": gen.get_state(),
                "np_rng": np_rng.bit_generator.state,
                "step": step,
                "losses": losses,
            },
            tmp,
        )
        os.replace(tmp, ckpt_path)

    if ckpt is None:
        save_checkpoint(0)
    unet.train()
    n = len(latents)
    t0 = time.perf_counter()
    bar = tqdm(
        range(start, cfg.steps),
        desc="unet",
        initial=start,
        total=cfg.steps,
        disable=not progress,
        mininterval=5,
    )
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        idx = torch.randint(0, n, (cfg.batch,), generator=gen)
        z0 = latents[idx]
        captions = [sample_caption(objects[i], np_rng, cfg) for i in idx.tolist()]
        with torch.set_grad_enabled(cfg.train_text):
            cond = encode_text(tokenizer, text_encoder, captions, device)
        t = torch.randint(0, 1000, (cfg.batch,), generator=gen).to(device)
        eps = torch.randn(z0.shape, generator=gen).to(device)
        a = alphas[t].sqrt().view(-1, 1, 1, 1)
        b = (1 - alphas[t]).sqrt().view(-1, 1, 1, 1)
        pred = unet(a * z0 + b * eps, t, encoder_hidden_states=cond).sample
        if cfg.high_noise_weight_cap > 1:
            w = ((1 - alphas[t]) / alphas[t]).clamp(1.0, cfg.high_noise_weight_cap)
            loss = (w * ((pred - eps) ** 2).mean(dim=(1, 2, 3))).mean() / w.mean()
        else:
            loss = F.mse_loss(pred, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(train_params, cfg.grad_clip)
        opt.step()
        if ema is not None:
            with torch.no_grad():
                d = min(cfg.ema_decay, (1 + step) / (10 + step))
                for k, v in unet.state_dict().items():
                    if v.dtype.is_floating_point:
                        ema[k].mul_(d).add_(v.detach(), alpha=1 - d)
        losses.append(loss.item())
        if (step + 1) % cfg.log_every == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-cfg.log_every :]):.4f}", lr=f"{lr_at(step, cfg):.2e}")
            if not progress:
                print(f"step {step + 1} loss {np.mean(losses[-cfg.log_every :]):.4f}", flush=True)
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            save_checkpoint(step + 1)
    timings["unet_s"] = time.perf_counter() - t0
    save_checkpoint(cfg.steps)

    if ema is not None:
        unet.load_state_dict(ema)
    unet.eval()
    text_encoder.eval()
    timings["total_s"] = time.perf_counter() - t_start
    info = {
        "command": "python -m elbo_t2ialign.testbed.train",
        "config": dataclasses.asdict(cfg),
        "parameters": params,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "final_loss": float(np.mean(losses[-200:])) if losses else None,
        "vae_reconstruction_mse": vae_rec,
        "torch": torch.__version__,
    }
    save_pipeline(out, vae.cpu(), text_encoder.cpu(), tokenizer, unet.cpu(), scheduler, info)
    print(f"saved the pipeline to {out}; {json.dumps(info['timings_s'])}", flush=True)
    return info


def _parse_value(text: str, default):
    if isinstance(default, bool):
        return text.lower() in ("1", "true", "yes")
    if isinstance(default, tuple):
        return tuple(int(x) for x in text.strip("()").split(",") if x)
    if isinstance(default, dict):
        return json.loads(text)
    return type(default)(text)


def parse_config(overrides: list[str]) -> TrainConfig:
    cfg = TrainConfig()
    for item in overrides:
        key, _, value = item.partition("=")
        if not hasattr(cfg, key):
            raise SystemExit(
                f"unknown setting {key!r}; settings: {[f.name for f in dataclasses.fields(cfg)]}"
            )
        setattr(cfg, key, _parse_value(value, getattr(cfg, key)))
    return cfg


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Train the testbed model on the shapes world.")
    p.add_argument(
        "--out", default=str(DEFAULT_MODEL_DIR), help="pipeline folder (default: the committed model)"
    )
    p.add_argument("--work", default="runs/testbed/train", help="checkpoints (resumable)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override a TrainConfig field")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    cfg = parse_config(args.set)
    os.environ.setdefault("OMP_NUM_THREADS", str(cfg.threads))
    train(cfg, Path(args.out), Path(args.work), progress=not args.no_progress)


if __name__ == "__main__":
    main()
