"""ELBO-weighted sampling (method.md §7): deterministic DDIM (DDPM-family models) or flow Euler (SD3),
classifier-free guidance with an empty negative prompt, and per-step phrase weights.

At each of the first `elbo_steps` steps the full prompt and every phrase alone are predicted at the
current latent in one batch; `d_p = mean((pred_full - pred_phrase)^2)` gives the weights, and the
phrase tokens of the full prompt are scaled by them for this step's guided prediction (weights below 1,
from a strength below 1, as Compel downweights: see `weighting.py`). After
`elbo_steps` the weights return to 1, as in the reference (`after_elbo_steps="hold"` keeps the last
ones instead). `weighted=False` is the unweighted baseline: the same
noise, steps and guidance with the plain prompt.

Steps run on training indices T-1, T-1 - r, T-1 - 2r, ... with stride r = T // steps while the index
stays above 0, each going to the next one and the last to t = 0 (for 50 steps: 999, 979, ..., 19 -> 0).
This is the reference's `range(T - 1, 0, -r)`, ceil((T - 1) / r) steps: one more than asked for 6, 7,
15 or 30 steps (7 steps: stride 142, 999, 857, ..., 147, 5 -> 0, eight steps), as many for 3 or any
divisor of T. `steps_rule="exact"` takes exactly `steps` of them (7 steps: 999, ..., 147 -> 0).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from elbo_t2ialign.core.adapters.base import Cond, ModelAdapter, cat_cond
from elbo_t2ialign.core.adapters.schedules import DDPMSchedule, FlowSchedule
from elbo_t2ialign.generation.weighting import (
    compel_syntax,
    phrase_weights,
    token_positions,
    weight_conditioning,
)


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


STEPS_RULES = ("stride", "exact")


def sampling_timesteps(num_train_timesteps: int, steps: int, rule: str = "stride") -> list[tuple[int, int]]:
    """(t, t_next) training-index pairs, from T-1 down with stride T // steps, the last one ending at 0.

    rule "stride" (the reference's): every index T-1 - i * stride above 0, which can be one step more
    than `steps` (8 for 7); "exact": the first `steps` of them.
    """
    if rule not in STEPS_RULES:
        raise ValueError(f"steps_rule must be one of {STEPS_RULES}, got {rule!r}")
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps must be in 1..{num_train_timesteps}, got {steps}")
    ratio = num_train_timesteps // steps
    ts = list(range(num_train_timesteps - 1, 0, -ratio)) if rule == "stride" else []
    if rule == "exact" or not ts:  # T - 1 = 0 leaves the stride rule nothing: one step 0 -> 0
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
    plain: bool = True  # every step was conditioned on the plain prompt (the image is the baseline's)


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
        steps_rule: str = "stride",
        prompt_syntax: str = "plain",
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
        self.timesteps = sampling_timesteps(schedule.num_train_timesteps, self.steps, steps_rule)
        self.guidance = float(adapter.default_guidance if guidance is None else guidance)
        if strength <= 0:
            raise ValueError(f"strength must be positive, got {strength}")
        self.strength = float(strength)
        self.elbo_steps = len(self.timesteps) if elbo_steps is None else int(elbo_steps)
        if after_elbo_steps not in ("reset", "hold"):
            raise ValueError(f"after_elbo_steps must be 'reset' or 'hold', got {after_elbo_steps!r}")
        # after the first `elbo_steps` steps: "reset" returns to weight 1 (the reference), "hold" keeps the last
        self.after_elbo_steps = after_elbo_steps
        # "plain": weights act on the embeddings (Compel's rules, see weighting.py); "compel": every step
        # encodes the prompt written as "(phrase)w ..." the reference's way (Compel on SD1.x/SDXL, so SDXL's
        # pooled text is that string's; SD3 reads the string as text, as the reference's SD3 path does)
        adapter.set_prompt_syntax(prompt_syntax)
        self.prompt_syntax = prompt_syntax

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
        syntax = self.prompt_syntax == "compel" and weighted and len(phrases) > 0
        positions = token_positions(ad, prompt, phrases) if use_elbo and not syntax else []
        batch = cat_cond([full] + [ad.encode_prompt(p) for p in phrases]) if use_elbo else None
        guided_uncond = empty
        masked: dict[int, Cond] = {}  # phrase k -> the prompt with its tokens masked (weights below 1)
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
            if syntax:  # the reference: the syntax string at every step, weights 1 included
                text = compel_syntax(prompt, phrases, weights, float32_numbers=True)
                # SD3 reads the numbers as text, so the string can exceed its CLIP's 77 tokens; the
                # reference lets the pipeline truncate it (the prompt itself was checked)
                cond = ad.encode_prompt(text, check_length=False)
            elif weighted_now:
                for k in (k for k, w in enumerate(weights) if w < 1 and k not in masked):
                    masked[k] = ad.encode_prompt_masked(prompt, positions[k])
                cond = weight_conditioning(full, empty, positions, weights, masked)
            else:
                cond = full
            result.plain = result.plain and not (syntax or weighted_now)
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
        (z.float() / vae.config.scaling_factor + shift).to(adapter.vae_device, vae.dtype), return_dict=False
    )[0]
    x = ((x[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (3, H, W)
    return Image.fromarray(np.ascontiguousarray(x.permute(1, 2, 0).cpu().numpy()), mode="RGB")
