"""The public entry point: an image and class names in, calibrated heatmaps out.

    aligner = Aligner.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")
    result = aligner.heatmaps(image, ["cat", "dog"])
    result.heatmaps["cat"], result.raw_heatmaps["cat"], result.elbo["cat"], result.tau["cat"]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from . import calibrate
from .elbo import elbo_losses, is_out_of_memory
from .models import ModelAdapter, adapter_for, load_pipeline, resolve_device, resolve_dtype
from .models.base import cat_cond
from .options import AlignOptions


@dataclass
class HeatmapResult:
    heatmaps: dict[str, np.ndarray]  # calibrated, (H, W) float32 in [0, 1]
    raw_heatmaps: dict[str, np.ndarray]  # strength 1, same attention
    elbo: dict[str, float | None]  # summed diffusion loss per class (lower = better); None if not needed
    tau: dict[str, float]  # exponent applied to the normalised cross map
    prompts: dict[str, str] = field(default_factory=dict)  # ELBO prompt per class + "collect"
    token_positions: dict[str, list[int]] = field(default_factory=dict)


class Aligner:
    """ELBO-T2IAlign on one loaded model. Options default to PROTOCOL's values."""

    def __init__(self, adapter: ModelAdapter, options: AlignOptions | None = None):
        self.adapter = adapter
        self.options = options or AlignOptions()
        self._batch_size = self.options.batch_size
        self.layers = adapter.attention_layers()
        self._weights = self._layer_weights()

    # ------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, model_id: str, device: str | torch.device = "auto", dtype: str = "auto",
                        resolution: int | None = None, max_sequence_length: int | None = None,
                        options: AlignOptions | None = None, **option_overrides: Any) -> Aligner:
        """Load a hub id or a local diffusers folder; device/dtype "auto" = CUDA+fp16 if present, else CPU+fp32."""
        dev = resolve_device(device)
        pipe = load_pipeline(model_id, dev, resolve_dtype(dtype, dev))
        return cls.from_pipeline(pipe, device=dev, dtype=dtype, resolution=resolution,
                                 max_sequence_length=max_sequence_length, options=options, **option_overrides)

    @classmethod
    def from_pipeline(cls, pipe, device: str | torch.device | None = None, dtype: str | torch.dtype = "auto",
                      resolution: int | None = None, max_sequence_length: int | None = None,
                      options: AlignOptions | None = None, **option_overrides: Any) -> Aligner:
        """Wrap an already loaded diffusers pipeline (its modules stay where they are unless `device` is given)."""
        dev = resolve_device(device) if device is not None else pipe.device
        torch_dtype = resolve_dtype(dtype, dev)
        opts = (options or AlignOptions()).replace(**option_overrides)
        return cls(adapter_for(pipe, dev, torch_dtype, resolution, max_sequence_length), opts)

    @classmethod
    def from_config(cls, model_cfg: Mapping[str, Any], options: AlignOptions | None = None,
                    device: str = "auto", dtype: str = "auto") -> Aligner:
        """Build from a `configs/model/*.yaml` mapping (keys: id; optional resolution, dtype,
        max_sequence_length)."""
        if "id" not in model_cfg:
            raise ValueError(f"model config {dict(model_cfg)} has no 'id' (a hub id or a local folder)")
        return cls.from_pretrained(model_cfg["id"], device=device, dtype=model_cfg.get("dtype") or dtype,
                                   resolution=model_cfg.get("resolution"),
                                   max_sequence_length=model_cfg.get("max_sequence_length"), options=options)

    # ------------------------------------------------------------ the method
    def heatmaps(self, image: Image.Image, classes: Sequence[str], phrases: Sequence[str] | None = None,
                 seed: int | None = None, **option_overrides: Any) -> HeatmapResult:
        """Calibrated and raw heatmaps for each class. `phrases` (optional, one per class) replace the
        class names in the prompts; the class word is then located inside its phrase when present."""
        opts = self.options.replace(**option_overrides) if option_overrides else self.options
        names = self._check_classes(classes, phrases)
        texts = list(phrases) if phrases is not None else names
        seed = opts.seed if seed is None else seed
        z0 = self.adapter.encode_image(image)  # (1, C, h, w)
        collect_noise, elbo_noise = self._draw_noise(z0, opts, seed)

        elbo_prompts = [opts.elbo_prompt.format(t) for t in texts]
        collect_prompt = opts.collect_prompt.format(", ".join(texts))
        # bad input (a class not in the prompt, an over-long prompt) fails before any forward pass
        positions = self._positions(collect_prompt, names, texts)
        self.adapter.encode_prompt(collect_prompt)
        if len(names) > 1 and not opts.fixed_temperature and opts.strength != 1.0:
            conds = [self.adapter.encode_prompt(p) for p in elbo_prompts]
            losses = self._elbo_losses(z0, conds, opts.elbo_timesteps, elbo_noise)
            taus = calibrate.temperatures(losses, opts.strength)
        else:  # one class (n = 0), no calibration or a fixed temperature: the scores cannot change tau
            losses = [None] * len(names)
            taus = [float(opts.strength) if opts.fixed_temperature else 1.0] * len(names)

        weights = self._weights if opts is self.options else self._layer_weights(opts)
        rec = self._collect(z0, collect_prompt, collect_noise, opts, weights)
        cross_maps = calibrate.class_cross_maps(rec.mean("cross"), positions)
        s1 = rec.mean("self1") if opts.refine and "self1" in rec.sums else None
        s2 = rec.mean("self2") if opts.refine and "self2" in rec.sums else None
        res, size = rec.target_res, image.size

        cal, raw = {}, {}
        for name, tau in zip(names, taus, strict=True):
            a = cross_maps[name]
            raw[name] = calibrate.to_image(calibrate.refine(a, s1, s2), res, size)
            cal[name] = raw[name].copy() if tau == 1.0 else calibrate.to_image(calibrate.refine(a**tau, s1, s2), res, size)
        prompts = {n: p for n, p in zip(names, elbo_prompts, strict=True)} | {"collect": collect_prompt}
        return HeatmapResult(cal, raw, dict(zip(names, losses, strict=True)),
                             dict(zip(names, taus, strict=True)), prompts, positions)

    # ------------------------------------------------------------ parts
    def _check_classes(self, classes: Sequence[str], phrases: Sequence[str] | None) -> list[str]:
        if isinstance(classes, str):
            raise TypeError(f"classes must be a list of names, got the string {classes!r}; wrap it: [{classes!r}]")
        names = [str(c) for c in classes]
        if not names:
            raise ValueError("the class list is empty: give at least one class name to segment")
        if any(not n.strip() for n in names):
            raise ValueError(f"empty class name in {names}")
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate class names in {names}")
        if phrases is not None and len(phrases) != len(names):
            raise ValueError(f"{len(phrases)} phrases given for {len(names)} classes; give one per class")
        return names

    def _draw_noise(self, z0: torch.Tensor, opts: AlignOptions, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Collection noise first, then ELBO noise, from one CPU generator (reference-compatible)."""
        gen = torch.Generator("cpu").manual_seed(int(seed))
        shape = tuple(z0.shape[1:])
        collect = torch.randn((len(opts.collect_timesteps), *shape), generator=gen)
        elbo = torch.randn((len(opts.elbo_timesteps), *shape), generator=gen)
        return collect, elbo

    def _layer_weights(self, opts: AlignOptions | None = None) -> dict[str, dict[str, float]]:
        opts = opts or self.options
        if opts.gaussian_sigma > 0:
            cross = calibrate.gaussian_layer_weights(self.layers, opts.gaussian_sigma)
        else:
            cross = calibrate.stage_layer_weights(self.layers, opts.cross_stage_weights, "cross")
        weights = {"cross": cross}
        if opts.refine:
            weights["self1"] = calibrate.self_stage_weights(self.layers, opts.self_weights_1)
            weights["self2"] = calibrate.self_stage_weights(self.layers, opts.self_weights_2)
        return weights

    def _elbo_losses(self, z0: torch.Tensor, conds, timesteps: Sequence[int], noise: torch.Tensor) -> list[float]:
        """Summed diffusion loss per class, all (class, timestep) pairs batched."""
        losses, self._batch_size = elbo_losses(self.adapter, z0, conds, timesteps, noise, self._batch_size)
        return losses.tolist()

    def _collect(self, z0, prompt: str, noise: torch.Tensor, opts: AlignOptions, weights):
        """Run the collection timesteps under the recorder; restart with half the batch on out-of-memory."""
        cond = self.adapter.encode_prompt(prompt)
        ts = torch.tensor(opts.collect_timesteps, dtype=torch.long, device=self.adapter.device)
        noise = noise.to(self.adapter.device)
        while True:
            rec = self.adapter.recorder(weights, chunk_mb=opts.self_attention_chunk_mb)
            try:
                with rec:
                    for lo in range(0, len(ts), self._batch_size):
                        t = ts[lo : lo + self._batch_size]
                        z_t = self.adapter.schedule.add_noise(z0, noise[lo : lo + len(t)], t)
                        self.adapter.predict(z_t, t, cat_cond([cond] * len(t)))
                return rec
            except (torch.OutOfMemoryError, RuntimeError) as err:
                if not is_out_of_memory(err) or self._batch_size == 1:
                    raise
                self._batch_size //= 2

    def _positions(self, prompt: str, names: list[str], texts: list[str]) -> dict[str, list[int]]:
        if texts == names:
            return calibrate.class_token_positions(self.adapter.token_ids, prompt, names)
        # phrases: the class word inside its phrase if present, else the whole phrase
        out, cursor = {}, 0
        for name, text in zip(names, texts, strict=True):
            phrase_pos = calibrate.locate_tokens(self.adapter.token_ids, prompt, text, cursor)
            try:
                out[name] = calibrate.locate_tokens(self.adapter.token_ids, prompt, name, phrase_pos[0])
                if out[name][0] > phrase_pos[-1]:
                    out[name] = phrase_pos
            except ValueError:
                out[name] = phrase_pos
            cursor = phrase_pos[-1] + 1
        return out


