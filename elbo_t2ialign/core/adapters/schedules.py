"""Noise schedules: how an image latent is noised at a training timestep, what
the network receives, and what its output is compared with (method.md §2).

Timesteps `t` are training indices 0..T-1, low t = little noise, for every
family. Each schedule is built from the pipeline's scheduler config, never
from a model name.
"""

from __future__ import annotations

import math

import torch


class NoiseSchedule:
    """z_t = a_t * z0 + b_t * eps; the loss compares `target` with `to_target(pred)`."""

    num_train_timesteps: int = 1000
    # the deterministic sampler generation uses with this schedule: "ddim", "euler", or None (none)
    deterministic_sampler: str | None = None

    def coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a_t, b_t), each (B,) float32 on t's device."""
        raise NotImplementedError

    def add_noise(self, z0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, b = (c.view(-1, *([1] * (z0.ndim - 1))) for c in self.coefficients(t))
        return a * z0 + b * eps

    def table_on(self, name: str, device: torch.device) -> torch.Tensor:
        """The per-timestep table `name` (built on the host) on `device`, copied there once: a
        host-to-device copy in every call would make each network call wait for all queued work."""
        cache = self.__dict__.setdefault("_device_tables", {})
        key = (name, torch.device(device))
        if key not in cache:
            cache[key] = getattr(self, name).to(device)
        return cache[key]

    def model_input(self, z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return z_t

    def model_timestep(self, t: torch.Tensor) -> torch.Tensor:
        """The timestep value the network is conditioned on."""
        return t

    def target(self, z0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return eps

    def to_target(self, pred: torch.Tensor, z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Convert the network output to the space of `target`."""
        return pred


def _bcast(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return x.view(-1, *([1] * (like.ndim - 1)))


class DDPMSchedule(NoiseSchedule):
    """Variance-preserving DDPM family: epsilon, v-prediction and sample models; eps is the target."""

    deterministic_sampler = "ddim"

    def __init__(self, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon"):
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(
                f"unsupported prediction_type {prediction_type!r}; expected epsilon, v_prediction or sample"
            )
        self.alphas_cumprod = alphas_cumprod.double()
        self.prediction_type = prediction_type
        self.num_train_timesteps = len(alphas_cumprod)

    def coefficients(self, t):
        ac = self.table_on("alphas_cumprod", t.device)[t.long()]
        return ac.sqrt().float(), (1 - ac).sqrt().float()

    def to_target(self, pred, z_t, t):
        if self.prediction_type == "epsilon":
            return pred
        a, b = (_bcast(c, z_t) for c in self.coefficients(t))
        if self.prediction_type == "v_prediction":  # eps = a * v + b * z_t
            return a * pred + b * z_t
        return (z_t - a * pred) / b  # sample prediction: eps = (z_t - a x0) / b


class FlowSchedule(NoiseSchedule):
    """Rectified flow (SD3, FLUX): z_t = (1 - sigma) z0 + sigma eps, target eps - z0."""

    deterministic_sampler = "euler"

    def __init__(self, sigmas: torch.Tensor, num_train_timesteps: int = 1000, timestep_scale: float = 1.0):
        # sigmas[t]: noise level at training index t, ascending in t.
        self.sigmas = sigmas.float()
        self.num_train_timesteps = num_train_timesteps
        self.timestep_scale = timestep_scale  # FLUX's transformer takes sigma, SD3's sigma * 1000

    @classmethod
    def from_scheduler_config(
        cls, config, image_seq_len: int, timestep_scale: float, mu: float | None = None
    ) -> FlowSchedule:
        """Sigma for each training index, with the shift applied the way the scheduler applies it.
        With dynamic shifting, `mu` is the pipeline's (default: FLUX's `calculate_shift`, linear in
        the number of image tokens between the config's base and max lengths)."""
        n = int(config.get("num_train_timesteps", 1000))
        s = torch.arange(1, n + 1, dtype=torch.float64) / n  # index t -> (t + 1) / T, ascending
        if config.get("use_dynamic_shifting", False):
            if mu is None:
                base_len, max_len = (
                    config.get("base_image_seq_len", 256),
                    config.get("max_image_seq_len", 4096),
                )
                base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
                slope = (max_shift - base_shift) / (max_len - base_len)
                mu = image_seq_len * slope + base_shift - slope * base_len
            if config.get("time_shift_type", "exponential") == "linear":
                s = mu / (mu + (1 / s - 1))
            else:
                s = math.exp(mu) / (math.exp(mu) + (1 / s - 1))
        else:
            shift = float(config.get("shift", 1.0))
            s = shift * s / (1 + (shift - 1) * s)
        return cls(s, n, timestep_scale)

    def sigma(self, t):
        return self.table_on("sigmas", t.device)[t.long()]

    def coefficients(self, t):
        sigma = self.sigma(t)
        return 1 - sigma, sigma

    def model_timestep(self, t):
        return self.sigma(t) * self.num_train_timesteps * self.timestep_scale

    def target(self, z0, eps, t):
        return eps - z0


class EDMSchedule(NoiseSchedule):
    """EDM (Playground v2.5): z = z0 + sigma eps with the scheduler's preconditioning; target eps.

    sigma for training index t follows the scheduler's sigma schedule sampled at
    T points between sigma_min and sigma_max (ascending in t).
    """

    def __init__(self, scheduler, num_train_timesteps: int = 1000):
        cfg = scheduler.config
        self.scheduler = scheduler
        self.num_train_timesteps = num_train_timesteps
        ramp = torch.linspace(0, 1, num_train_timesteps, dtype=torch.float64)
        lo, hi = float(cfg.sigma_min), float(cfg.sigma_max)
        if cfg.get("sigma_schedule", "karras") == "exponential":
            sig = torch.exp(math.log(lo) + ramp * (math.log(hi) - math.log(lo)))
        else:
            rho = float(cfg.get("rho", 7.0))
            sig = (lo ** (1 / rho) + ramp * (hi ** (1 / rho) - lo ** (1 / rho))) ** rho
        self.sigmas = sig.float()

    def sigma(self, t):
        return self.table_on("sigmas", t.device)[t.long()]

    def coefficients(self, t):
        return torch.ones_like(self.sigma(t)), self.sigma(t)

    def model_input(self, z_t, t):
        return self.scheduler.precondition_inputs(z_t, _bcast(self.sigma(t), z_t))

    def model_timestep(self, t):
        return self.scheduler.precondition_noise(self.sigma(t))

    def to_target(self, pred, z_t, t):
        sigma = _bcast(self.sigma(t), z_t)
        denoised = self.scheduler.precondition_outputs(z_t, pred.float(), sigma)
        return (z_t - denoised) / sigma


def schedule_from_scheduler(scheduler, **flow_kwargs) -> NoiseSchedule:
    """Pick the schedule from the scheduler's own attributes and config."""
    cfg = scheduler.config
    if hasattr(scheduler, "precondition_inputs"):
        return EDMSchedule(scheduler)
    if hasattr(scheduler, "alphas_cumprod"):
        return DDPMSchedule(scheduler.alphas_cumprod, cfg.get("prediction_type", "epsilon"))
    if "shift" in cfg or cfg.get("use_dynamic_shifting", False):
        return FlowSchedule.from_scheduler_config(cfg, **flow_kwargs)
    raise ValueError(
        f"cannot derive a noise schedule from scheduler {type(scheduler).__name__}: it has neither "
        "alphas_cumprod (DDPM family), a flow-matching shift, nor EDM preconditioning"
    )
