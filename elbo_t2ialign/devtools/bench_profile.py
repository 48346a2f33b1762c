"""Where the bench's time goes: a breakdown of `Aligner.heatmaps` and the network's own floor.

- `Breakdown` wraps the steps of `Aligner.heatmaps` for the duration of a `with` block (VAE
  encode, prompts, noise, the forward calls, the ELBO and collection loops, aggregation and
  refinement, resize to image size, host transfers, the network itself) and adds up each step's
  own time, nested steps excluded, so the parts and the network add up to the wall time. On CUDA
  every step boundary synchronises, so queued device work is charged to the step that queued it.
- `record_forwards` + `Floor` replay the network samples of one `heatmaps` call (every ELBO
  pair and every collection timestep, same inputs) at a chosen batch size with the pipeline's own
  attention processors (SDPA everywhere, nothing captured): the time the network alone needs.

Nothing here changes what is computed; the wrappers are removed when the block ends.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch

from elbo_t2ialign.core import calibrate
from elbo_t2ialign.core.adapters.base import Cond, cat_cond
from elbo_t2ialign.core.capture import AttentionRecorder, attention_processors
from elbo_t2ialign.core.elbo import is_out_of_memory

PARTS = (
    "vae_encode",
    "prompts",
    "noise",
    "forward_calls",
    "elbo_loop",
    "collect_loop",
    "aggregate_refine",
    "resize",
    "host_transfers",
    "network",
)
PART_NOTES = {
    "vae_encode": "adapter.encode_image (resize to the model resolution, VAE encoder)",
    "prompts": "adapter.encode_prompt (text encoders, cached per prompt) and token positions",
    "noise": "drawing the collection and ELBO noise on the host",
    "forward_calls": "adapter.predict outside the network: schedule input/target maths, dtype casts",
    "elbo_loop": "the ELBO batches outside predict: noising, batching conditionings, the loss",
    "collect_loop": "the collection batches outside predict: noising, installing the recorder",
    "aggregate_refine": "recorder means, class maps, temperatures, self-attention refinement",
    "resize": "calibrate.to_image: bilinear resize to the image size and min-max",
    "host_transfers": "copies between host and device outside the network (.to/.cpu/.tolist/.item)",
    "network": "adapter._forward: the denoiser, capture processors included",
}
TRANSFER_METHODS = ("to", "cpu", "numpy", "tolist", "item")


def device_sync(device: torch.device) -> Callable[[], None]:
    """A function that waits for `device`'s queued work (a no-op off CUDA)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


class _Patches:
    """Attribute replacements undone in reverse order (instance, class and module attributes)."""

    def __init__(self):
        self._undo: list[tuple[Any, str, bool, Any]] = []

    def set(self, owner: Any, name: str, value: Any) -> None:
        own = vars(owner)
        self._undo.append((owner, name, name in own, own.get(name)))
        setattr(owner, name, value)

    def undo(self) -> None:
        while self._undo:
            owner, name, had, old = self._undo.pop()
            if had:
                setattr(owner, name, old)
            else:
                delattr(owner, name)


def _target_device(args: tuple, kwargs: dict) -> torch.device | None:
    """The device a `Tensor.to(...)` call moves to, or None for a dtype-only call."""
    target = kwargs.get("device")
    for a in args:
        if isinstance(a, (str, torch.device)):
            target = a
        elif isinstance(a, torch.Tensor):
            target = a.device
    return None if target is None else torch.device(target)


def crosses_devices(tensor: torch.Tensor, method: str, args: tuple, kwargs: dict) -> bool:
    """Whether `tensor.<method>(*args, **kwargs)` copies between the host and a device."""
    if method == "to":
        target = _target_device(args, kwargs)
        return target is not None and target.type != tensor.device.type
    return tensor.device.type != "cpu"  # cpu / numpy / tolist / item of a device tensor


