"""The memory plan printed before a model is loaded: sizes, placement, estimated peaks, devices.

Component sizes come from the safetensors headers of a local folder or of the Hugging Face cache
(tensor shapes only: nothing is loaded to measure them), or from the modules of a pipeline built
in code (`tiny:` models). Each floating-point weight is counted in the dtype it will be held in
(the VAE in float32, the denoiser in `storage_dtype` when set, 1 byte for 8-bit and half a byte for
4-bit quantization). The estimated peak of a device = the weights resident there under the
placement + the denoiser's working memory for the batch (`activation_bytes`), an estimate stated as
such; docs/performance.md compares it with measured peaks.

`plan_and_check` logs the plan, refuses (one line naming a placement or storage setting that
would fit) a plan whose peak exceeds a device's budget (`model.max_memory`, else its free memory),
and resolves `auto` to the least-offloaded placement that fits.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from elbo_t2ialign.core import placement as placing

log = logging.getLogger(__name__)

GB = 1e9
ACTIVATION_FACTOR = 16  # live (B, tokens, width) float32 tensors in a denoiser block, an estimate
SELF_AGGREGATES = 2  # the refinement's two (R^2, R^2) float32 running sums (method.md §5.4)
CHUNK_BYTES = 256 * 2**20  # the capture's attention chunk bound (AlignOptions.self_attention_chunk_mb)
FLOAT_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1}
OTHER_DTYPES = {"I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


@dataclass
class ComponentSize:
    """What a component holds, counted from tensor shapes."""

    name: str
    floats: int = 0  # floating-point elements (held in the chosen dtype)
    other_bytes: int = 0  # integer / boolean tensors, as stored
    largest_block: int = 0  # floating elements of its largest block group (block-level offload)
    largest_tensor: int = 0  # elements of its largest tensor (~ leaf-level offload)

    def add(self, key: str, numel: int, floating: bool, itemsize: int, blocks: dict[str, int]) -> None:
        if floating:
            self.floats += numel
            self.largest_tensor = max(self.largest_tensor, numel)
            group = block_of(key)
            blocks[group] = blocks.get(group, 0) + numel
        else:
            self.other_bytes += numel * itemsize


def block_of(key: str) -> str:
    """The block group of a weight name as block-level group offloading forms them: an entry of a
    top-level ModuleList ("down_blocks.1...." -> "down_blocks.1"), else the rest of the module."""
    parts = key.split(".")
    for i in range(len(parts) - 1):
        if parts[i + 1].isdigit():
            return ".".join(parts[: i + 2])
    return "<rest>"


def read_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (8-byte little-endian length, then the JSON)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files of one component folder: the shards of its index when there is one,
    else its single file; the plain (non-variant) set first, else a variant's (fp16 ...)."""
    indexes = sorted(folder.glob("*.safetensors.index.json"), key=lambda p: (p.name.count("."), p.name))
    if indexes:
        shards = set(json.loads(indexes[0].read_text())["weight_map"].values())
        return [folder / s for s in sorted(shards)]
    files = sorted(folder.glob("*.safetensors"), key=lambda p: (p.name.count("."), p.name))
    return files[:1]


def sizes_from_folder(root: Path) -> dict[str, ComponentSize] | None:
    """Sizes of the components of a diffusers folder (model_index.json + safetensors headers); None
    when a component's weights are missing or not in safetensors form."""
    index = root / "model_index.json"
    if not index.is_file():
        return None
    sizes = {}
    for name, spec in json.loads(index.read_text()).items():
        if name.startswith("_") or not isinstance(spec, list) or spec[0] is None:
            continue
        folder = root / name
        if not (folder / "config.json").is_file():
            continue  # tokenizers, schedulers
        files = _weight_files(folder)
        if not files or not all(f.is_file() for f in files):
            return None
        size, blocks = ComponentSize(name), {}
        for f in files:
            for key, info in read_header(f).items():
                if key == "__metadata__":
                    continue
                numel = 1
                for d in info["shape"]:
                    numel *= d
                dt = info["dtype"]
                size.add(key, numel, dt in FLOAT_DTYPES, OTHER_DTYPES.get(dt, 1), blocks)
        size.largest_block = max(blocks.values(), default=0)
        sizes[name] = size
    return sizes


