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
from elbo_t2ialign.core.finite import check_finite
from elbo_t2ialign.core.images import as_image
from elbo_t2ialign.core.options import AlignOptions

log = logging.getLogger(__name__)


class PromptTooLong(ValueError):
    """A collection prompt longer than the text encoder's context that is not split (the runner
    skips such an image, as it skips an unreadable one)."""


@dataclass
class Evidence:
    """Everything the network passes give for one image. Each map setting (strength, fixed
    temperature, with or without refinement) is computed from it without another forward, and so
    is the map of any other word of the collection prompt(s) (`word_maps`)."""

    names: list[str]
    losses: dict[str, float] | None  # summed diffusion loss per class (lower = better); None: not computed
    cross: dict[str, torch.Tensor]  # class cross map, min-max normalised, (R*R,) float32
    # the self-attention matrices of the refinement, S1 and S2 of method.md §5.4 (refined map =
    # S2 @ (S1 @ a)): (P, R*R, R*R) float32, one per collection prompt; None: no refinement
    refine_first: torch.Tensor | None
    refine_second: torch.Tensor | None
    grid: int  # R, side of the finest token grid the maps live on
    size: tuple[int, int]  # (width, height) of the image
    prompts: dict[str, str] = field(default_factory=dict)  # ELBO prompt per class, and "collect"
    token_positions: dict[str, list[int]] = field(default_factory=dict)  # in its collection prompt
    collect_prompts: list[str] = field(default_factory=list)  # P prompts (P > 1: the classes split)
    prompt_of: dict[str, int] = field(default_factory=dict)  # class -> index in collect_prompts
    # the aggregated cross-attention of every text token of each collection prompt, (P, R*R, L), in
    # the capture precision (float32, or the network's dtype with capture_precision="model")
    tokens: torch.Tensor | None = None
    truncated: list[str] = field(default_factory=list)  # prompt_overflow=truncate: classes cut off
    _pass: _Pass | None = field(default=None, repr=False, compare=False)

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
        """Image-sized (H, W) float32 maps in [0, 1]: refine(minmax(cross) ** tau), resized, min-max;
        each class refined with the self-attention of its own collection prompt."""
        taus = self.temperatures(strength, fixed)
        out = {}
        for n in self.names:
            s1, s2 = (self._refiner(self.refine_first, n), self._refiner(self.refine_second, n))
            if not refine:
                s1 = s2 = None
            out[n] = calibrate.to_image(
                calibrate.self_attention_refine(self.cross[n] ** taus[n], s1, s2), self.grid, self.size
            )
        return out

    def _refiner(self, matrices: torch.Tensor | None, name: str) -> torch.Tensor | None:
        if matrices is None:
            return None
        return matrices[self.prompt_of.get(name, 0)] if matrices.dim() == 3 else matrices

    def result(self, options: AlignOptions, loss_source: dict[str, str] | None = None) -> HeatmapResult:
        """The HeatmapResult of these classes at the options' setting (no forward)."""
        taus = self.temperatures(options.strength, options.fixed_temperature)
        baseline = self.maps(1.0, refine=options.refine)
        elbo_maps = (
            {n: m.copy() for n, m in baseline.items()}
            if all(t == 1.0 for t in taus.values())
            else self.maps(options.strength, options.fixed_temperature, refine=options.refine)
        )
        losses = self.losses or {}
        if loss_source is None:
            loss_source = {n: "none" if n not in losses else self._loss_origin() for n in self.names}
        return HeatmapResult(
            elbo_maps,
            baseline,
            self.maps(1.0, refine=False),
            {n: losses.get(n) for n in self.names},
            taus,
            self.prompts,
            self.token_positions,
            self,
            dict(self.prompt_of),
            loss_source,
        )

    def _loss_origin(self) -> str:
        return self._pass.loss_origin if self._pass is not None else "given"

    def locate(self, words: Sequence[str]) -> tuple[dict[str, int], dict[str, list[int]]]:
        """(collection prompt index, token positions) of each word: a class of this evidence where it
        was located for its map; any other word in the first collection prompt holding it, searched
        after the template's own words (from the start of a prompt of your own)."""
        if self._pass is None:
            raise ValueError("this evidence keeps no tokenizer (it was not made by Aligner.observe)")
        ids, prompt_of, positions = self._pass.token_ids, {}, {}
        new: dict[int, list[str]] = {}
        for word in words:
            if word in self.names:
                prompt_of[word], positions[word] = self.prompt_of.get(word, 0), self.token_positions[word]
                continue
            for g, (text, start) in enumerate(zip(self.collect_prompts, self._pass.starts, strict=True)):
                try:
                    calibrate.locate_tokens(ids, text, word, start)
                except ValueError:
                    continue
                new.setdefault(g, []).append(word)
                break
            else:
                shown = " | ".join(self.collect_prompts)
                raise ValueError(
                    f"{word!r} is not a word of the collection prompt{'s' * (len(self.collect_prompts) > 1)} "
                    f"{shown!r}; give words as they appear in it"
                )
        for g, group in new.items():  # left to right within a prompt, as for the classes
            found = calibrate.class_token_positions(ids, self.collect_prompts[g], group, self._pass.starts[g])
            for word in group:
                prompt_of[word], positions[word] = g, found[word]
        return prompt_of, positions

    def word_maps(
        self,
        words: Sequence[str],
        *,
        compute_elbo: bool = False,
        strength: float | None = None,
        fixed_temperature: bool | None = None,
        refine: bool | None = None,
    ) -> HeatmapResult:
        """Heatmaps of any words or phrases of the collection prompt(s), from the kept text attention,
        with no collection forward: a HeatmapResult as `Aligner.heatmaps` gives for these words
        (calibrated across them). Words without an ELBO loss, when the setting needs one, get it
        only with `compute_elbo=True` (one ELBO pass for those words alone); `result.loss_source`
        says per word "stored" (from the pass), "computed" (by this call), "given" or "none"."""
        if self.tokens is None or self._pass is None:
            raise ValueError("this evidence keeps no text attention; make it with Aligner.observe")
        if isinstance(words, str):
            raise TypeError(f"words must be a list, got the string {words!r}; wrap it: [{words!r}]")
        words = list(words)
        if (
            not words
            or len(set(words)) != len(words)
            or not all(isinstance(w, str) and w.strip() for w in words)
        ):
            raise ValueError(f"give distinct non-empty words of the prompt, got {words}")
        opts = self._pass.options.replace(
            **{
                k: v
                for k, v in (
                    ("strength", strength),
                    ("fixed_temperature", fixed_temperature),
                    ("refine", refine),
                )
                if v is not None
            }
        )
        prompt_of, positions = self.locate(words)
        cross = {}
        for w in words:
            cross |= calibrate.class_cross_maps(self.tokens[prompt_of[w]].float(), {w: positions[w]})
        known = dict(self.losses or {})
        needs = len(words) > 1 and not opts.fixed_temperature and opts.strength != 1.0
        missing = [w for w in words if w not in known]
        source = {w: ("stored" if w in (self.losses or {}) else "none") for w in words}
        if self.losses is not None and self._pass.loss_origin == "given":
            source = {w: ("given" if s == "stored" else s) for w, s in source.items()}
        if needs and missing:
            if not compute_elbo:
                raise ValueError(
                    f"words {missing} have no ELBO loss and strength {opts.strength:g} needs one; "
                    "pass compute_elbo=True (one ELBO pass for these words), or strength=1"
                )
            values = self._pass.elbo(missing, opts)
            self.losses = {**known, **values}  # kept: a later call reuses them
            known |= values
            source |= dict.fromkeys(missing, "computed")
        losses = {w: known[w] for w in words} if all(w in known for w in words) else None
        sub = Evidence(
            words,
            losses,
            cross,
            self.refine_first,
            self.refine_second,
            self.grid,
            self.size,
            {w: opts.elbo_prompt.format(w) for w in words} | {"collect": self.prompts.get("collect", "")},
            positions,
            list(self.collect_prompts),
            prompt_of,
            self.tokens,
            [],
            self._pass,
        )
        return sub.result(opts, source)


