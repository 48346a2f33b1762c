"""Where a pipeline's weights live and run: placements, storage precision and offload hooks.

A placement is applied once, when the pipeline is loaded (`apply`); afterwards the pipeline is never
moved again with `.to()`: a pipeline that carries a device map or accelerate / diffusers offload
hooks (whoever put them there) is taken as it is (`is_placed`), and the device each component
computes on is read from its hooks (`execution_device`). Placements (docs/performance.md, "Big
models"):

    device              the whole pipeline on the execution device (the default)
    balanced            diffusers' pipeline-level device_map="balanced": components spread over the GPUs
    model-offload       enable_model_cpu_offload: one whole component at a time on the device
    sequential-offload  enable_sequential_cpu_offload: one leaf module at a time on the device
    group-offload       diffusers' group offloading, block or leaf level, in CPU memory or to a folder
    auto                the least-offloaded of these that the memory plan says fits (core/memory.py)

Storage precision: `storage_dtype` stores the denoiser's weights in a smaller dtype (e.g.
float8_e4m3fn) and casts each layer to the compute dtype when it runs (diffusers' layerwise
casting); `quantization` loads components through diffusers' quantization backends (optional
packages: bitsandbytes, torchao, optimum-quanto).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

PLACEMENTS = ("device", "balanced", "model-offload", "sequential-offload", "group-offload", "auto")
OFFLOAD_TYPES = ("block_level", "leaf_level")
GPU_ONLY = ("balanced",)  # placements whose loading needs accelerators (the others run with CPU as device)
STORAGE_DTYPES = {
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
# model.quantization.backend -> (diffusers' quant_backend name, the package it needs, the pip extra)
QUANT_BACKENDS = {
    "bitsandbytes_4bit": ("bitsandbytes_4bit", "bitsandbytes", "bitsandbytes"),
    "bitsandbytes_8bit": ("bitsandbytes_8bit", "bitsandbytes", "bitsandbytes"),
    "torchao": ("torchao", "torchao", "torchao"),
    "quanto": ("quanto", "optimum.quanto", "quanto"),
}
# what each feature needs of diffusers (checked where it is used, with one line naming the release)
NEEDS = {
    "disk": ("0.35.0", "group offloading to a folder (model.offload_folder)"),
    "quantization": ("0.34.0", "model.quantization (PipelineQuantizationConfig)"),
}
# model config keys of this module; those that change no number a run writes are PLACEMENT_ONLY
MODEL_KEYS = ("placement", "offload_type", "offload_folder", "max_memory", "storage_dtype", "quantization")
PLACEMENT_ONLY = ("placement", "offload_type", "offload_folder", "max_memory")


class PlacementError(ValueError):
    """A placement setting that cannot be used; one line that says what to do."""


@dataclass(frozen=True)
class Placement:
    """How a pipeline is placed (see the module docstring); `Placement()` is today's single device."""

    kind: str = "device"
    offload_type: str = "block_level"  # group-offload: groups of blocks (ModuleList entries) or leaf modules
    offload_folder: str | None = None  # group-offload: weights offloaded to safetensors files here, not RAM
    max_memory: Mapping[Any, Any] | str | int | None = None  # caps for the memory plan and `auto`
    storage_dtype: str | None = None  # the denoiser's weights stored in this dtype (layerwise casting)
    quantization: Mapping[str, Any] | None = None  # {backend, components, kwargs}: see QUANT_BACKENDS
    reason: str = field(default="", compare=False)  # why `auto` chose this placement

    def __post_init__(self):
        if self.kind not in PLACEMENTS:
            raise PlacementError(f"model.placement must be one of {list(PLACEMENTS)}, got {self.kind!r}")
        if self.offload_type not in OFFLOAD_TYPES:
            raise PlacementError(
                f"model.offload_type must be one of {list(OFFLOAD_TYPES)}, got {self.offload_type!r}"
            )
        if self.offload_folder is not None and self.kind not in ("group-offload", "auto"):
            raise PlacementError(
                f"model.offload_folder is used by placement group-offload (or auto), not {self.kind!r}; "
                "set model.placement=group-offload or model.offload_folder=null"
            )
        if self.storage_dtype is not None and self.storage_dtype not in STORAGE_DTYPES:
            raise PlacementError(
                f"model.storage_dtype must be null or one of {list(STORAGE_DTYPES)}, got {self.storage_dtype!r}"
            )
        if self.quantization is not None:
            quant_settings(self.quantization)
        if self.max_memory is not None:
            memory_caps(self.max_memory, torch.device("cpu"))

    @classmethod
    def of(cls, value: str | Placement | Mapping[str, Any] | None) -> Placement:
        """A Placement from a placement name, a Placement, or a model config mapping."""
        if value is None:
            return cls()
        if isinstance(value, Placement):
            return value
        if isinstance(value, str):
            return cls(kind=value)
        if isinstance(value, Mapping):
            return cls.from_mapping(value)
        raise PlacementError(f"placement must be a name, a Placement or a mapping, got {value!r}")

    @classmethod
    def from_mapping(cls, model_cfg: Mapping[str, Any]) -> Placement:
        """From a model config (configs/model/*.yaml): its keys in MODEL_KEYS, absent ones default."""
        quant = model_cfg.get("quantization")
        return cls(
            kind=model_cfg.get("placement") or "device",
            offload_type=model_cfg.get("offload_type") or "block_level",
            offload_folder=model_cfg.get("offload_folder") or None,
            max_memory=_plain(model_cfg.get("max_memory")),
            storage_dtype=model_cfg.get("storage_dtype") or None,
            quantization=_plain(quant) if quant else None,
        )

    def but(self, **changes: Any) -> Placement:
        return replace(self, **changes)

    def describe(self) -> str:
        text = self.kind
        if self.kind == "group-offload":
            text += f" ({self.offload_type}, {'to ' + self.offload_folder if self.offload_folder else 'in CPU memory'})"
        if self.storage_dtype:
            text += f", denoiser stored in {self.storage_dtype}"
        if self.quantization:
            text += f", quantized {quant_settings(self.quantization)[0]}"
        return text