def local_folder(model_id: str) -> Path | None:
    """The local folder of a model: the folder itself, or its snapshot in the Hugging Face cache
    (looked up without network), else None."""
    from elbo_t2ialign.core.adapters import model_source

    source = Path(model_source(model_id))
    if source.is_dir():
        return source
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model_id, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached, not a repo id, offline: the sizes are unknown
        return None


def sizes_from_pipeline(pipe) -> dict[str, ComponentSize]:
    """Sizes of the modules of a pipeline built in code."""
    sizes = {}
    for name, module in placing.modules(pipe).items():
        size, blocks = ComponentSize(name), {}
        for key, tensor in [*module.named_parameters(), *module.named_buffers()]:
            size.add(key, tensor.numel(), tensor.is_floating_point(), tensor.element_size(), blocks)
        size.largest_block = max(blocks.values(), default=0)
        sizes[name] = size
    return sizes


def _configs_from_folder(root: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    def read(name: str) -> dict[str, Any]:
        path = root / name / "config.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    return read("unet") or read("transformer"), read("vae")


def activation_bytes(
    denoiser: Mapping[str, Any], vae: Mapping[str, Any], batch: int, resolution: int | None
) -> int:
    """Estimated working memory of the denoiser for `batch` images: ACTIVATION_FACTOR live
    (batch, tokens, width) float32 tensors, the capture's attention chunk, and the refinement's
    running sums over the finest attention grid."""
    scale = 2 ** (len(vae.get("block_out_channels") or [0, 0, 0, 0]) - 1)
    size = vae.get("sample_size") or 512
    res = int(resolution or (size[0] if isinstance(size, (list, tuple)) else size))
    patch = denoiser.get("patch_size") or 1  # a pair or triple in some families (e.g. HunyuanImage)
    side = res // scale // int(patch[-1] if isinstance(patch, (list, tuple)) else patch)
    widths = denoiser.get("block_out_channels") or [
        int(denoiser.get("num_attention_heads") or 8) * int(denoiser.get("attention_head_dim") or 64)
    ]
    tokens = side * side + int(denoiser.get("joint_attention_dim") is not None) * 256
    heads = denoiser.get("num_attention_heads") or denoiser.get("attention_head_dim") or 8
    heads = max(heads) if isinstance(heads, (list, tuple)) else int(heads)
    working = ACTIVATION_FACTOR * batch * tokens * max(widths) * 4
    attention = min(CHUNK_BYTES, batch * heads * tokens * tokens * 4)  # scores of the largest layer
    return int(working + attention + SELF_AGGREGATES * (side * side) ** 2 * 4)


def itemsizes(
    sizes: Mapping[str, ComponentSize], where: placing.Placement, dtype: torch.dtype
) -> dict[str, float]:
    """Bytes per floating-point weight of each component in the chosen dtype and storage."""
    out = {
        name: (4.0 if name == "vae" else float(torch.empty((), dtype=dtype).element_size())) for name in sizes
    }
    denoiser = "unet" if "unet" in sizes else "transformer"
    if where.storage_dtype and denoiser in out:
        out[denoiser] = float(
            torch.empty((), dtype=placing.STORAGE_DTYPES[where.storage_dtype]).element_size()
        )
    if where.quantization:
        backend, components, _ = placing.quant_settings(where.quantization)
        bytes_per = 0.5 if backend == "bitsandbytes_4bit" else 1.0
        for name in components or [denoiser]:
            if name in out:
                out[name] = bytes_per
    return out


def fmt(nbytes: float) -> str:
    if nbytes >= GB:
        return f"{nbytes / GB:.2f} GB"
    return f"{nbytes / 1e6:.1f} MB" if nbytes >= 1e5 else f"{int(nbytes)} bytes"


@dataclass
class Plan:
    placement: placing.Placement
    execution: torch.device
    components: dict[str, tuple[int, str]]  # name -> (bytes in the chosen dtype, where it lives)
    peaks: dict[str, int]  # device -> estimated peak bytes
    budgets: dict[str, int | None]  # device -> bytes available (max_memory, else free); None: unknown
    activations: int

    def overflow(self) -> list[str]:
        """The devices whose estimated peak exceeds their budget, as text."""
        return [
            f"{dev}: {fmt(self.peaks[dev])} > {fmt(budget)}"
            for dev, budget in self.budgets.items()
            if budget is not None and self.peaks.get(dev, 0) > budget
        ]

    def lines(self) -> list[str]:
        out = [f"memory plan: placement {self.placement.describe()}, computing on {self.execution}"]
        for name, (nbytes, where) in self.components.items():
            out.append(f"  {name:<16} {fmt(nbytes):>10}  {where}")
        out.append(f"  working memory for the batch (estimate) {fmt(self.activations)} on {self.execution}")
        for dev, peak in self.peaks.items():
            budget = self.budgets.get(dev)
            cap = f" of {fmt(budget)} available" if budget is not None else ""
            out.append(f"  estimated peak on {dev}: {fmt(peak)}{cap}")
        if self.placement.reason:
            out.append(f"  auto: {self.placement.reason}")
        return out


def make_plan(
    sizes: Mapping[str, ComponentSize],
    where: placing.Placement,
    execution: torch.device,
    dtype: torch.dtype,
    activations: int,
    budgets: Mapping[str, int | None],
) -> Plan:
    """Where each component lives under `where` and the estimated peak per device."""
    per = itemsizes(sizes, where, dtype)
    nbytes = {n: int(s.floats * per[n] + s.other_bytes) for n, s in sizes.items()}
    total = sum(nbytes.values())
    exe, cpu = str(execution), "cpu"
    kind, disk = where.kind, bool(where.offload_folder)
    leaf = where.offload_type == "leaf_level"
    largest_tensor = max((int(s.largest_tensor * per[n]) for n, s in sizes.items()), default=0)
    largest_block = max((int(s.largest_block * per[n]) for n, s in sizes.items()), default=0)
    if kind in ("device", "balanced"):
        onloaded, resident, home = total, 0, exe
    elif kind == "model-offload":
        onloaded, resident, home = (
            max(nbytes.values(), default=0),
            total,
            "cpu, one component at a time on " + exe,
        )
    elif kind == "sequential-offload":
        onloaded, resident, home = largest_tensor, total, "cpu, one leaf module at a time on " + exe
    else:  # group-offload
        group = largest_tensor if leaf else largest_block
        onloaded = group
        resident = group if disk else total
        home = (
            f"{where.offload_folder}" if disk else "cpu"
        ) + f", one {'leaf' if leaf else 'block'} at a time on {exe}"
    if kind == "balanced":
        home = "spread over the GPUs (device_map=balanced)"
    peaks: dict[str, int] = {}
    if exe == cpu:
        peaks[cpu] = max(onloaded, resident) + activations
    else:
        peaks[exe] = onloaded + activations
        if resident:
            peaks[cpu] = resident
    return Plan(
        placement=where,
        execution=execution,
        components={n: (b, home) for n, b in nbytes.items()},
        peaks=peaks,
        budgets={dev: budgets.get(dev) for dev in peaks},
        activations=activations,
    )


def available(device: str) -> int | None:
    """Free memory of a device now: CUDA's free bytes, the host's MemAvailable; None: unknown."""
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.mem_get_info(dev)[0])
    if dev.type == "cpu":
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    return None


