"""Loading pipelines and choosing the adapter for an architecture family."""

from __future__ import annotations

from pathlib import Path

import torch

from elbo_t2ialign.core import placement as placing
from elbo_t2ialign.core.adapters.auraflow import AuraFlowAdapter
from elbo_t2ialign.core.adapters.base import ModelAdapter
from elbo_t2ialign.core.adapters.chat import require_diffusers
from elbo_t2ialign.core.adapters.chroma import CHROMA_SINCE, ChromaAdapter
from elbo_t2ialign.core.adapters.cogview4 import CogView4Adapter
from elbo_t2ialign.core.adapters.flux2 import FLUX2_KLEIN_SINCE, FLUX2_SINCE, Flux2Adapter
from elbo_t2ialign.core.adapters.hunyuanimage import SINCE as HUNYUANIMAGE_SINCE
from elbo_t2ialign.core.adapters.hunyuanimage import HunyuanImageAdapter
from elbo_t2ialign.core.adapters.lumina2 import Lumina2Adapter
from elbo_t2ialign.core.adapters.qwenimage import QWENIMAGE_SINCE, QwenImageAdapter
from elbo_t2ialign.core.adapters.sana import SanaAdapter
from elbo_t2ialign.core.adapters.transformers import FluxAdapter, MMDiTAdapter, PixArtAdapter
from elbo_t2ialign.core.adapters.unet import UNetAdapter
from elbo_t2ialign.core.adapters.zimage import ZIMAGE_SINCE, ZImageAdapter
from elbo_t2ialign.core.compat import dtype_keyword
from elbo_t2ialign.core.model_files import check_pipeline_folder, mismatch

# Denoiser class -> adapter. The choice is made once, from the pipeline's components.
TRANSFORMER_ADAPTERS: dict[str, type[ModelAdapter]] = {
    "SD3Transformer2DModel": MMDiTAdapter,
    "FluxTransformer2DModel": FluxAdapter,
    "PixArtTransformer2DModel": PixArtAdapter,
    "Flux2Transformer2DModel": Flux2Adapter,
    "ChromaTransformer2DModel": ChromaAdapter,
    "QwenImageTransformer2DModel": QwenImageAdapter,
    "ZImageTransformer2DModel": ZImageAdapter,
}
TRANSFORMER_ADAPTERS["SanaTransformer2DModel"] = SanaAdapter
TRANSFORMER_ADAPTERS["Lumina2Transformer2DModel"] = Lumina2Adapter
TRANSFORMER_ADAPTERS["CogView4Transformer2DModel"] = CogView4Adapter
TRANSFORMER_ADAPTERS["HunyuanImageTransformer2DModel"] = HunyuanImageAdapter
TRANSFORMER_ADAPTERS["AuraFlowTransformer2DModel"] = AuraFlowAdapter

# pipelines of the families that need a newer diffusers than the floor: class -> (family, first release)
PIPELINE_SINCE = {
    "ChromaPipeline": ("Chroma", CHROMA_SINCE),
    "Flux2Pipeline": ("FLUX.2", FLUX2_SINCE),
    "Flux2KleinPipeline": ("FLUX.2 [klein]", FLUX2_KLEIN_SINCE),
    "QwenImagePipeline": ("Qwen-Image", QWENIMAGE_SINCE),
    "ZImagePipeline": ("Z-Image", ZIMAGE_SINCE),
    "HunyuanImagePipeline": ("HunyuanImage 2.1", HUNYUANIMAGE_SINCE),  # Sana, Lumina2, CogView4: in the floor
}
REPO_ROOT = Path(__file__).resolve().parents[3]  # relative model folders are also looked up here

__all__ = [
    "ModelAdapter",
    "adapter_for",
    "load_pipeline",
    "place_pipeline",
    "resolve_device",
    "resolve_dtype",
]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """Device "auto" -> CUDA when available, else CPU; anything else is taken as given."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """Dtype "auto" -> float32 on CPU, float16 elsewhere (method.md §8)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float32 if device.type == "cpu" else torch.float16
    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "float16": torch.float16,
        "fp16": torch.float16,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
    }
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(names)} or 'auto'")
    return names[dtype]


def prepare_pipeline(pipe, device: torch.device, dtype: torch.dtype):
    """Move to the device; networks in `dtype`, the VAE in float32 (method.md §8). A pipeline that
    carries a device map, offload or casting hooks, or quantized weights (`placement.is_placed`)
    is not moved: its placement is taken as it is, and its placed components keep their dtype."""
    placed = placing.is_placed(pipe)
    if not placed:
        pipe.to(device)
    for name, module in placing.modules(pipe).items():
        if not (placed and placing.module_is_placed(module)):
            target = torch.float32 if name == "vae" else dtype
            if module.dtype != target:
                module.to(dtype=target)
        module.requires_grad_(False)
        module.eval()
    return pipe