class Breakdown:
    """Seconds spent in each part of `aligner.heatmaps` while the block is open (see PARTS).

    Each part's time excludes the parts nested in it (a prompt encoded inside the collection
    loop counts as `prompts`, not `collect_loop`)."""

    def __init__(self, aligner, device: torch.device):
        self.aligner = aligner
        self.sync = device_sync(torch.device(device))
        self.seconds = dict.fromkeys(PARTS, 0.0)
        self._stack: list[list] = []  # [part, start, seconds spent in nested parts]
        self._patches = _Patches()

    def __enter__(self) -> Breakdown:
        al, ad, p = self.aligner, self.aligner.adapter, self._patches
        for owner, name, part in (
            (ad, "encode_image", "vae_encode"),
            (ad, "encode_prompt", "prompts"),
            (al, "_positions", "prompts"),
            (al, "_draw_noise", "noise"),
            (ad, "predict", "forward_calls"),
            (ad, "_forward", "network"),
            (al, "_elbo_losses", "elbo_loop"),
            (al, "_collect", "collect_loop"),
            (calibrate, "temperatures", "aggregate_refine"),
            (calibrate, "class_cross_maps", "aggregate_refine"),
            (calibrate, "self_attention_refine", "aggregate_refine"),
            (AttentionRecorder, "mean", "aggregate_refine"),
            (calibrate, "to_image", "resize"),
        ):
            p.set(owner, name, self._timed(part, getattr(owner, name)))
        for name in TRANSFER_METHODS:
            p.set(torch.Tensor, name, self._transfer(name, getattr(torch.Tensor, name)))
        return self

    def __exit__(self, *exc) -> None:
        self._patches.undo()

    def reset(self) -> None:
        self.seconds = dict.fromkeys(PARTS, 0.0)

    def _enter(self, part: str) -> None:
        self.sync()
        self._stack.append([part, time.perf_counter(), 0.0])

    def _exit(self) -> None:
        self.sync()
        part, start, nested = self._stack.pop()
        elapsed = time.perf_counter() - start
        self.seconds[part] += elapsed - nested
        if self._stack:
            self._stack[-1][2] += elapsed

    def _timed(self, part: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            self._enter(part)
            try:
                return fn(*args, **kwargs)
            finally:
                self._exit()

        return timed

    def _transfer(self, method: str, fn: Callable) -> Callable:
        def transfer(tensor, *args, **kwargs):
            in_network = bool(self._stack) and self._stack[-1][0] == "network"
            if in_network or not crosses_devices(tensor, method, args, kwargs):
                return fn(tensor, *args, **kwargs)
            self._enter("host_transfers")
            try:
                return fn(tensor, *args, **kwargs)
            finally:
                self._exit()

        return transfer


SYNC_WARNING = "called a synchronizing CUDA operation"  # torch's text in sync debug mode "warn"


def count_syncs(run: Callable[[], Any], device: torch.device | str) -> int | None:
    """How many synchronising CUDA operations `run()` makes (stream or device synchronisations,
    blocking copies, `.item()`: each waits for all queued work), counted from the warnings of
    `torch.cuda.set_sync_debug_mode("warn")`; None off CUDA. The previous mode is put back."""
    if torch.device(device).type != "cuda":
        return None
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    return sum(SYNC_WARNING in str(w.message) for w in caught)


# ------------------------------------------------------------------ floor


def record_forwards(aligner, image, classes: list[str], seed: int) -> tuple[torch.Tensor, torch.Tensor, Cond]:
    """Run `aligner.heatmaps` once and return the inputs of every network sample it ran, stacked:
    (model inputs (N, C, h, w), model timesteps (N,), conditioning with batch N)."""
    ad, xs, ts, conds = aligner.adapter, [], [], []
    patches = _Patches()

    def keep(x, timestep, cond):
        xs.append(x)
        ts.append(timestep.reshape(-1).expand(x.shape[0]))
        conds.append(cond)
        return forward(x, timestep, cond)

    forward = ad._forward
    patches.set(ad, "_forward", keep)
    try:
        aligner.heatmaps(image, classes, seed=seed)
    finally:
        patches.undo()
    return torch.cat(xs), torch.cat(ts), cat_cond(conds)


def flops_per_sample(adapter, samples: tuple[torch.Tensor, torch.Tensor, Cond]) -> float:
    """Floating-point operations of one network sample (the first recorded), counted by torch's
    FlopCounterMode on the eager denoiser with SDPA's math backend, so that the attention's matrix
    products are counted on every device (the fused CPU kernel is not). Capture adds no products:
    it computes the same QK^T and PV explicitly."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    x, t, cond = samples
    patches = _Patches()
    patches.set(adapter, "_compiled", None)  # a compiled module would be recompiled under the mode
    try:
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            adapter.network(x[:1], t[:1], {k: v[:1] for k, v in cond.items()})
    finally:
        patches.undo()
    return float(counter.get_total_flops())


class Floor:
    """Replays recorded network samples in batches, outside any recorder: the pipeline's own
    attention processors everywhere (SDPA in diffusers), nothing captured."""

    def __init__(self, adapter, samples: tuple[torch.Tensor, torch.Tensor, Cond], device: torch.device):
        self.adapter, self.samples = adapter, samples
        self.sync = device_sync(torch.device(device))

    @property
    def count(self) -> int:
        return int(self.samples[0].shape[0])

    def processors(self) -> list[str]:
        """Class names of the denoiser's attention processors as the floor runs them."""
        return sorted({type(p).__name__ for p in attention_processors(self.adapter.denoiser).values()})

    @torch.no_grad()
    def replay(self, batch_size: int) -> float:
        """Seconds to run every sample once, `batch_size` samples per network call."""
        x, t, cond = self.samples
        self.sync()
        start = time.perf_counter()
        for lo in range(0, self.count, batch_size):
            rows = slice(lo, lo + batch_size)
            self.adapter._forward(x[rows], t[rows], {k: v[rows] for k, v in cond.items()})
        self.sync()
        return time.perf_counter() - start

    def sweep(self, batch_sizes: Iterable[int], repeats: int, warmup: int) -> dict[int, float | None]:
        """Mean seconds per replay for each batch size (`warmup` untimed replays first); None
        where the batch does not fit in memory."""
        out: dict[int, float | None] = {}
        for b in batch_sizes:
            try:
                for _ in range(warmup):
                    self.replay(b)
                out[b] = sum(self.replay(b) for _ in range(repeats)) / repeats
            except (torch.OutOfMemoryError, RuntimeError) as err:
                if not is_out_of_memory(err):
                    raise
                out[b] = None
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        return out


# ------------------------------------------------------------------ tables


def _fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _settings(settings: dict[str, Any]) -> str:
    """The execution settings that differ from the defaults, e.g. "channels-last, compile default"."""
    out = ["channels-last"] if settings.get("channels_last") else []
    if settings.get("compile"):
        out.append(f"compile {settings['compile']}")
    if settings.get("capture_precision", "float32") != "float32":
        out.append(f"capture {settings['capture_precision']}")
    return ", ".join(out)


def format_tables(records: list[dict[str, Any]]) -> str:
    """Markdown tables of `scripts/bench_gpu.sh` records ({"step", "result"} or {"step", "failed"}):
    one row per step with the headline figures, then the breakdown in ms per image."""
    head = (
        "| step | device | model | px | dtype | classes | batch | s/image | s/image unsynced | peak MB "
        "| floor s/image (batch) | s/image / floor | network / floor | TFLOPS network, floor | overhead | syncs/image "
        "| speedup vs reference (max abs diff) | settings | max abs diff vs plain run |"
    )
    rows = [head, "|" + "---|" * head.count(" | ") + "---|"]
    parts = [*PARTS, "unaccounted"]
    brk = ["| step | " + " | ".join(parts) + " |", "|" + "---|" * (len(parts) + 1)]
    for rec in records:
        if "result" not in rec:
            rows.append(f"| {rec['step']} | failed: {rec.get('failed', 'no result')} |")
            continue
        res = rec["result"]
        run = res.get("optimized", res)
        floor = run.get("floor_sec_per_image")
        speedup = f"{res['speedup']:.2f} ({res['max_abs_diff']:.1e})" if "speedup" in res else ""
        against = f"{run['max_abs_diff_vs']['max_abs_diff']:.1e}" if "max_abs_diff_vs" in run else ""
        tflops = f"{_fmt(run.get('network_tflops'), 1)}, {_fmt(run.get('floor_tflops'), 1)}"
        rows.append(
            " | ".join(
                [
                    f"| {rec['step']}",
                    run["device_name"],
                    run["model"],
                    str(run["resolution"]),
                    run["dtype"],
                    str(run["classes"]),
                    str(run["batch_size"]),
                    _fmt(run["sec_per_image"]),
                    _fmt(run.get("sec_per_image_unsynced")),
                    f"{run['peak_mem_mb']:.0f}",
                    f"{_fmt(floor)} ({run.get('floor_batch', '-')})",
                    _fmt(run.get("sec_per_floor"), 2),
                    _fmt(run.get("network_sec_per_floor"), 2),
                    tflops,
                    _fmt(run["overhead_fraction"]),
                    str(run.get("syncs_per_image", "-")),
                    speedup,
                    _settings(run.get("settings", {})),
                    f"{against} |",
                ]
            )
        )
        ms = run.get("breakdown_sec_per_image", {})
        brk.append(
            f"| {rec['step']} | "
            + " | ".join(_fmt(ms[p] * 1e3 if p in ms else None, 1) for p in parts)
            + " |"
        )
    return "\n".join(rows) + "\n\nTime per image outside and inside the network, ms:\n\n" + "\n".join(brk)
