"""Per-class ELBO score (method.md §3): the summed diffusion loss of the image
under each class prompt, with one noise sample per timestep shared by all
classes, batched over (class x timestep) pairs."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from elbo_t2ialign.core.adapters.base import Cond, ModelAdapter, cat_cond

T = TypeVar("T")


def is_out_of_memory(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def halve_on_oom(
    batch_size: int, attempt: Callable[[int], T], on_halve: Callable[[int], None] | None = None
) -> tuple[T, int]:
    """`attempt(batch_size)`, called again with half the batch size after each out-of-memory error
    (the device cache emptied first, `on_halve` told the new size) until it succeeds; an
    out-of-memory at batch size 1, or any other error, is raised. Returns (its result, the size
    that worked)."""
    while True:
        try:
            return attempt(batch_size), batch_size
        except (torch.OutOfMemoryError, RuntimeError) as err:
            if not is_out_of_memory(err) or batch_size == 1:
                raise
            batch_size = max(1, batch_size // 2)
            if on_halve is not None:
                on_halve(batch_size)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def run_batched(n: int, batch_size: int, step: Callable[[slice], None]) -> int:
    """Call `step` on consecutive slices of range(n); halve the batch size on out-of-memory (the
    failed slice is retried, smaller; earlier slices are kept).

    Returns the batch size that worked, so callers can start there next time.
    """
    start = 0
    while start < n:

        def attempt(size: int, start: int = start) -> int:
            stop = min(start + size, n)
            step(slice(start, stop))
            return stop

        start, batch_size = halve_on_oom(batch_size, attempt)
    return batch_size


@torch.no_grad()
def elbo_losses(
    adapter: ModelAdapter,
    z0: torch.Tensor,
    conds: Sequence[Cond],
    timesteps: Sequence[int],
    noise: torch.Tensor,
    batch_size: int = 8,
) -> tuple[torch.Tensor, int]:
    """mean((target_t - pred(z_t, t, cond_i))^2) for every class prompt i and timestep t; the
    class's loss L_i is its row's sum (method.md §3.4).

    z0 (1, C, h, w); noise (T, C, h, w), row j used at timesteps[j] for every
    class, so differences come from the prompts. Returns (losses (K, T) float32
    on CPU, the batch size that fit).
    """
    k, n_t = len(conds), len(timesteps)
    pair_class = [i for i in range(k) for _ in range(n_t)]  # class-major
    # nothing crosses between host and device per batch: timesteps and noise go over once, the
    # losses come back once (every blocking copy waits for all queued device work)
    pair_t = torch.tensor(list(timesteps) * k, dtype=torch.long).to(adapter.device)
    pair_row = torch.arange(n_t, device=adapter.device).repeat(k)  # noise row of every pair
    noise = noise.to(adapter.device, torch.float32)
    per_pair = torch.zeros(k * n_t, dtype=torch.float32, device=adapter.device)

    def step(rows: slice) -> None:
        eps, t = noise[pair_row[rows]], pair_t[rows]  # (b, C, h, w), (b,)
        z_t = adapter.schedule.add_noise(z0, eps, t)
        pred = adapter.predict(z_t, t, cat_cond([conds[i] for i in pair_class[rows]]))
        target = adapter.schedule.target(z0, eps, t)
        per_pair[rows] = ((target - pred) ** 2).flatten(1).mean(dim=1)

    used = run_batched(k * n_t, batch_size, step)
    return per_pair.cpu().view(k, n_t), used
