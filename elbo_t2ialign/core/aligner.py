"""The public entry point: an image and class names (or words of a prompt) in, heatmaps out.

    aligner = Aligner.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")
    result = aligner.heatmaps(image, ["cat", "dog"])
    result.heatmaps["cat"]      # calibrated (ELBO exponent, then self-attention refinement)
    result.baseline_heatmaps["cat"]  # uncalibrated: strength 1, same attention
    result.cross["cat"]         # cross-attention alone: before the exponent and the refinement
    result.losses["cat"], result.tau["cat"]
    result.evidence.maps(strength=5.0)  # any other setting, without another network pass

One call = one image: ELBO forwards (method.md §3), attention collection (4), then every map is a
cheap function of what those forwards produced (`Evidence`, method.md §5).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from elbo_t2ialign.core import calibrate, capture, elbo
from elbo_t2ialign.core import placement as placing
from elbo_t2ialign.core.adapters import (
    ModelAdapter,
    adapter_for,
    load_pipeline,
    resolve_device,
    resolve_dtype,
)
from elbo_t2ialign.core.adapters.base import cat_cond
from elbo_t2ialign.core.images import as_image
from elbo_t2ialign.core.options import AlignOptions

log = logging.getLogger(__name__)


@dataclass
class Evidence:
    """Everything the network passes give for one image. Each map setting (strength, fixed
    temperature, with or without refinement) is computed from it without another forward."""

    names: list[str]
    losses: dict[str, float] | None  # summed diffusion loss per class (lower = better); None: not computed
    cross: dict[str, torch.Tensor]  # class cross map, min-max normalised, (R*R,) float32
    # the self-attention matrices of the refinement, S1 and S2 of method.md §5.4 (refined map =
    # S2 @ (S1 @ a)): (R*R, R*R) float32; None: no refinement
    refine_first: torch.Tensor | None
    refine_second: torch.Tensor | None
    grid: int  # R, side of the finest token grid the maps live on
    size: tuple[int, int]  # (width, height) of the image
    prompts: dict[str, str] = field(default_factory=dict)  # ELBO prompt per class, and "collect"
    token_positions: dict[str, list[int]] = field(default_factory=dict)  # in the collection prompt

    def temperatures(self, strength: float, fixed: bool = False) -> dict[str, float]:
        """tau per class (method.md §3.5-3.6); the ELBO is needed only when it can change tau."""
        if fixed or strength == 1.0 or len(self.names) == 1:
            tau = float(strength) if fixed else 1.0
            return dict.fromkeys(self.names, tau)
        if self.losses is None:
            raise ValueError(
                "this evidence holds no ELBO losses; compute them (a strength other than 1 "
                "when the heatmaps are made) or pass elbo_losses="
            )
        losses = [self.losses[n] for n in self.names]
        return dict(zip(self.names, calibrate.temperatures(losses, strength), strict=True))

    def maps(self, strength: float = 1.0, fixed: bool = False, refine: bool = True) -> dict[str, np.ndarray]:
        """Image-sized (H, W) float32 maps in [0, 1]: refine(minmax(cross) ** tau), resized, min-max."""
        taus = self.temperatures(strength, fixed)
        s1, s2 = (self.refine_first, self.refine_second) if refine else (None, None)
        return {
            n: calibrate.to_image(
                calibrate.self_attention_refine(self.cross[n] ** taus[n], s1, s2), self.grid, self.size
            )
            for n in self.names
        }


@dataclass
class HeatmapResult:
    heatmaps: dict[str, np.ndarray]  # ELBO-calibrated ("elbo"), (H, W) float32 in [0, 1]
    baseline_heatmaps: dict[str, np.ndarray]  # uncalibrated ("baseline": tau 1), same attention
    cross: dict[str, np.ndarray]  # cross-attention before exponent and refinement, (H, W) in [0, 1]
    losses: dict[str, float | None]  # summed diffusion loss per class (lower = better); None if not needed
    tau: dict[str, float]  # exponent applied to the normalised cross map
    prompts: dict[str, str] = field(default_factory=dict)  # ELBO prompt per class + "collect"
    token_positions: dict[str, list[int]] = field(default_factory=dict)
    evidence: Evidence | None = None  # for further settings without another network pass

    def plot(self, image: Image.Image | str | Path | np.ndarray, **kwargs: Any):
        """matplotlib Figure: per word the image and its baseline, ELBO-calibrated and cross-attention
        overlays (options: `plotting.plot`)."""
        from elbo_t2ialign.plotting import plot

        return plot(self, image, **kwargs)

    def overlay(self, name: str, image: Image.Image | str | Path | np.ndarray, **kwargs: Any):
        """matplotlib Figure: one map of `name` over the image (kind="elbo"|"baseline"|"cross", ax=...;
        options: `plotting.overlay`)."""
        from elbo_t2ialign.plotting import overlay

        return overlay(self, name, image, **kwargs)


class Aligner:
    """ELBO-T2IAlign on one loaded model. Options default to the method's values."""

    def __init__(self, adapter: ModelAdapter, options: AlignOptions | None = None):
        self.adapter = adapter
        self.options = options or AlignOptions()
        self._fitted_batch = self.options.batch_size  # lowered for good after an out-of-memory
        self.layers = adapter.attention_layers()
        self._weights = capture.layer_weights(self.layers, self.options)

    # ------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        model_id: str,
        device: str | torch.device = "auto",
        dtype: str = "auto",
        resolution: int | None = None,
        max_sequence_length: int | None = None,
        options: AlignOptions | None = None,
        placement: str | placing.Placement | Mapping[str, Any] | None = "device",
        **option_overrides: Any,
    ) -> Aligner:
        """Load a hub id or a local diffusers folder; device/dtype "auto" = CUDA+fp16 if present, else CPU+fp32.

        placement: where the weights live and run (core/placement.py, docs/performance.md "Big models"):
        "device" (all on `device`), "balanced", "model-offload", "sequential-offload",
        "group-offload", "auto", or a `Placement` (offload type and folder, max_memory, storage_dtype,
        quantization). `device` is then the execution device. The memory plan is logged before
        loading, and a plan that cannot fit is refused before anything is loaded (core/memory.py)."""
        from elbo_t2ialign.core import memory

        dev = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, dev)
        opts = (options or AlignOptions()).replace(**option_overrides)
        where = memory.plan_and_check(
            model_id, placing.Placement.of(placement), dev, torch_dtype, opts.batch_size, resolution
        )
        pipe = load_pipeline(model_id, dev, torch_dtype, prepare=False, placement=where)
        return cls.from_pipeline(
            pipe,
            device=dev,
            dtype=dtype,
            resolution=resolution,
            max_sequence_length=max_sequence_length,
            options=opts,
        )

    @classmethod
    def from_pipeline(
        cls,
        pipe,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype = "auto",
        resolution: int | None = None,
        max_sequence_length: int | None = None,
        options: AlignOptions | None = None,
        **option_overrides: Any,
    ) -> Aligner:
        """Wrap an already loaded diffusers pipeline (its modules stay where they are unless `device` is
        given). A pipeline the user placed (a device map, model / sequential / group offloading,
        layerwise casting) is never moved: it computes where its hooks say, whatever `device`."""
        if placing.is_placed(pipe):
            dev = placing.pipeline_device(pipe)
            if device is not None and resolve_device(device) != dev:
                log.info(
                    "pipeline is placed (%s); computing on %s, not %s",
                    placing.placement_of(pipe),
                    dev,
                    device,
                )
        else:
            dev = resolve_device(device) if device is not None else pipe.device
        torch_dtype = resolve_dtype(dtype, dev)
        opts = (options or AlignOptions()).replace(**option_overrides)
        return cls(adapter_for(pipe, dev, torch_dtype, resolution, max_sequence_length), opts)

    @classmethod
    def from_config(
        cls, model_cfg: Mapping[str, Any], options: AlignOptions | None = None, device: str = "auto"
    ) -> Aligner:
        """Build from a `configs/model/*.yaml` mapping (keys: id; optional resolution, dtype (default
        auto), max_sequence_length, and the placement keys of core/placement.py: placement,
        offload_type, offload_folder, max_memory, storage_dtype, quantization)."""
        if "id" not in model_cfg:
            raise ValueError(f"model config {dict(model_cfg)} has no 'id' (a hub id or a local folder)")
        return cls.from_pretrained(
            model_cfg["id"],
            device=device,
            dtype=model_cfg.get("dtype") or "auto",
            resolution=model_cfg.get("resolution"),
            max_sequence_length=model_cfg.get("max_sequence_length"),
            options=options,
            placement=placing.Placement.from_mapping(model_cfg),
        )

    # ------------------------------------------------------------ the method
    def heatmaps(
        self,
        image: Image.Image | str | Path | np.ndarray,
        classes: Sequence[str] | None = None,
        phrases: Sequence[str] | None = None,
        seed: int | None = None,
        *,
        prompt: str | None = None,
        elbo_losses: Mapping[str, float] | None = None,
        **option_overrides: Any,
    ) -> HeatmapResult:
        """ELBO-calibrated, baseline (uncalibrated) and cross-attention heatmaps for each class.

        classes: class names (or any words or phrases), each put into the ELBO prompt template;
            the collection prompt lists them all in the collection template, unless `prompt` is given.
        phrases: optional, one per class, replacing the class names in the prompts; the class
            word (or, if it is not one of the phrase's words, the phrase's nouns) is located
            inside its phrase.
        prompt: your own collection prompt; each class is located in it as written.
        elbo_losses: per-class summed losses from an earlier run, instead of the ELBO forwards.
        Option overrides (strength=..., batch_size=...) apply to this call only.
        """
        if "words" in option_overrides:
            raise TypeError("words= is now the classes argument: heatmaps(image, [...], prompt=...)")
        opts = self.options.replace(**option_overrides) if option_overrides else self.options
        evidence = self.observe(
            image, classes, phrases, seed, prompt=prompt, elbo_losses=elbo_losses, options=opts
        )
        taus = evidence.temperatures(opts.strength, opts.fixed_temperature)
        baseline = evidence.maps(1.0, refine=opts.refine)
        elbo_maps = (
            {n: m.copy() for n, m in baseline.items()}
            if all(t == 1.0 for t in taus.values())
            else evidence.maps(opts.strength, opts.fixed_temperature, refine=opts.refine)
        )
        losses = evidence.losses or {}
        return HeatmapResult(
            elbo_maps,
            baseline,
            evidence.maps(1.0, refine=False),
            {n: losses.get(n) for n in evidence.names},
            taus,
            evidence.prompts,
            evidence.token_positions,
            evidence,
        )

    def observe(
        self,
        image,
        classes: Sequence[str],
        phrases: Sequence[str] | None = None,
        seed: int | None = None,
        *,
        prompt: str | None = None,
        elbo_losses: Mapping[str, float] | None = None,
        options: AlignOptions | None = None,
        need_elbo: bool | None = None,
    ) -> Evidence:
        """The network passes of one image -> its Evidence (with the prompts and token positions used).

        `need_elbo` (default: whether the options' setting needs it) asks for the ELBO forwards even
        when the options alone would not, e.g. to make several strengths from one pass."""
        opts = options or self.options
        self.adapter.set_prompt_syntax(opts.prompt_syntax)
        image = as_image(image)
        names = self._check_classes(classes, phrases)
        texts = list(phrases) if phrases is not None else names
        seed = opts.seed if seed is None else _check_seed(seed)
        self._check_timesteps(opts)
        elbo_prompts = [opts.elbo_prompt.format(t) for t in texts]
        if prompt is None:
            collect_prompt = opts.collect_prompt.format(", ".join(texts))
            start = calibrate.template_start(self.adapter.token_ids, opts.collect_prompt)
        else:
            collect_prompt = str(prompt)
            start = calibrate.leading_specials(self.adapter.token_ids, collect_prompt)
        # bad input (a word not in the prompt, an over-long prompt) fails before any forward pass
        positions = self._positions(collect_prompt, names, texts, start, opts)
        self.adapter.check_prompt_length(collect_prompt)
        if need_elbo is None:
            need_elbo = len(names) > 1 and not opts.fixed_temperature and opts.strength != 1.0

        z0 = self.adapter.encode_image(image)  # (1, C, h, w)
        collect_noise, elbo_noise = self._draw_noise(z0, opts, seed)
        losses = None
        if elbo_losses is not None:
            losses = _check_losses(elbo_losses, names)
        elif need_elbo and len(names) > 1:
            conds = [self.adapter.encode_prompt(p) for p in elbo_prompts]
            values = self._elbo_losses(z0, conds, opts.elbo_timesteps, elbo_noise, self._batch(opts))
            losses = dict(zip(names, values, strict=True))

        weights = self._weights if opts is self.options else capture.layer_weights(self.layers, opts)
        rec = self._collect(z0, collect_prompt, collect_noise, opts, weights)
        cross = calibrate.class_cross_maps(rec.mean("cross"), positions)
        s1 = rec.mean("self1") if opts.refine and "self1" in rec.sums else None
        s2 = rec.mean("self2") if opts.refine and "self2" in rec.sums else None
        prompts = dict(zip(names, elbo_prompts, strict=True)) | {"collect": collect_prompt}
        return Evidence(names, losses, cross, s1, s2, rec.target_res, image.size, prompts, positions)

    def record(
        self, image, prompt: str, seed: int | None = None, *, options: AlignOptions | None = None
    ) -> capture.AttentionRecorder:
        """Every attention layer's own mean map over one image's collection passes with `prompt`
        (the noise `observe` draws for this seed), for analyses of the attention itself:
        `rec.layer_mean(layer.name, "cross")` is (R_l * R_l, text tokens) for each of `self.layers`."""
        opts = options or self.options
        self.adapter.set_prompt_syntax(opts.prompt_syntax)
        image = as_image(image)
        seed = opts.seed if seed is None else _check_seed(seed)
        self.adapter.check_prompt_length(prompt)
        z0 = self.adapter.encode_image(image)
        collect_noise, _ = self._draw_noise(z0, opts, seed)
        return self._collect(z0, prompt, collect_noise, opts, {}, per_layer=True)

    # ------------------------------------------------------------ parts
    def _check_classes(self, classes, phrases) -> list[str]:
        if classes is None:
            raise TypeError("give the class names (or words of your prompt) as a list: classes=[...]")
        if isinstance(classes, str):
            raise TypeError(
                f"classes must be a list of names, got the string {classes!r}; wrap it: [{classes!r}]"
            )
        names = list(classes)
        bad = [(i, c) for i, c in enumerate(names) if not isinstance(c, str)]
        if bad:
            raise TypeError(
                f"class names must be strings; got {bad[0][1]!r} at position {bad[0][0]} of {names}"
            )
        if not names:
            raise ValueError("the class list is empty: give at least one class name to segment")
        if any(not n.strip() for n in names):
            raise ValueError(f"empty class name in {names}")
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate class names in {names}")
        if phrases is not None:
            if isinstance(phrases, str) or len(phrases) != len(names):
                raise ValueError(
                    f"phrases must be a list with one phrase per class ({len(names)}), got {phrases!r}"
                )
            if not all(isinstance(p, str) and p.strip() for p in phrases):
                raise ValueError(f"every phrase must be a non-empty string, got {list(phrases)}")
        return names

    def _check_timesteps(self, opts: AlignOptions) -> None:
        n = self.adapter.schedule.num_train_timesteps
        bad = sorted({t for t in (*opts.elbo_timesteps, *opts.collect_timesteps) if t >= n})
        if bad:
            raise ValueError(
                f"timesteps {bad} are outside this model's training range 0..{n - 1}; "
                "give elbo_timesteps and collect_timesteps below that"
            )

    def _batch(self, opts: AlignOptions) -> int:
        """The call's batch size, never above one that ran out of memory before."""
        return min(opts.batch_size, self._fitted_batch)

    def _draw_noise(
        self, z0: torch.Tensor, opts: AlignOptions, seed: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Collection noise first, then ELBO noise, from one CPU generator (reference-compatible)."""
        gen = torch.Generator("cpu").manual_seed(int(seed))
        shape = tuple(z0.shape[1:])
        collect = torch.randn((len(opts.collect_timesteps), *shape), generator=gen)
        elbo = torch.randn((len(opts.elbo_timesteps), *shape), generator=gen)
        return collect, elbo

    def _elbo_losses(
        self, z0: torch.Tensor, conds, timesteps: Sequence[int], noise: torch.Tensor, batch: int
    ) -> list[float]:
        """Summed diffusion loss per class, all (class, timestep) pairs batched."""
        per_timestep, used = elbo.elbo_losses(self.adapter, z0, conds, timesteps, noise, batch)
        values = per_timestep.sum(dim=1)  # L_i, summed on the host
        if used < batch:  # ran out of memory: later calls start at the size that fit
            self._fitted_batch = used
        return values.tolist()

    def _collect(self, z0, prompt: str, noise: torch.Tensor, opts: AlignOptions, weights, per_layer=False):
        """Run the collection timesteps under the recorder; restart, with a fresh recorder and half
        the batch, on out-of-memory (the maps summed so far would be incomplete)."""
        cond = self.adapter.encode_prompt(prompt)
        ts = torch.tensor(opts.collect_timesteps, dtype=torch.long, device=self.adapter.device)
        noise = noise.to(self.adapter.device)

        def attempt(batch: int):
            rec = self.adapter.recorder(
                weights,
                chunk_mb=opts.self_attention_chunk_mb,
                precision=opts.capture_precision,
                per_layer=per_layer,
            )
            with rec:
                for lo in range(0, len(ts), batch):
                    t = ts[lo : lo + batch]
                    z_t = self.adapter.schedule.add_noise(z0, noise[lo : lo + len(t)], t)
                    self.adapter.predict(z_t, t, cat_cond([cond] * len(t)))
            return rec

        def lowered(batch: int) -> None:  # for good, even if the smaller batch fails too
            self._fitted_batch = batch

        rec, _ = elbo.halve_on_oom(self._batch(opts), attempt, on_halve=lowered)
        return rec

    def _positions(
        self, prompt: str, names: list[str], texts: list[str], start: int, opts: AlignOptions
    ) -> dict[str, list[int]]:
        """Token positions per class in the collection prompt, searched from token `start` on
        (after the template's own words). With phrases: the phrase is located first, then inside
        it the class word if it is one of the phrase's words, else the phrase's nouns (the
        reference; `phrase_tokens="phrase"`: the whole phrase)."""
        ids = self.adapter.token_ids
        if texts == names:
            return calibrate.class_token_positions(ids, prompt, names, start)
        out, cursor = {}, start
        for name, text in zip(names, texts, strict=True):
            span = calibrate.class_token_positions(ids, prompt, [text], cursor)[text]
            out[name] = self._phrase_positions(prompt, name, text, span, opts)
            cursor = span[-1] + 1
        return out

    def _phrase_positions(
        self, prompt: str, name: str, text: str, span: list[int], opts: AlignOptions
    ) -> list[int]:
        if name in text.split(" "):
            targets = [name]
        elif opts.phrase_tokens == "nouns":
            from elbo_t2ialign.core.nlp import nouns

            targets = nouns(text, opts.spacy_model)
        else:
            targets = []
        found: set[int] = set()
        for word in targets:
            try:
                found.update(
                    calibrate.locate_tokens(self.adapter.token_ids, prompt, word, span[0], span[-1] + 1)
                )
            except ValueError:
                log.warning(
                    "%r of phrase %r is not a token sequence of the prompt; using the whole phrase "
                    "for class %r",
                    word,
                    text,
                    name,
                )
                return span
        return sorted(found) if found else span


# ---------------------------------------------------------------- input checks


def _check_seed(seed: Any) -> int:
    return AlignOptions(seed=seed).seed  # the options' own check, with its message


def _check_losses(losses: Mapping[str, float], names: list[str]) -> dict[str, float]:
    missing = [n for n in names if n not in losses]
    if missing:
        raise ValueError(
            f"elbo_losses has no value for {missing} (it has {sorted(losses)}); "
            "reuse losses computed for the same classes"
        )
    out = {n: float(losses[n]) for n in names}
    if not all(np.isfinite(v) for v in out.values()):
        raise ValueError(f"elbo_losses must be finite numbers, got {out}")
    return out