def _plain(value: Any) -> Any:
    """An OmegaConf container (Hydra) or anything else -> plain Python values."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, (DictConfig, ListConfig)):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover - hydra is a dependency
        pass
    return value


def check_model_keys(model_cfg: Mapping[str, Any]) -> Placement:
    """Validate the placement keys of a model config; the error is one line (PlacementError)."""
    return Placement.from_mapping(model_cfg)


def result_model(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The model config as a run folder's fingerprint sees it: placement keys change no number a run
    writes (maps under every placement equal the device maps up to float rounding) and are dropped;
    storage keys change the maps and stay, unless unset (so folders written before them still match)."""
    out = {k: v for k, v in model_cfg.items() if k not in PLACEMENT_ONLY}
    for key in ("storage_dtype", "quantization"):
        if out.get(key) in (None, "", {}):
            out.pop(key, None)
    return out


# ---------------------------------------------------------------- sizes and devices
_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
}


def parse_size(value: Any) -> int:
    """ "20GB", "512MiB", 3e9 -> bytes."""
    if isinstance(value, bool):
        raise PlacementError(f"not a memory size: {value!r}")
    if isinstance(value, (int, float)):
        return int(value)
    text = str(value).strip().upper().replace(" ", "")
    for unit in sorted(_UNITS, key=len, reverse=True):
        if text.endswith(unit):
            number = text[: -len(unit)]
            try:
                return int(float(number) * _UNITS[unit])
            except ValueError:
                break
    raise PlacementError(f"not a memory size: {value!r} (write e.g. 20GB, 512MiB or a number of bytes)")


def memory_caps(max_memory: Any, execution: torch.device) -> dict[str, int]:
    """model.max_memory -> {device name: bytes}, accelerate's form ({0: 20GB, cpu: 64GB}; an integer
    key is that CUDA device) or one size for the execution device."""
    if max_memory in (None, "", {}):
        return {}
    if not isinstance(max_memory, Mapping):
        return {str(execution): parse_size(max_memory)}
    caps = {}
    for key, value in max_memory.items():
        name = f"cuda:{key}" if isinstance(key, int) or str(key).isdigit() else str(key)
        try:
            torch.device(name)
        except RuntimeError:
            raise PlacementError(
                f"model.max_memory: {key!r} is not a device (use 0, 1, ... or cpu)"
            ) from None
        caps[name] = parse_size(value)
    return caps


def quant_settings(quant: Mapping[str, Any]) -> tuple[str, list[str] | None, dict[str, Any]]:
    """model.quantization -> (backend, components to quantize or None for the denoiser, backend kwargs)."""
    if not isinstance(quant, Mapping) or "backend" not in quant:
        raise PlacementError(
            f"model.quantization must be null or a mapping with a backend (one of {list(QUANT_BACKENDS)}), "
            f"e.g. {{backend: bitsandbytes_4bit, components: [transformer]}}; got {quant!r}"
        )
    unknown = set(quant) - {"backend", "components", "kwargs"}
    if unknown:
        raise PlacementError(
            f"model.quantization: unknown keys {sorted(unknown)} (backend, components, kwargs)"
        )
    backend = quant["backend"]
    if backend not in QUANT_BACKENDS:
        raise PlacementError(
            f"model.quantization.backend must be one of {list(QUANT_BACKENDS)}, got {backend!r}"
        )
    components = quant.get("components")
    if isinstance(components, str):
        components = [components]
    return backend, (list(components) if components else None), dict(quant.get("kwargs") or {})


def diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


def _older(version: str, floor: str) -> bool:
    from packaging.version import Version

    return Version(version) < Version(floor)


def require(feature: str) -> None:
    """Refuse, in one line naming the release it needs, a feature the installed diffusers lacks."""
    floor, what = NEEDS[feature]
    have = diffusers_version()
    if _older(have, floor):
        raise PlacementError(
            f"{what} needs diffusers >= {floor}; this environment has {have}: pip install -U diffusers"
        )


def _hook_names(module: torch.nn.Module) -> set[str]:
    """The offload / casting hooks on a module or any of its submodules: "accelerate" (an accelerate
    hook: dispatch, model or sequential offload) and diffusers' registry names ("group_offloading",
    "layerwise_casting", ...)."""
    names: set[str] = set()
    for sub in module.modules():
        if getattr(sub, "_hf_hook", None) is not None:
            names.add("accelerate")
        registry = getattr(sub, "_diffusers_hook", None)
        if registry is not None:
            names.update(getattr(registry, "hooks", {}).keys())
    return names


def module_is_placed(module: torch.nn.Module) -> bool:
    """A module that must not be moved or cast with `.to()`: it carries a device map, offload or
    casting hooks, or quantized weights."""
    device_map = getattr(module, "hf_device_map", None)
    return bool(
        _hook_names(module)
        or (isinstance(device_map, Mapping) and len(set(map(str, device_map.values()))) > 1)
        or getattr(module, "is_quantized", False)
        or getattr(module, "is_loaded_in_4bit", False)
        or getattr(module, "is_loaded_in_8bit", False)
    )


def modules(pipe) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in pipe.components.items() if isinstance(m, torch.nn.Module)}


def is_placed(pipe) -> bool:
    """Whether the pipeline carries a device map (diffusers' `device_map="balanced"`) or any
    component carries hooks (offloading, layerwise casting) or quantized weights: such a pipeline
    is never moved with `.to()`."""
    return pipe_device_map(pipe) is not None or any(module_is_placed(m) for m in modules(pipe).values())


def pipe_device_map(pipe) -> Mapping[str, Any] | None:
    device_map = getattr(pipe, "hf_device_map", None)
    return device_map if isinstance(device_map, Mapping) and device_map else None


def execution_device(module: torch.nn.Module, fallback: torch.device | None = None) -> torch.device:
    """The device a component computes on: the onload device of its group offloading, else the
    execution device of its accelerate hooks (model / sequential offload, dispatch), else where its
    first real (not meta) parameter is."""
    for sub in module.modules():
        registry = getattr(sub, "_diffusers_hook", None)
        hook = registry.get_hook("group_offloading") if registry is not None else None
        if hook is not None:
            return torch.device(
                hook.config.onload_device if hasattr(hook, "config") else hook.group.onload_device
            )
    for sub in module.modules():
        device = _accelerate_device(getattr(sub, "_hf_hook", None))
        if device is not None:
            return device
    for tensor in module.parameters():
        if tensor.device.type != "meta":
            return tensor.device
    return torch.device(fallback) if fallback is not None else torch.device("cpu")


def _accelerate_device(hook) -> torch.device | None:
    if hook is None:
        return None
    for inner in getattr(hook, "hooks", ()):  # SequentialHook
        device = _accelerate_device(inner)
        if device is not None:
            return device
    device = getattr(hook, "execution_device", None)
    if device is None:
        return None
    device = torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    return torch.device("cpu") if device.type == "cpu" else device  # accelerate says cpu:0


def denoiser_of(pipe) -> torch.nn.Module | None:
    return getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)


def pipeline_device(pipe) -> torch.device:
    """The execution device of the pipeline's denoiser (the adapter's device), read from its hooks."""
    denoiser = denoiser_of(pipe)
    fallback = pipe._execution_device if hasattr(pipe, "_execution_device") else pipe.device
    return execution_device(denoiser, fallback) if denoiser is not None else torch.device(fallback)