def candidates(where: placing.Placement) -> list[placing.Placement]:
    """Placements in order of increasing offloading (the order `auto` tries them in)."""
    base = where.but(kind="device", reason="", offload_folder=None)
    out = [base]
    if torch.cuda.device_count() > 1:
        out.append(base.but(kind="balanced"))
    out += [
        base.but(kind="model-offload"),
        base.but(kind="group-offload", offload_type="block_level"),
        base.but(kind="group-offload", offload_type="leaf_level"),
        base.but(kind="sequential-offload"),
    ]
    if where.offload_folder:
        out += [
            base.but(kind="group-offload", offload_type="block_level", offload_folder=where.offload_folder),
            base.but(kind="group-offload", offload_type="leaf_level", offload_folder=where.offload_folder),
        ]
    return out


def _setting(where: placing.Placement) -> str:
    text = f"model.placement={where.kind}"
    if where.kind == "group-offload":
        text += f" model.offload_type={where.offload_type}"
        if where.offload_folder:
            text += f" model.offload_folder={where.offload_folder}"
    if where.storage_dtype:
        text += f" model.storage_dtype={where.storage_dtype}"
    return text


def check(
    sizes: Mapping[str, ComponentSize] | None,
    where: placing.Placement,
    execution: torch.device,
    dtype: torch.dtype,
    activations: int,
    budgets: Mapping[str, int | None] | None = None,
) -> tuple[placing.Placement, Plan | None]:
    """Resolve `auto` and check that the plan fits; returns the placement to apply and its plan.
    Raises PlacementError (one line, naming a setting that would fit) when it does not."""
    if sizes is None:  # nothing to measure from: no plan, and auto takes the single device
        if where.kind == "auto":
            where = where.but(kind="device", reason="component sizes unknown (no local safetensors): device")
        return where, None
    if budgets is None:
        caps = placing.memory_caps(where.max_memory, execution)
        budgets = {dev: caps.get(dev, available(dev)) for dev in {str(execution), "cpu"}}
    if where.kind == "auto":
        for option in candidates(where):
            plan = make_plan(sizes, option, execution, dtype, activations, budgets)
            if not plan.overflow():
                peak = ", ".join(f"{d} {fmt(p)}" for d, p in plan.peaks.items())
                reason = f"chose {option.describe()}: the least-offloaded placement that fits (peaks {peak})"
                plan.placement = option.but(reason=reason)
                return plan.placement, plan
        first = make_plan(sizes, candidates(where)[0], execution, dtype, activations, budgets)
        raise placing.PlacementError(
            f"memory plan: auto found no placement that fits ({'; '.join(first.overflow())} on a single "
            "device); " + _hint(sizes, where, execution, dtype, activations, budgets)
        )
    plan = make_plan(sizes, where, execution, dtype, activations, budgets)
    over = plan.overflow()
    if over:
        raise placing.PlacementError(
            f"memory plan: placement {where.describe()} does not fit ({'; '.join(over)}); "
            + _hint(sizes, where, execution, dtype, activations, budgets)
        )
    return where, plan