@dataclass
class _Pass:
    """What `Evidence.word_maps` needs of the pass beyond its maps: the tokenizer, where each
    collection prompt's words start, and for ELBO losses on request the aligner, z0 and noise."""

    aligner: Aligner
    options: AlignOptions
    z0: torch.Tensor
    elbo_noise: torch.Tensor
    starts: list[int]
    loss_origin: str  # "stored" (computed in the pass) or "given" (elbo_losses=)

    @property
    def token_ids(self):
        return self.aligner.adapter.token_ids

    def elbo(self, words: list[str], opts: AlignOptions) -> dict[str, float]:
        conds = [self.aligner.adapter.encode_prompt(opts.elbo_prompt.format(w)) for w in words]
        values = self.aligner._elbo_losses(
            self.z0, conds, opts.elbo_timesteps, self.elbo_noise, self.aligner._batch(opts)
        )
        return dict(zip(words, values, strict=True))


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
    prompt_of: dict[str, int] = field(default_factory=dict)  # index in evidence.collect_prompts
    # per class, where its loss came from: "stored" (this pass's ELBO forwards), "computed" (by
    # word_maps, just now), "given" (elbo_losses=), "none" (not needed)
    loss_source: dict[str, str] = field(default_factory=dict)

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
        return evidence.result(opts)  # result.evidence.word_maps([...]): any other word of the prompt

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
        when the options alone would not, e.g. to make several strengths from one pass. A class list
        whose collection prompt does not fit the text encoder follows `options.prompt_overflow`."""
        opts = options or self.options
        self.adapter.set_prompt_syntax(opts.prompt_syntax)
        image = as_image(image)
        names = self._check_classes(classes, phrases)
        texts = list(phrases) if phrases is not None else names
        seed = opts.seed if seed is None else _check_seed(seed)
        self._check_timesteps(opts)
        elbo_prompts = [opts.elbo_prompt.format(t) for t in texts]
        # bad input (a word not in the prompt, an over-long prompt) fails before any forward pass
        plan = self._plan(names, texts, prompt, opts)
        truncated = [n for g in plan for n, pos in g.positions.items() if not pos]
        if truncated:
            log.warning(
                "prompt_overflow=truncate: %s cut off the prompt %r; their maps are zero",
                truncated,
                plan[0].text,
            )
        if need_elbo is None:
            need_elbo = len(names) > 1 and not opts.fixed_temperature and opts.strength != 1.0

        z0 = self.adapter.encode_image(image)  # (1, C, h, w)
        dtype = self.adapter.dtype
        check_finite(z0, "the image's latents (VAE encoder)", self.adapter.vae.dtype)
        collect_noise, elbo_noise = self._draw_noise(z0, opts, seed)
        losses = None
        if elbo_losses is not None:
            losses = _check_losses(elbo_losses, names)
        elif need_elbo and len(names) > 1:
            conds = [self.adapter.encode_prompt(p) for p in elbo_prompts]
            values = self._elbo_losses(z0, conds, opts.elbo_timesteps, elbo_noise, self._batch(opts))
            check_finite(torch.tensor(values), "the ELBO losses (denoiser)", dtype)
            losses = dict(zip(names, values, strict=True))

        weights = self._weights if opts is self.options else capture.layer_weights(self.layers, opts)
        texts_collected = [g.text for g in plan]
        check = opts.prompt_overflow != "truncate"  # truncate: the text encoder cuts the prompt
        rec = self._collect(z0, texts_collected, collect_noise, opts, weights, False, check)
        groups = [None] if len(plan) == 1 else list(range(len(plan)))
        store = torch.float32 if opts.capture_precision == "float32" else self.adapter.dtype
        tokens = _stacked([rec.mean("cross", g).to(store) for g in groups])  # (P, R*R, L)
        cross, positions, prompt_of = {}, {}, {}
        for g, part in enumerate(plan):
            cross |= calibrate.class_cross_maps(tokens[g].float(), part.positions)
            positions |= part.positions
            prompt_of |= dict.fromkeys(part.positions, g)
        recorded = rec.sums if groups == [None] else rec.group_sums[0]
        s1, s2 = (
            _stacked([rec.mean(agg, g) for g in groups]) if opts.refine and agg in recorded else None
            for agg in ("self1", "self2")
        )
        for maps, what in ((tokens, "cross"), (s1, "self"), (s2, "self")):
            check_finite(maps, f"the {what}-attention maps (denoiser)", dtype)
        collect = texts_collected[0] if len(plan) == 1 else " | ".join(texts_collected)
        prompts = dict(zip(names, elbo_prompts, strict=True)) | {"collect": collect}
        origin = "given" if elbo_losses is not None else "computed"  # of the losses, if any
        return Evidence(
            names,
            losses,
            {n: cross[n] for n in names},
            s1,
            s2,
            rec.target_res,
            image.size,
            prompts,
            {n: positions[n] for n in names},
            texts_collected,
            {n: prompt_of[n] for n in names},
            tokens,
            truncated,
            _Pass(self, opts, z0, elbo_noise, [g.start for g in plan], origin),
        )

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

    def _collect(
        self,
        z0,
        prompts: str | Sequence[str],
        noise: torch.Tensor,
        opts: AlignOptions,
        weights,
        per_layer=False,
        check_length: bool = True,
    ):
        """Run the collection timesteps of every prompt under one recorder, the (prompt, timestep)
        pairs batched together (prompt-major, the same noise per timestep for every prompt); with
        several prompts the recorder sums each prompt's rows apart. Restart, with a fresh recorder
        and half the batch, on out-of-memory (the maps summed so far would be incomplete)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        conds = [self.adapter.encode_prompt(p, check_length=check_length) for p in prompts]
        n_t = len(opts.collect_timesteps)
        pair_prompt = [g for g in range(len(prompts)) for _ in range(n_t)]
        pair_step = torch.arange(n_t).repeat(len(prompts))
        ts = torch.tensor(opts.collect_timesteps, dtype=torch.long)[pair_step].to(self.adapter.device)
        noise = noise[pair_step].to(self.adapter.device)

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
                    rows = pair_prompt[lo : lo + len(t)]
                    if len(prompts) > 1:
                        rec.set_groups(rows, len(prompts))
                    z_t = self.adapter.schedule.add_noise(z0, noise[lo : lo + len(t)], t)
                    self.adapter.predict(z_t, t, cat_cond([conds[g] for g in rows]))
            return rec

        def lowered(batch: int) -> None:  # for good, even if the smaller batch fails too
            self._fitted_batch = batch

        rec, _ = elbo.halve_on_oom(self._batch(opts), attempt, on_halve=lowered)
        return rec

    def _plan(
        self, names: list[str], texts: list[str], prompt: str | None, opts: AlignOptions
    ) -> list[_Part]:
        """The collection prompt(s) and each class's token positions in its own prompt.

        Template prompts (prompt None) that do not fit the text encoder follow opts.prompt_overflow:
        "split" puts the classes, in the order given, into the fewest prompts that fit, even in
        class count when that fits (contiguous runs: the first prompts take one class more when the
        count does not divide), else filled in turn; "refuse" raises; "truncate" keeps the one prompt, which the text
        encoder cuts, and a class keeps only its tokens before the cut (none: an all-zero map).
        A prompt of your own is never split."""
        ids, most = self.adapter.token_ids, opts.max_prompt_classes
        if prompt is not None:
            text = str(prompt)
            if opts.prompt_overflow != "truncate" and not self._fits(text):
                self._refuse(
                    text, "a prompt of your own is not split; shorten it or use prompt_overflow=truncate"
                )
            start = calibrate.leading_specials(ids, text)
            return [self._part(text, names, texts, start, opts)]
        start = calibrate.template_start(ids, opts.collect_prompt)

        def fill(chunk: Sequence[str]) -> str:
            return opts.collect_prompt.format(", ".join(chunk))

        def fits(a: int, b: int) -> bool:  # classes a..b-1 in one prompt
            return (most is None or b - a <= most) and self._fits(fill(texts[a:b]))

        whole = fill(texts)
        if fits(0, len(texts)) or (opts.prompt_overflow == "truncate" and most is None):
            return [self._part(whole, names, texts, start, opts)]
        if opts.prompt_overflow == "refuse" and not self._fits(whole):
            self._refuse(whole, "or set prompt_overflow=split to spread the classes over several prompts")
        lone = [t for t in texts if not self._fits(fill([t]))]
        if lone:
            self._refuse(fill(lone[:1]), "this class alone does not fit; shorten its name or phrase")
        runs = _split(len(texts), fits)
        return [self._part(fill(texts[a:b]), names[a:b], texts[a:b], start, opts) for a, b in runs]

    def _fits(self, prompt: str) -> bool:
        """Whether the adapter takes `prompt` whole (each family counts its own template and prefix)."""
        try:
            self.adapter.check_prompt_length(prompt)
        except ValueError:
            return False
        return True

    def _refuse(self, prompt: str, hint: str) -> None:
        try:
            self.adapter.check_prompt_length(prompt)
        except ValueError as err:
            raise PromptTooLong(f"{err} ({hint})") from None

    def _part(self, text: str, names: list[str], texts: list[str], start: int, opts: AlignOptions) -> _Part:
        positions = self._positions(text, names, texts, start, opts)
        if not self._fits(text):  # prompt_overflow=truncate: keep the tokens before the cut
            ids = self.adapter.token_ids
            trailing = len(ids(text, True)) - calibrate.leading_specials(ids, text) - len(ids(text, False))
            kept = self.adapter.max_prompt_tokens() - trailing
            positions = {n: [p for p in pos if p < kept] for n, pos in positions.items()}
        return _Part(text, positions, start)

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


@dataclass
class _Part:
    """One collection prompt: its text, the token positions of its classes, where its words start."""

    text: str
    positions: dict[str, list[int]]
    start: int


def _stacked(per_prompt: list[torch.Tensor]) -> torch.Tensor:
    """(P, ...) from P tensors; one prompt's as a view (its (R*R, R*R) matrices are not copied)."""
    return per_prompt[0].unsqueeze(0) if len(per_prompt) == 1 else torch.stack(per_prompt)


def _split(n: int, fits) -> list[tuple[int, int]]:
    """Contiguous runs [a, b) of n classes, in order, each with `fits(a, b)`: the fewest runs (k,
    as the greedy fill gives them), taken even in size when even runs of k all fit (the first runs
    one longer when k does not divide n), else the greedy fill's own runs."""
    greedy, a = [], 0
    while a < n:
        b = a + 1
        while b < n and fits(a, b + 1):
            b += 1
        greedy.append((a, b))
        a = b
    k = len(greedy)
    size, extra = divmod(n, k)
    even = [(i * size + min(i, extra), (i + 1) * size + min(i + 1, extra)) for i in range(k)]
    return even if all(fits(a, b) for a, b in even) else greedy


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
