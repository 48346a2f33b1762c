"""Attention capture: processors that record head-averaged attention
probabilities, and the recorder that installs them and keeps running sums.

The recorder only replaces the processors of layers that carry a non-zero
aggregation weight; every other layer keeps its original (SDPA) processor.
A captured layer computes its attention explicitly, query rows in chunks, so
the probabilities are available without a second pass and peak memory is
bounded by `chunk_mb`. The network output is that of the original processor
up to floating-point rounding.

Three processor flavours cover the families; each repeats, step for step, the
diffusers processor it replaces, read in diffusers 0.33.1 and 0.42.1 (the floor
and current releases; tests/test_attention.py fails when an installed diffusers
changes one of them, and compares every output with the original's):
- `CaptureAttnProcessor`: diffusers `Attention` with separate self/cross
  layers (UNets, PixArt), after `attention_processor.AttnProcessor2_0`;
- `CaptureJointAttnProcessor`: SD3 joint attention, sequence [image; text],
  after `attention_processor.JointAttnProcessor2_0`;
- `CaptureFluxAttnProcessor`: FLUX, sequence [text; image], double- and
  single-stream blocks, RoPE, after `transformers.transformer_flux.FluxAttnProcessor`
  (0.42.1; `attention_processor.FluxAttnProcessor2_0` in 0.33.1); Chroma uses it too.
The newer families' processors live in their adapter modules (adapters/flux2.py, qwenimage.py,
zimage.py) and compute through `_CaptureBase.attend` like these; tests/test_own_attention.py checks
every family's captured probabilities against the model's own attention.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from elbo_t2ialign.core.options import AlignOptions

# ---------------------------------------------------------------- layers


@dataclass(frozen=True)
class LayerInfo:
    """One attention layer as the method sees it."""

    name: str  # key in the denoiser's `attn_processors`
    kind: str  # "cross" | "self" | "joint"
    order: int  # position in execution order among all listed layers
    resolution: int  # side of the (square) image-token grid
    path: str  # "down" | "mid" | "up" | "stack"

    @property
    def has_cross(self) -> bool:
        return self.kind in ("cross", "joint")

    @property
    def has_self(self) -> bool:
        return self.kind in ("self", "joint")


def stage_index(layers: list[LayerInfo]) -> dict[str, int]:
    """Stage of each layer: a new stage starts whenever the resolution changes along the order."""
    stages, stage, last = {}, -1, None
    for layer in sorted(layers, key=lambda x: x.order):
        if layer.resolution != last:
            stage, last = stage + 1, layer.resolution
        stages[layer.name] = stage
    return stages


# ---------------------------------------------------------------- layer weights


def gaussian_layer_weights(layers: list[LayerInfo], sigma: float) -> dict[str, float]:
    """w_l = exp(-(l - l_mid)^2 / (2 sigma^2)) over the cross-carrying layers, renormalised to sum
    to their count. l_mid = (#down cross layers) + (#mid cross layers - 1) / 2, or the stack centre."""
    cross = sorted((layer for layer in layers if layer.has_cross), key=lambda x: x.order)
    n_down = sum(layer.path == "down" for layer in cross)
    n_mid = sum(layer.path == "mid" for layer in cross)
    l_mid = n_down + (n_mid - 1) / 2 if n_mid else (len(cross) - 1) / 2
    raw = [math.exp(-((i - l_mid) ** 2) / (2 * sigma**2)) for i in range(len(cross))]
    scale = len(cross) / sum(raw)
    return {layer.name: w * scale for layer, w in zip(cross, raw, strict=True)}


def stage_layer_weights(
    layers: list[LayerInfo], stage_weights: Sequence[float], block: str
) -> dict[str, float]:
    """One weight per resolution stage (stages counted over the layers that carry `block`)."""
    carrying = [layer for layer in layers if (layer.has_cross if block == "cross" else layer.has_self)]
    stages = stage_index(carrying)
    n_stages = max(stages.values()) + 1
    if len(stage_weights) != n_stages:
        raise ValueError(
            f"{len(stage_weights)} stage weights given but this model's {block}-attention layers form "
            f"{n_stages} resolution stages ({sorted({x.resolution for x in carrying}, reverse=True)} ...); "
            f"give {n_stages} weights"
        )
    return {layer.name: float(stage_weights[stages[layer.name]]) for layer in carrying}


def self_stage_weights(layers: list[LayerInfo], spec) -> dict[str, float]:
    """Self-attention refinement weights. "first_last": the first and last stage (the finest
    resolution of the down and up paths in a UNet; all layers of a one-stage transformer);
    "last": the last stage; or an explicit per-stage list."""
    carrying = [layer for layer in layers if layer.has_self]
    if not carrying:
        return {}
    n_stages = max(stage_index(carrying).values()) + 1
    if isinstance(spec, str):
        chosen = {"first_last": {0, n_stages - 1}, "last": {n_stages - 1}}.get(spec)
        if chosen is None:
            raise ValueError(f"unknown self-attention weight spec {spec!r}; use first_last, last or a list")
        spec = [1.0 if s in chosen else 0.0 for s in range(n_stages)]
    return stage_layer_weights(layers, list(spec), "self")


def layer_weights(layers: list[LayerInfo], options: AlignOptions) -> dict[str, dict[str, float]]:
    """Per aggregate, the weight of each layer in it (method.md §5): "cross", a Gaussian over the
    cross-attention layers (or one weight per stage when gaussian_sigma is 0); with refinement,
    "self1" and "self2", the two self-attention matrices. The recorder applies them."""
    if options.gaussian_sigma > 0:
        cross = gaussian_layer_weights(layers, options.gaussian_sigma)
    else:
        cross = stage_layer_weights(layers, options.cross_stage_weights, "cross")
    weights = {"cross": cross}
    if options.refine:
        weights["self1"] = self_stage_weights(layers, options.self_weights_1)
        weights["self2"] = self_stage_weights(layers, options.self_weights_2)
    return weights


# ------------------------------------------------------- attention maths


def attend_and_capture(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    scale: float,
    image_rows: slice,
    blocks: dict[str, slice],
    mask: torch.Tensor | None = None,
    chunk_mb: float = 256.0,
    precision: str = "float32",
    groups: torch.Tensor | None = None,
    n_groups: int = 1,
    probe: Callable[[torch.Tensor, int], None] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Attention output plus probability maps of the image-query rows.

    query (B, H, Sq, D); key, value (B, H, Sk, D); mask broadcastable to
    (B, H, Sq, Sk), additive, or boolean as SDPA takes it (True: the key may be attended). Returns the output (B, H, Sq, D) and, per block
    name, the probabilities of image queries x block keys, averaged over heads
    and summed over the batch: (n_image_rows, block_len), float32.
    Rows outside `image_rows` (text queries of joint attention) use SDPA.
    precision "float32": scores, softmax and head mean in float32 whatever the input dtype (under
    autocast too); "model": in the input dtype, as the reference's half-precision path does.
    The layer's output is always probabilities (cast to the value dtype) times values.
    groups: (B,) long, the group (collection prompt) of each batch row: the maps are then summed
    per group, (n_groups, n_image_rows, block_len).
    probe (tests): called with each chunk's per-head probabilities (B, H, rows, Sk) and the index of
    its first query row, before they are averaged; None in normal runs.
    """
    b, h, sq, _ = query.shape
    sk = key.shape[2]
    if mask is not None and mask.dtype == torch.bool:  # SDPA's boolean mask: True = may attend
        mask = torch.zeros(mask.shape, dtype=query.dtype, device=mask.device).masked_fill_(
            ~mask, float("-inf")
        )
    out = torch.empty_like(query)
    rows = range(sq)[image_rows]
    start, stop = rows.start, rows.stop
    if start > 0:
        out[:, :, :start] = _sdpa_rows(query, key, value, mask, scale, slice(0, start))
    if stop < sq:
        out[:, :, stop:] = _sdpa_rows(query, key, value, mask, scale, slice(stop, sq))
    lead = () if groups is None else (n_groups,)
    maps = {
        name: query.new_zeros((*lead, stop - start, len(range(sk)[blk])), dtype=torch.float32)
        for name, blk in blocks.items()
    }
    # rows per chunk so that the chunk's two float32 (B, H, rows, Sk) blocks, scores and
    # probabilities, stay under chunk_mb together (scaling and masking happen in place)
    step = max(1, int(chunk_mb * 2**20 // (2 * 4 * b * h * sk)))
    work = torch.float32 if precision == "float32" else query.dtype
    key_t = key.transpose(-1, -2).to(work)  # (B, H, D, Sk)
    with torch.autocast(query.device.type, enabled=False):
        for lo in range(start, stop, step):
            hi = min(lo + step, stop)
            scores = torch.matmul(query[:, :, lo:hi].to(work), key_t).mul_(scale)  # (B, H, r, Sk)
            if mask is not None:
                scores.add_(_mask_rows(mask, lo, hi).to(work))
            probs = scores.softmax(dim=-1)
            del scores
            if probe is not None:
                probe(probs, lo)
            out[:, :, lo:hi] = torch.matmul(probs.to(value.dtype), value)
            if groups is None:
                head_mean = probs.mean(dim=1).sum(dim=0).float()  # (r, Sk)
            else:  # (G, r, Sk): the rows of each group summed apart
                head_mean = probs.new_zeros((n_groups, hi - lo, sk), dtype=torch.float32)
                head_mean.index_add_(0, groups, probs.mean(dim=1).float())
            del probs
            for name, blk in blocks.items():
                maps[name][..., lo - start : hi - start, :] += head_mean[..., blk]
    return out, maps


def _mask_rows(mask: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    return mask if mask.shape[-2] == 1 else mask[..., lo:hi, :]


def _sdpa_rows(query, key, value, mask, scale, rows: slice):
    m = None if mask is None else _mask_rows(mask, rows.start, rows.stop)
    return F.scaled_dot_product_attention(query[:, :, rows], key, value, attn_mask=m, scale=scale)


# ------------------------------------------------------------ processors


class _CaptureBase:
    """What every capture processor shares: `attend` computes the attention of its (already projected,
    normed and rotated) query, key and value with `attend_and_capture`, under the recorder's settings,
    reports the maps to the recorder, and passes every chunk of per-head probabilities to the
    recorder's `probe` when one is set (tests/test_own_attention.py compares them with the model's own
    attention). A family's processor calls it where the diffusers processor it repeats calls SDPA."""

    def __init__(self, recorder: AttentionRecorder, layer: LayerInfo):
        self.recorder = recorder
        self.layer = layer

    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        *,
        scale: float,
        image_rows: slice,
        blocks: dict[str, slice],
        mask: torch.Tensor | None = None,
        cross_width: int | None = None,
    ) -> torch.Tensor:
        """query, key, value (B, H, S, D) -> attention output (B, H, Sq, D); see attend_and_capture.
        `cross_width`: for a family whose text block's length varies with the prompt, the width the
        recorded "cross" map is padded to with zero columns (the adapter's `text_length`)."""
        recorder, layer = self.recorder, self.layer
        probe = getattr(recorder, "probe", None)
        out, maps = attend_and_capture(
            query,
            key,
            value,
            scale=scale,
            image_rows=image_rows,
            blocks=blocks,
            mask=mask,
            chunk_mb=recorder.chunk_mb,
            precision=recorder.precision,
            probe=None if probe is None else (lambda probs, lo: probe(layer, probs, lo, blocks)),
            **recorder.grouping(),
        )
        if cross_width is not None and "cross" in maps and maps["cross"].shape[-1] < cross_width:
            maps["cross"] = F.pad(maps["cross"], (0, cross_width - maps["cross"].shape[-1]))
        recorder.add(layer, maps, query.shape[0])
        return out

    def attend_text_first(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        n_txt: int,
        *,
        scale: float | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Joint attention over the sequence [text (n_txt); image]: query, key, value (B, H, S, D) ->
        output (B, S, H*D) in the query's dtype; the image queries' text columns are "cross", their
        image columns "self". `scale` defaults to SDPA's, 1/sqrt(D)."""
        out = self.attend(
            query,
            key,
            value,
            scale=query.shape[-1] ** -0.5 if scale is None else scale,
            image_rows=slice(n_txt, None),
            blocks={"cross": slice(0, n_txt), "self": slice(n_txt, None)},
            mask=mask,
        )
        return out.transpose(1, 2).flatten(2, 3).to(query.dtype)


class CaptureAttnProcessor(_CaptureBase):
    """diffusers `Attention` (UNet and DiT self/cross layers): `AttnProcessor2_0` of
    diffusers/models/attention_processor.py (0.33.1, 0.42.1) with an explicit softmax."""

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs
    ):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:  # (B, C, H, W) -> (B, HW, C)
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch = hidden_states.shape[0]
        is_cross = encoder_hidden_states is not None
        context = encoder_hidden_states if is_cross else hidden_states
        if is_cross and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads
        # (B, S, H*D) -> (B, H, S, D)
        query, key, value = (
            x.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for x in (query, key, value)
        )
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        block = "cross" if is_cross else "self"
        out = self.attend(
            query,
            key,
            value,
            scale=attn.scale,
            image_rows=slice(None),
            blocks={block: slice(None)},
            mask=attention_mask,
        )

        hidden_states = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class CaptureJointAttnProcessor(_CaptureBase):
    """SD3/SD3.5 joint attention, one softmax over [image; text]: `JointAttnProcessor2_0` of
    diffusers/models/attention_processor.py (0.33.1, 0.42.1) with an explicit softmax."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        batch, n_img = hidden_states.shape[:2]
        heads = attn.heads

        def split_heads(x):  # (B, S, H*D) -> (B, H, S, D)
            return x.view(batch, -1, heads, x.shape[-1] // heads).transpose(1, 2)

        query, key, value = (split_heads(f(hidden_states)) for f in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        blocks = {"self": slice(0, n_img)}
        if encoder_hidden_states is not None:
            cq, ck, cv = (
                split_heads(f(encoder_hidden_states))
                for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
            )
            if attn.norm_added_q is not None:
                cq = attn.norm_added_q(cq)
            if attn.norm_added_k is not None:
                ck = attn.norm_added_k(ck)
            query, key, value = (torch.cat(p, dim=2) for p in ((query, cq), (key, ck), (value, cv)))
            blocks["cross"] = slice(n_img, None)
        out = self.attend(query, key, value, scale=attn.scale, image_rows=slice(0, n_img), blocks=blocks)

        out = out.transpose(1, 2).reshape(batch, -1, out.shape[1] * out.shape[-1]).to(query.dtype)
        hidden_states, context = out[:, :n_img], out[:, n_img:]
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if encoder_hidden_states is None:
            return hidden_states
        if not attn.context_pre_only:
            context = attn.to_add_out(context)
        return hidden_states, context


class CaptureFluxAttnProcessor(_CaptureBase):
    """FLUX attention, sequence [text; image], single-stream blocks get it already concatenated:
    `FluxAttnProcessor` of diffusers/models/transformers/transformer_flux.py (0.42.1; in 0.33.1
    `FluxAttnProcessor2_0` of attention_processor.py, on `Attention`) with an explicit softmax."""

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        image_rotary_emb=None,
        **kwargs,
    ):
        from diffusers.models.embeddings import apply_rotary_emb

        def heads(x):  # (B, S, H*D) -> (B, S, H, D)
            return x.unflatten(
                -1, (attn.heads, -1)
            )  # FluxAttention (diffusers >= 0.35) and Attention (0.33) both have .heads

        query, key, value = (heads(f(hidden_states)) for f in (attn.to_q, attn.to_k, attn.to_v))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if encoder_hidden_states is not None:  # double-stream block
            n_txt = encoder_hidden_states.shape[1]
            cq, ck, cv = (
                heads(f(encoder_hidden_states)) for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
            )
            cq, ck = attn.norm_added_q(cq), attn.norm_added_k(ck)
            query, key, value = (torch.cat(p, dim=1) for p in ((cq, query), (ck, key), (cv, value)))
        else:  # single-stream block: hidden_states is already [text; image]
            n_txt = self.recorder.text_length
        # (B, S, H, D) -> (B, H, S, D), the layout apply_rotary_emb takes in every supported diffusers
        query, key, value = (x.transpose(1, 2) for x in (query, key, value))
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb)
            key = apply_rotary_emb(key, image_rotary_emb)
        out = self.attend_text_first(query, key, value, n_txt, mask=attention_mask)  # (B, S, H*D)
        if encoder_hidden_states is None:
            return out
        context, hidden_states = out[:, :n_txt], out[:, n_txt:]
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
        return hidden_states, attn.to_add_out(context.contiguous())


# -------------------------------------------------------------- recorder


def resize_cross(m: torch.Tensor, r: int, target: int) -> torch.Tensor:
    """(r*r, L) -> (target*target, L), bilinear over the image grid."""
    if r == target:
        return m
    grid = m.T.reshape(1, -1, r, r)
    grid = F.interpolate(grid, size=(target, target), mode="bilinear", align_corners=False)
    return grid.reshape(m.shape[1], -1).T


def resize_self(m: torch.Tensor, r: int, target: int) -> torch.Tensor:
    """(r*r, r*r) -> (target^2, target^2): bilinear over the key grid, then each
    query row repeated target/r times along both query axes."""
    if r == target:
        return m
    keys = F.interpolate(
        m.reshape(1, r * r, r, r), size=(target, target), mode="bilinear", align_corners=False
    ).reshape(r, r, target * target)
    factor = target // r
    return keys.repeat_interleave(factor, 0).repeat_interleave(factor, 1).reshape(target * target, -1)


def attention_processors(model: torch.nn.Module) -> dict[str, object]:
    """{"<module name>.processor": processor} of every attention module of `model`, as diffusers'
    `AttentionMixin.attn_processors` gives it; also for denoisers without that mixin (Z-Image), from
    the modules that have a processor."""
    if hasattr(type(model), "attn_processors"):
        return dict(model.attn_processors)
    return {
        f"{name}.processor": module.processor
        for name, module in model.named_modules()
        if hasattr(module, "set_processor") and getattr(module, "processor", None) is not None
    }


def set_attention_processors(model: torch.nn.Module, processors: dict[str, object]) -> None:
    """Install `processors` (keyed like `attention_processors`), through `set_attn_processor` where
    the denoiser has it."""
    if hasattr(type(model), "set_attn_processor"):
        model.set_attn_processor(dict(processors))  # diffusers empties the dict it is given
        return
    modules = dict(model.named_modules())
    for key, processor in processors.items():
        modules[key.removesuffix(".processor")].set_processor(processor)


# denoiser -> the recorder whose capture processors are in it (weak: a dropped model is forgotten)
_ACTIVE: weakref.WeakKeyDictionary[torch.nn.Module, AttentionRecorder] = weakref.WeakKeyDictionary()


class AttentionRecorder:
    """Context manager that captures attention while the denoiser runs.

    `weights` maps an aggregate name ("cross", "self1", "self2", ...) to
    per-layer weights; "cross*" aggregates read the image x text block,
    "self*" ones the image x image block. Each captured map is resized to
    `target_res` and added, times its weight, to a float32 running sum, so
    memory does not grow with the number of steps. With `per_layer=True` the
    recorder also keeps each layer's own unresized sum (for analysis/tests).
    """

    def __init__(
        self,
        denoiser: torch.nn.Module,
        layers: list[LayerInfo],
        weights: dict[str, dict[str, float]],
        processor_factory: Callable[[AttentionRecorder, LayerInfo], object],
        target_res: int | None = None,
        chunk_mb: float = 256.0,
        per_layer: bool = False,
        text_length: int | None = None,
        precision: str = "float32",
        on_active: Callable[[bool], None] | None = None,
        device: torch.device | str | None = None,
    ):
        self.denoiser = denoiser
        # where the running sums live: one stated device even when the denoiser's blocks sit on
        # several (a device map); None: where the first captured map is
        self.device = torch.device(device) if device is not None else None
        self.layers = {layer.name: layer for layer in layers}
        self.weights = weights
        self.processor_factory = processor_factory
        self.target_res = target_res or max(layer.resolution for layer in layers)
        self.chunk_mb = chunk_mb
        self.precision = precision  # of the captured probabilities: "float32" or "model"
        self.per_layer = per_layer
        self.text_length = text_length
        self.sums: dict[str, torch.Tensor] = {}
        self.layer_sums: dict[str, dict[str, torch.Tensor]] = {}
        self.samples: dict[str, int] = {}
        # with set_groups: the rows' group ids, and per group its own sums and sample counts
        self.groups: torch.Tensor | None = None
        self.n_groups: int | None = None
        self.group_counts: list[int] = []
        self.group_sums: dict[int, dict[str, torch.Tensor]] = {}
        self.group_samples: dict[int, dict[str, int]] = {}
        self.on_active = on_active  # told True once the capture processors are in, False once out
        # tests: called as probe(layer, probs (B, H, rows, Sk), first row, blocks) for every chunk of
        # per-head probabilities a capture processor computes (see _CaptureBase.attend)
        self.probe: Callable | None = None
        self._saved = None

    @property
    def captured(self) -> list[str]:
        """Names of the layers whose processors are replaced (non-zero weight somewhere)."""
        return [
            n
            for n in self.layers
            if any(w.get(n, 0.0) != 0.0 for w in self.weights.values())
            or (self.per_layer and not self.weights)
        ]

    def __enter__(self) -> AttentionRecorder:
        """Install the capture processors, keeping the denoiser's own to put back on exit. One
        recorder at a time per denoiser: entering this one again, or another one, while one is
        active raises (its "own" processors would be the capture processors, left in on exit)."""
        if self.denoiser in _ACTIVE:
            raise RuntimeError(
                "an AttentionRecorder is already active on this denoiser; recorders do not nest and "
                "cannot be entered twice: leave the active one (its `with` block) first"
            )
        saved = attention_processors(self.denoiser)
        captured = set(self.captured)
        new = {
            name: (self.processor_factory(self, self.layers[name]) if name in captured else proc)
            for name, proc in ((k.removesuffix(".processor"), v) for k, v in saved.items())
        }
        try:
            set_attention_processors(self.denoiser, {f"{k}.processor": v for k, v in new.items()})
            _ACTIVE[self.denoiser] = self
            self._saved = saved
            if self.on_active is not None:
                self.on_active(True)
        except BaseException:  # a failed entry leaves the denoiser's own processors in place
            set_attention_processors(self.denoiser, saved)
            _ACTIVE.pop(self.denoiser, None)
            self._saved = None
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self._saved is None:  # not entered (or its entry failed): nothing to put back
            return
        try:
            set_attention_processors(self.denoiser, self._saved)
        finally:
            self._saved = None
            _ACTIVE.pop(self.denoiser, None)
            if self.on_active is not None:
                self.on_active(False)

    def set_groups(self, groups: Sequence[int] | None, n_groups: int | None = None) -> None:
        """The group (collection prompt) of each row of the next forward's batch; the recorder then
        keeps one set of sums per group (`mean(agg, group=g)`). None: one sum over all rows."""
        if groups is None:
            self.groups, self.n_groups = None, None
            return
        if self.per_layer:
            raise ValueError("per_layer recording keeps one sum per layer; it does not take groups")
        n = int(n_groups if n_groups is not None else max(groups) + 1)
        if self.n_groups is not None and n != self.n_groups:
            raise ValueError(f"this recorder keeps {self.n_groups} groups, not {n}")
        self.n_groups = n
        rows = [int(g) for g in groups]
        self.group_counts = [rows.count(g) for g in range(n)]  # on the host: no device sync per layer
        device = next(self.denoiser.parameters()).device
        self.groups = torch.tensor(rows, dtype=torch.long, device=device)

    def grouping(self) -> dict[str, object]:
        """The group arguments of `attend_and_capture` for the current batch (none when ungrouped)."""
        return {} if self.groups is None else {"groups": self.groups, "n_groups": self.n_groups}

    def add(self, layer: LayerInfo, maps: dict[str, torch.Tensor], batch: int) -> None:
        """Called by a capture processor: maps are summed over `batch` samples (per group, a
        leading group dimension, when `set_groups` gave the rows' groups)."""
        if self.groups is not None:
            for g, count in enumerate(self.group_counts):
                if count:
                    self._add(layer, {k: m[g] for k, m in maps.items()}, count, g)
            return
        self._add(layer, maps, batch, None)

    def _add(self, layer: LayerInfo, maps: dict[str, torch.Tensor], batch: int, group: int | None) -> None:
        n_img = next(iter(maps.values())).shape[0]
        if n_img != layer.resolution**2:
            raise RuntimeError(
                f"layer {layer.name} was declared at resolution {layer.resolution} but saw {n_img} image "
                "tokens; the adapter's resolution bookkeeping is wrong for this model/image size"
            )
        counts = self.samples if group is None else self.group_samples.setdefault(group, {})
        counts[layer.name] = counts.get(layer.name, 0) + batch
        if self.device is not None:
            maps = {block: m.to(self.device) for block, m in maps.items()}
        if self.per_layer:
            store = self.layer_sums.setdefault(layer.name, {})
            for block, m in maps.items():
                store[block] = store[block] + m if block in store else m.clone()
        r, target = layer.resolution, self.target_res
        for agg, per_layer_w in self.weights.items():
            w = per_layer_w.get(layer.name, 0.0)
            block = "cross" if agg.startswith("cross") else "self"
            if w == 0.0 or block not in maps:
                continue
            resized = (
                resize_cross(maps[block], r, target)
                if block == "cross"
                else resize_self(maps[block], r, target)
            )
            sums = self.sums if group is None else self.group_sums.setdefault(group, {})
            if agg in sums:
                sums[agg].add_(resized, alpha=w)  # in place: no (R^2, R^2) temporaries per layer call
            else:
                sums[agg] = w * resized

    def mean(self, agg: str, group: int | None = None) -> torch.Tensor:
        """Weighted layer average of the per-sample mean map of aggregate `agg` (of one group's rows
        when the recorder was given groups)."""
        sums = self.sums if group is None else self.group_sums.get(group, {})
        samples = self.samples if group is None else self.group_samples.get(group, {})
        if agg not in sums:
            raise KeyError(
                f"nothing was recorded for {agg!r}"
                + ("" if group is None else f" in group {group}")
                + "; did the forward pass run inside the recorder?"
            )
        total_w = sum(w for name, w in self.weights[agg].items() if name in samples)
        n = self._samples_per_layer(samples)
        return sums[agg] / (n * total_w)

    def layer_mean(self, name: str, block: str) -> torch.Tensor:
        """Per-sample mean map of one layer (needs per_layer=True)."""
        return self.layer_sums[name][block] / self.samples[name]

    def _samples_per_layer(self, samples: dict[str, int]) -> int:
        counts = set(samples.values())
        if len(counts) != 1:
            raise RuntimeError(f"layers saw different numbers of samples: {samples}")
        return counts.pop()