def placement_of(pipe) -> str:
    """A one-line description of the placement a pipeline carries (for the log and the plan)."""
    if pipe_device_map(pipe) is not None:
        return f"device map {dict(pipe_device_map(pipe))}"
    found = {name: sorted(_hook_names(m)) for name, m in modules(pipe).items() if _hook_names(m)}
    return ", ".join(f"{n}: {'+'.join(h)}" for n, h in found.items()) or "device"


# ---------------------------------------------------------------- applying a placement
def load_kwargs(placement: Placement, dtype: torch.dtype) -> dict[str, Any]:
    """Extra keyword arguments of `DiffusionPipeline.from_pretrained` for this placement."""
    kwargs: dict[str, Any] = {}
    if placement.kind == "balanced":
        kwargs["device_map"] = "balanced"
        if placement.max_memory is not None:
            kwargs["max_memory"] = {
                (int(k.split(":")[1]) if k.startswith("cuda:") else k): v
                for k, v in memory_caps(placement.max_memory, torch.device("cuda:0")).items()
            }
    if placement.quantization:
        kwargs["quantization_config"] = quantization_config(placement.quantization, dtype)
    return kwargs


def installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except ModuleNotFoundError:  # a dotted name whose parent package is missing
        return False


def quantization_config(quant: Mapping[str, Any], dtype: torch.dtype):
    """diffusers' PipelineQuantizationConfig for model.quantization; a missing backend package or a
    diffusers without pipeline quantization is one line that says what to install."""
    backend, components, kwargs = quant_settings(quant)
    name, package, extra = QUANT_BACKENDS[backend]
    require("quantization")
    if not installed(package):
        raise PlacementError(
            f"model.quantization backend {backend} needs the {package} package, which is not installed: "
            f'pip install -e ".[{extra}]", or set model.quantization=null'
        )
    from diffusers.quantizers import PipelineQuantizationConfig

    if backend.startswith("bitsandbytes_4bit"):
        kwargs.setdefault("bnb_4bit_compute_dtype", dtype)
    return PipelineQuantizationConfig(
        quant_backend=name, quant_kwargs=kwargs, components_to_quantize=components or ["unet", "transformer"]
    )


def apply(pipe, placement: Placement, device: torch.device, dtype: torch.dtype) -> None:
    """Put a loaded, cast pipeline (on the CPU, or already device-mapped for `balanced`) into
    `placement`, computing on `device`: layerwise casting first (it must wrap the weights before any
    offload hook moves them), then the offload hooks. `device` and `balanced` leave where the
    modules are to `prepare_pipeline` / the loader."""
    if placement.storage_dtype:
        denoiser = denoiser_of(pipe)
        denoiser.enable_layerwise_casting(
            storage_dtype=STORAGE_DTYPES[placement.storage_dtype], compute_dtype=dtype
        )
    kind = placement.kind
    if kind == "model-offload":
        pipe.enable_model_cpu_offload(device=device)
    elif kind == "sequential-offload":
        pipe.enable_sequential_cpu_offload(device=device)
    elif kind == "group-offload":
        group_offload(pipe, device, placement.offload_type, placement.offload_folder)


def group_offload(pipe, device: torch.device, offload_type: str, folder: str | None) -> None:
    """Diffusers' group offloading on every component (as `DiffusionPipeline.enable_group_offload`
    does from diffusers 0.36; applied per component here, so that it also runs at the floor release):
    groups of one block (or leaf modules) are loaded onto `device` when they run and put back into
    CPU memory, or into safetensors files under `folder`, afterwards."""
    from diffusers.hooks import apply_group_offloading

    kwargs: dict[str, Any] = dict(
        onload_device=torch.device(device), offload_device=torch.device("cpu"), offload_type=offload_type
    )
    if offload_type == "block_level":
        kwargs["num_blocks_per_group"] = 1
    if folder:
        require("disk")
        folder = weights_folder(pipe, folder)
    for name, module in modules(pipe).items():
        if folder:
            kwargs["offload_to_disk_path"] = str(Path(folder) / name)
        if hasattr(module, "enable_group_offload"):
            module.enable_group_offload(**kwargs)
        else:
            apply_group_offloading(module=module, **kwargs)


def weights_folder(pipe, folder: str) -> str:
    """A new folder under `folder` for this pipeline's offloaded weights, removed with the pipeline
    (or at exit). Diffusers reuses a group's file when one of that name exists, and the names depend
    only on the module names: a shared folder would hand one model's weights to another."""
    import shutil
    import tempfile
    import weakref

    root = Path(folder).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    own = tempfile.mkdtemp(prefix="weights-", dir=root)
    weakref.finalize(pipe, shutil.rmtree, own, ignore_errors=True)
    return own