def _hint(sizes, where, execution, dtype, activations, budgets) -> str:
    """The least-offloaded setting that fits: placements first (offloading to a folder, <folder>
    when none is set, last), then the same with float8 storage of the denoiser."""
    trial = where.but(kind="auto", offload_folder=where.offload_folder or "<folder>")
    storages = [where.storage_dtype] + ([] if where.storage_dtype else ["float8_e4m3fn"])
    fits = []
    for storage in storages:
        for option in candidates(trial.but(storage_dtype=storage)):
            if not make_plan(sizes, option, execution, dtype, activations, budgets).overflow():
                fits.append(_setting(option))
                break
    if not fits:
        return (
            "nothing fits, not even offloaded to a folder with float8 storage: use a device with more memory"
        )
    return " would fit, or ".join(fits) + " would fit"


class _CurrentStderr(logging.StreamHandler):
    """A handler that writes to `sys.stderr` as it is when a record comes, not as it was when the
    handler was made (a handler kept for the process must not hold a stream that is later closed,
    such as a test's captured stderr)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ sets it
        pass


def print_plans(stream=None) -> None:
    """Print the plans of this process to `stream` too (default: the current stderr; stdout keeps a
    command's report), for entry points that configure no logging of their own (explain); once,
    however often called."""
    if not any(getattr(h, "_memory_plan", False) for h in log.handlers):
        handler = logging.StreamHandler(stream) if stream is not None else _CurrentStderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._memory_plan = True  # type: ignore[attr-defined]
        log.addHandler(handler)
    log.setLevel(logging.INFO)


def plan_and_check(
    model_id: str,
    where: placing.Placement,
    execution: torch.device,
    dtype: torch.dtype,
    batch_size: int,
    resolution: int | None = None,
    pipe=None,
) -> placing.Placement:
    """Measure the sizes (headers of a local folder or the hub cache; or the modules of `pipe`),
    log the memory plan, refuse one that cannot fit, resolve `auto`. Returns the placement to apply."""
    execution = torch.device(execution)
    if execution.type == "cuda" and execution.index is None:  # "cuda": the current device, by index
        execution = torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    if pipe is not None:
        sizes = sizes_from_pipeline(pipe)
        den = placing.denoiser_of(pipe)
        den_cfg, vae_cfg = dict(den.config) if den is not None else {}, dict(pipe.vae.config)
    else:
        folder = local_folder(model_id)
        sizes = sizes_from_folder(folder) if folder is not None else None
        den_cfg, vae_cfg = _configs_from_folder(folder) if folder is not None else ({}, {})
    activations = activation_bytes(den_cfg, vae_cfg, batch_size, resolution) if den_cfg else 0
    resolved, plan = check(sizes, where, execution, dtype, activations)
    if plan is None:
        log.info(
            "memory plan: placement %s on %s (component sizes unknown: no local safetensors for %s)",
            resolved.describe(),
            execution,
            model_id,
        )
    else:
        for line in plan.lines():
            log.info("%s", line)
    return resolved