def load_pipeline(
    model_id: str,
    device: torch.device,
    dtype: torch.dtype,
    prepare: bool = True,
    placement: placing.Placement | str | None = None,
):
    """A diffusers pipeline from a hub id or a local folder (relative: from the working directory, else
    from the repository root), with a clear message when it is unreachable. Prepared for `device` and
    `dtype` (`prepare_pipeline`), unless `prepare=False`: for a pipeline that goes straight to
    `adapter_for`, which prepares every pipeline it wraps, so that it is prepared once.

    `placement` (core/placement.py; default: the whole pipeline on `device`): a placement other than
    `device` is applied here, computing on `device`, and the pipeline is then never moved again."""
    from diffusers import DiffusionPipeline

    where = placing.Placement.of(placement)
    source = model_source(model_id)
    local = Path(source)
    check_release(source)  # a family newer than the installed diffusers: one line naming the release
    if local.is_dir():  # a damaged folder: one line naming the file (core/model_files.py)
        check_pipeline_folder(local)
    try:
        # the safety checker is never run here: skip loading it
        pipe = DiffusionPipeline.from_pretrained(
            source,
            safety_checker=None,
            **{dtype_keyword("diffusers"): dtype},
            **placing.load_kwargs(where, dtype),
        )
    except (OSError, ValueError) as err:
        if local.is_dir() and mismatch(local, err):
            raise mismatch(local, err) from err
        if local.exists() or model_id.startswith((".", "/", "~")):
            raise FileNotFoundError(
                f"cannot load a diffusers pipeline from folder {model_id!r}: {err}"
            ) from err
        raise FileNotFoundError(
            f"cannot load model {model_id!r}: it is not a local folder and could not be fetched from the "
            "Hugging Face Hub (offline, no access, or not in the cache). Download it where there is network "
            f"(`hf download {model_id} --local-dir <folder>`) and pass that folder instead, e.g. "
            "Aligner.from_pretrained('<folder>') or model.id=<folder> on the command line."
        ) from err
    if prepare or where.kind != "device" or where.storage_dtype:
        return place_pipeline(pipe, where, device, dtype)
    return pipe


def model_source(model_id: str) -> str:
    """A local folder for `model_id` when there is one (relative: from the working directory, else
    from the repository root, e.g. the bundled testbed model), else the hub id as given."""
    local = Path(model_id).expanduser()
    if not local.is_absolute() and not local.exists() and (REPO_ROOT / local).is_dir():
        local = REPO_ROOT / local
    return str(local) if local.is_dir() else model_id


def place_pipeline(pipe, placement: placing.Placement | str | None, device: torch.device, dtype: torch.dtype):
    """Cast a loaded pipeline and put it into `placement`, computing on `device`. Offloading
    placements cast on the CPU first and leave the moving to their hooks."""
    where = placing.Placement.of(placement)
    offloads = where.kind not in ("device", "balanced")
    prepare_pipeline(pipe, torch.device("cpu") if offloads else device, dtype)
    placing.apply(pipe, where, device, dtype)
    return pipe


def check_release(source: str) -> None:
    """Refuse, in one line naming the release needed, a pipeline (read from its model_index.json, in a
    folder or the local hub cache) whose family the installed diffusers predates. Sources whose index
    cannot be read here are left to from_pretrained."""
    from diffusers import DiffusionPipeline

    try:
        name = DiffusionPipeline.load_config(source).get("_class_name")
    except Exception:  # unreachable or not a pipeline: from_pretrained says what is wrong
        return
    if name in PIPELINE_SINCE:
        require_diffusers(*PIPELINE_SINCE[name])


def adapter_for(
    pipe,
    device: torch.device,
    dtype: torch.dtype,
    resolution: int | None = None,
    max_sequence_length: int | None = None,
) -> ModelAdapter:
    """The adapter of the pipeline's architecture family, chosen from its denoiser component; the
    pipeline is prepared for `device` and `dtype` first (`prepare_pipeline`), once its family is known
    to be supported; a placed pipeline is not moved, and the adapter computes where its denoiser's
    hooks say (`placement.pipeline_device`)."""
    if getattr(pipe, "unet", None) is not None:
        adapter = UNetAdapter
    else:
        name = type(getattr(pipe, "transformer", None)).__name__
        if name not in TRANSFORMER_ADAPTERS:
            raise ValueError(
                f"unsupported pipeline {type(pipe).__name__}: denoiser {name} is not one of the supported "
                f"families (UNet2DConditionModel, {', '.join(TRANSFORMER_ADAPTERS)})"
            )
        adapter = TRANSFORMER_ADAPTERS[name]
    if placing.is_placed(pipe):
        device = placing.pipeline_device(pipe)
    prepare_pipeline(pipe, device, dtype)
    return adapter(pipe, device, dtype, resolution, max_sequence_length)
