"""ELBO-weighted sampling (method.md §7): deterministic DDIM (DDPM-family models) or flow Euler (SD3),
classifier-free guidance with an empty negative prompt, and per-step phrase weights.

At each of the first `elbo_steps` steps the full prompt and every phrase alone are predicted at the
current latent in one batch; `d_p = mean((pred_full - pred_phrase)^2)` gives the weights, and the
phrase tokens of the full prompt are scaled by them for this step's guided prediction. After
`elbo_steps` the weights return to 1, as in the reference (`after_elbo_steps="hold"` keeps the last
ones instead). `weighted=False` is the unweighted baseline: the same
noise, steps and guidance with the plain prompt.

Steps run on training indices t_i = T-1 - i * (T // steps), each going to the next one and the last to
t = 0 (for 50 steps: 999, 979, ..., 19 -> 0, as the reference).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from elbo_t2ialign.core.adapters.base import ModelAdapter, cat_cond
from elbo_t2ialign.core.adapters.schedules import DDPMSchedule, FlowSchedule
from elbo_t2ialign.generation.weighting import phrase_weights, token_positions, weight_conditioning


def model_kind(adapter: ModelAdapter) -> str:
    """The kind of pipeline the adapter declares: "sd" (SD1.x/2.x-like UNet), "sdxl" (UNet with
    pooled text + time ids) or "sd3" (MMDiT); an adapter that declares none does not generate."""
    kind = adapter.generation_kind
    if kind is not None:
        return kind
    raise ValueError(
        f"ELBO-weighted generation supports the UNet family (SD1.x, SD2.x, SDXL) and SD3/SD3.5, "
        f"not the {adapter.family!r} family"
    )


def sampling_timesteps(num_train_timesteps: int, steps: int) -> list[tuple[int, int]]:
    """(t, t_next) training-index pairs, from T-1 down, the last one ending at 0."""
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps must be in 1..{num_train_timesteps}, got {steps}")
    ratio = num_train_timesteps // steps
    ts = [num_train_timesteps - 1 - i * ratio for i in range(steps)]
    return list(zip(ts, ts[1:] + [0], strict=True))


def ddim_step(
    schedule: DDPMSchedule, z: torch.Tensor, t: int, t_next: int, eps: torch.Tensor
) -> torch.Tensor:
    """Deterministic DDIM (eta 0) from t to t_next given the epsilon prediction; z, eps (B, C, h, w)."""
    a, b = schedule.coefficients(torch.tensor([t, t_next], device=z.device))
    x0 = (z - b[0] * eps) / a[0]
    return a[1] * x0 + b[1] * eps


def euler_step(schedule: FlowSchedule, z: torch.Tensor, t: int, t_next: int, v: torch.Tensor) -> torch.Tensor:
    """Flow-matching Euler step from sigma_t to sigma_t_next given the velocity prediction."""
    sigma = schedule.sigma(torch.tensor([t, t_next], device=z.device))
    return z + (sigma[1] - sigma[0]) * v


# the step function of each schedule's `deterministic_sampler`
STEPS = {"ddim": ddim_step, "euler": euler_step}


@dataclass
class SampleResult:
    image: Image.Image
    latent: torch.Tensor  # (1, C, h, w) float32, the final latent
    phrases: list[str]
    weights: list[list[float]] = field(default_factory=list)  # per step, one weight per phrase
    distances: list[list[float]] = field(default_factory=list)  # per ELBO step, d_p per phrase


class ElboSampler:
    """Generates images with (or, as the baseline, without) ELBO phrase weights."""

    def __init__(
        self,
        adapter: ModelAdapter,
        steps: int = 50,
        guidance: float | None = None,
        strength: float = 1.2,
        elbo_steps: int | None = None,
        after_elbo_steps: str = "reset",
    ):
        self.adapter = adapter
        self.kind = model_kind(adapter)
        schedule = adapter.schedule
        self._step = STEPS.get(schedule.deterministic_sampler)
        if self._step is None:
            raise ValueError(
                f"no deterministic sampler for the {type(schedule).__name__} noise schedule "
                "(DDIM needs a DDPM-family scheduler, Euler a flow-matching one)"
            )
        self.steps = int(steps)
        self.timesteps = sampling_timesteps(schedule.num_train_timesteps, self.steps)
        self.guidance = float(adapter.default_guidance if guidance is None else guidance)
        if strength <= 0:
            raise ValueError(f"strength must be positive, got {strength}")
        self.strength = float(strength)
        self.elbo_steps = self.steps if elbo_steps is None else int(elbo_steps)
        if after_elbo_steps not in ("reset", "hold"):
            raise ValueError(f"after_elbo_steps must be 'reset' or 'hold', got {after_elbo_steps!r}")
        # after the first `elbo_steps` steps: "reset" returns to weight 1 (the reference), "hold" keeps the last
        self.after_elbo_steps = after_elbo_steps

    def initial_latent(self, seed: int) -> torch.Tensor:
        """(1, C, h, w) float32 standard normal noise from a CPU generator (same on every device)."""
        channels = int(self.adapter.denoiser.config.in_channels)
        size = self.adapter.latent_size
        gen = torch.Generator("cpu").manual_seed(int(seed))
        return torch.randn((1, channels, size, size), generator=gen).to(self.adapter.device)

    @torch.no_grad()
    def sample(self, prompt: str, phrases: list[str], seed: int, weighted: bool = True) -> SampleResult:
        """One image for `prompt` from noise `seed`; `weighted=False` gives the plain-CFG baseline."""
        ad = self.adapter
        full, empty = ad.encode_prompt(prompt), ad.encode_prompt("")
        use_elbo = weighted and len(phrases) >= 2 and self.strength != 1.0 and self.elbo_steps > 0
        positions = token_positions(ad, prompt, phrases) if use_elbo else []
        batch = cat_cond([full] + [ad.encode_prompt(p) for p in phrases]) if use_elbo else None
        guided_uncond = empty
        weights = [1.0] * len(phrases)
        result = SampleResult(image=None, latent=None, phrases=list(phrases))  # type: ignore[arg-type]
        z = self.initial_latent(seed)  # (1, C, h, w)
        for i, (t, t_next) in enumerate(self.timesteps):
            if use_elbo and i < self.elbo_steps:
                n = 1 + len(phrases)
                preds = ad.predict(z.expand(n, -1, -1, -1), torch.full((n,), t, device=ad.device), batch)
                dist = ((preds[1:] - preds[:1]) ** 2).mean(dim=(1, 2, 3))  # (P,)
                weights = phrase_weights(dist, self.strength)
                result.distances.append(dist.tolist())
            elif use_elbo and self.after_elbo_steps == "reset":
                weights = [1.0] * len(phrases)
            weighted_now = use_elbo and any(w != 1.0 for w in weights)
            cond = weight_conditioning(full, empty, positions, weights) if weighted_now else full
            pred_c, pred_u = ad.predict(
                z.expand(2, -1, -1, -1),
                torch.full((2,), t, device=ad.device),
                cat_cond([cond, guided_uncond]),
            ).chunk(2)  # (1, C, h, w) each
            z = self._step(ad.schedule, z, t, t_next, pred_u + self.guidance * (pred_c - pred_u))
            result.weights.append(list(weights))
        result.latent = z
        result.image = decode(ad, z)
        return result


@torch.no_grad()
def decode(adapter: ModelAdapter, z: torch.Tensor) -> Image.Image:
    """(1, C, h, w) latent -> RGB PIL image, through the float32 VAE (undoing scale and shift)."""
    vae = adapter.vae
    shift = vae.config.get("shift_factor", None) or 0.0
    x = vae.decode(
        (z.float() / vae.config.scaling_factor + shift).to(vae.device, vae.dtype), return_dict=False
    )[0]
    x = ((x[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (3, H, W)
    return Image.fromarray(np.ascontiguousarray(x.permute(1, 2, 0).cpu().numpy()), mode="RGB")
