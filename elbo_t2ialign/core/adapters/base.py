"""The adapter interface every architecture family implements.

An adapter wraps a loaded diffusers pipeline and exposes exactly what the
method needs: prompt conditioning (cached per prompt), image -> latent,
the noise schedule, batched prediction, and the attention layers with their
kind, order and resolution. Everything above the adapters is family-agnostic.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image

from elbo_t2ialign.core import placement as placing
from elbo_t2ialign.core.adapters.schedules import NoiseSchedule
from elbo_t2ialign.core.capture import AttentionRecorder, LayerInfo

Cond = dict[str, torch.Tensor]  # conditioning tensors, batch dimension first
PROMPT_SYNTAXES = ("plain", "compel")
COMPEL_HINT = (
    "prompt_syntax=compel needs the 'compel' package: pip install compel==2.5.1 "
    '(or pip install -e ".[compel]"), or use prompt_syntax=plain'
)


def compel_fragments(text: str) -> list[str]:
    """The text pieces Compel encodes for `text` ("a photo of (cat)1.2 dog-" -> ["a photo of", "cat",
    "dog"]); Compel tokenizes each piece on its own and joins the tokens. Blends, conjunctions and
    other constructs that do not make one token sequence are refused."""
    try:
        from compel import Compel
        from compel.prompt_parser import FlattenedPrompt, Fragment
    except ImportError:
        raise ValueError(COMPEL_HINT) from None
    conjunction = Compel.parse_prompt_string(text)
    prompts = conjunction.prompts
    if len(prompts) != 1 or not isinstance(prompts[0], FlattenedPrompt):
        raise ValueError(f"prompt {text!r}: Compel blends and conjunctions are not supported here")
    if not all(isinstance(f, Fragment) for f in prompts[0].children):
        raise ValueError(
            f"prompt {text!r}: only Compel weights are supported here, not edits such as .swap()"
        )
    return [f.text for f in prompts[0].children]


class TextBlock(NamedTuple):
    """One block of the `encoder_hidden_states` sequence: the tokenizer whose ids fill it, where it
    starts, how many positions it has, whether a phrase must be found in it, and the text encoders
    whose outputs fill it (SDXL's and SD3's two CLIP encoders share one block)."""

    name: str
    tokenizer: Any
    offset: int
    length: int
    required: bool
    encoders: tuple = ()


def cat_cond(conds: list[Cond]) -> Cond:
    """Stack per-prompt conditionings (each batch 1) into one batch."""
    return {k: torch.cat([c[k] for c in conds], dim=0) for k in conds[0]}


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. 16-bit and float greyscale are rescaled to 8 bits by their range."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        image = Image.fromarray(arr.round().astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


class ModelAdapter:
    """Base class: the shared parts of image encoding and prediction plumbing."""

    family: str = "base"
    capture_processor: type  # processor class installed on captured layers

    max_sequence_length: int | None = None  # T5 text length, for families that use T5
    # prompt_syntax "compel": families whose prompts the reference encodes through Compel (SD1.x, SDXL)
    # parse Compel's weighting syntax; the others keep plain text, as the reference does for SD3
    parses_compel = False
    prompt_syntax = "plain"
    prompt_cache_size: int = 256  # conditionings kept by encode_prompt (least recently used dropped)
    compile_modes = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

    def __init__(
        self,
        pipe,
        device: torch.device,
        dtype: torch.dtype,
        resolution: int | None = None,
        max_sequence_length: int | None = None,
    ):
        self.pipe = pipe
        if max_sequence_length is not None:
            self.max_sequence_length = int(max_sequence_length)
        self.device = torch.device(device)
        self.dtype = dtype
        self.vae = pipe.vae
        self.vae_scale_factor = self.vae_scale()
        self.resolution = int(resolution or self.default_resolution())
        if self.resolution % self.vae_scale_factor:
            raise ValueError(
                f"resolution {self.resolution} is not a multiple of the VAE scale factor {self.vae_scale_factor}"
            )
        self.latent_size = self.resolution // self.vae_scale_factor
        self._cond_cache: dict[str, Cond] = {}
        self.schedule = self.build_schedule()
        self._compiled: torch.nn.Module | None = None  # see speed_up
        self._capturing = 0  # attention recorders of this adapter now installed

    # ---- to implement per family
    @property
    def denoiser(self) -> torch.nn.Module:
        raise NotImplementedError

    def build_schedule(self) -> NoiseSchedule:
        raise NotImplementedError

    def _encode_prompt(self, prompt: str) -> Cond:
        raise NotImplementedError

    def _forward(self, x: torch.Tensor, timestep: torch.Tensor, cond: Cond) -> torch.Tensor:
        raise NotImplementedError

    def attention_layers(self) -> list[LayerInfo]:
        raise NotImplementedError

    @property
    def attention_tokenizer(self):
        """Tokenizer whose ids index the text keys of the captured attention."""
        raise NotImplementedError

    @property
    def text_length(self) -> int:
        """Number of text tokens (keys) the denoiser attends to."""
        raise NotImplementedError

    # ---- ELBO-weighted generation (method.md §7); families that do not support it keep these
    generation_kind: str | None = None  # "sd", "sdxl" or "sd3": the model kind the generation protocol names
    default_guidance: float | None = None  # guidance scale when the generation config leaves it null

    def text_blocks(self) -> list[TextBlock]:
        """The blocks of `encoder_hidden_states`' sequence, in order, for per-token prompt weighting."""
        raise ValueError(f"prompt weighting supports the unet and mmdit families, not {self.family!r}")

    # ---- shared
    def vae_scale(self) -> int:
        """Pixels per latent cell along a side, as the pipeline computes it."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of the latents `encode_image` gives, which the ELBO and collection noise share."""
        return (int(self.vae.config.latent_channels), self.latent_size, self.latent_size)

    @property
    def vae_device(self) -> torch.device:
        """Where the VAE computes: its offload hooks' device, else its weights' (core/placement.py)."""
        return placing.execution_device(self.vae, self.device)

    @property
    def text_device(self) -> torch.device:
        """Where the (first) text encoder computes; its outputs are moved to `device`."""
        encoder = getattr(self.pipe, "text_encoder", None) or getattr(self.pipe, "text_encoder_2", None)
        return placing.execution_device(encoder, self.device) if encoder is not None else self.device

    def default_resolution(self) -> int:
        """method.md §2: the VAE's configured sample size."""
        size = self.vae.config.sample_size
        return int(size[0] if isinstance(size, (list, tuple)) else size)

    def set_prompt_syntax(self, syntax: str) -> None:
        """ "plain": prompts are text; "compel": on SD1.x/SDXL `(word)1.2`, `word+`, `word-` etc. are
        Compel weights and prompts are encoded through Compel set up as the reference sets it up."""
        if syntax not in PROMPT_SYNTAXES:
            raise ValueError(f"prompt_syntax must be one of {PROMPT_SYNTAXES}, got {syntax!r}")
        if syntax == "compel" and self.parses_compel:
            try:
                import compel  # noqa: F401
            except ImportError:
                raise ValueError(COMPEL_HINT) from None
        if syntax != self.prompt_syntax:
            self._cond_cache.clear()
            self.prompt_syntax = syntax

    @property
    def compel_active(self) -> bool:
        return self.prompt_syntax == "compel" and self.parses_compel

    def encode_prompt(self, prompt: str, check_length: bool = True) -> Cond:
        """Conditioning for one prompt, batch 1, cached per prompt string. The cache keeps the
        `prompt_cache_size` most recently used prompts, so memory stays flat over a dataset whose
        collection prompts rarely repeat while the per-class prompts stay cached. `check_length=False`
        lets the text encoders truncate an over-long prompt instead of refusing it."""
        cond = self._cond_cache.pop(prompt, None)
        if cond is None:
            if check_length:
                self.check_prompt_length(prompt)
            with torch.no_grad():
                cond = self._encoded(prompt)
        self._cond_cache[prompt] = cond  # (re)inserted last: dicts keep insertion order
        while len(self._cond_cache) > self.prompt_cache_size:
            self._cond_cache.pop(next(iter(self._cond_cache)))
        return cond

    @torch.no_grad()
    def encode_prompt_masked(self, prompt: str, positions: list[int]) -> Cond:
        """Conditioning of `prompt` with the tokens at `positions` (along `encoder_hidden_states`)
        hidden from every text encoder's attention: their keys are masked, the other tokens are encoded
        as if they were absent, and every position keeps its place. This is Compel's "masked" prompt
        for a fragment weighted below 1 (its default `DownweightMode.MASK`). Not cached."""
        masks = []
        for block in self.text_blocks():
            local = [p - block.offset for p in positions if block.offset <= p < block.offset + block.length]
            if local:
                shift = self.encoder_offset(block)  # a prefix the pipeline drops after encoding
                masks += [(encoder, [i + shift for i in local]) for encoder in block.encoders]
        hooks = []

        def masking(local: list[int]):
            def hook(module, args, kwargs):
                ids = args[0] if args else kwargs["input_ids"]
                given = kwargs.get("attention_mask")  # the pipeline's padding mask, kept
                mask = torch.ones(ids.shape, dtype=torch.long, device=ids.device)
                if given is not None:
                    mask = given.to(torch.long).clone()
                mask[:, [i for i in local if i < ids.shape[1]]] = 0
                return args, {**kwargs, "attention_mask": mask.to(given.dtype) if given is not None else mask}

            return hook

        try:
            for encoder, local in masks:
                hooks.append(encoder.register_forward_pre_hook(masking(local), with_kwargs=True))
            return self._encoded(prompt)
        finally:
            for handle in hooks:
                handle.remove()

    def _encoded(self, prompt: str) -> Cond:
        """`_encode_prompt` on the device the denoiser computes on: the text encoders compute where
        their placement puts them (`text_device`)."""
        cond = self._encode_prompt(prompt)
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in cond.items()}

    def encoder_offset(self, block: TextBlock) -> int:
        """Text-encoder input position of `block`'s first position (Qwen-Image: its dropped prefix)."""
        return 0

    @torch.no_grad()
    def vae_decode(self, z: torch.Tensor) -> torch.Tensor:
        """(1, C, h, w) latent in the space `encode_image` gives -> (1, 3, H, W) image in [-1, 1]ish,
        through the float32 VAE (undoing scale and shift)."""
        vae = self.vae
        shift = vae.config.get("shift_factor", None) or 0.0
        z = (z.float() / vae.config.scaling_factor + shift).to(self.vae_device, vae.dtype)
        return vae.decode(z, return_dict=False)[0]

    def clear_prompt_cache(self, prompts: list[str] | None = None) -> None:
        """Forget cached conditionings (all, or those of `prompts`): long prompt lists would fill memory."""
        for p in list(self._cond_cache) if prompts is None else prompts:
            self._cond_cache.pop(p, None)

    def token_ids(self, text: str, special: bool = True) -> list[int]:
        """The ids of `text` as the denoiser sees them (with prompt_syntax=compel: Compel's pieces)."""
        tokenizer = self.attention_tokenizer
        if not self.compel_active:
            return list(tokenizer(text, add_special_tokens=special, truncation=False).input_ids)
        ids = [
            i
            for piece in compel_fragments(text)
            for i in tokenizer(piece, add_special_tokens=False, truncation=False).input_ids
        ]
        return [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id] if special else ids

    def check_prompt_length(self, prompt: str) -> None:
        n, limit = len(self.token_ids(prompt)), self.max_prompt_tokens()
        if n > limit:
            raise ValueError(
                f"prompt {prompt!r} has {n} tokens but the text encoder takes at most {limit}; "
                "it would be silently truncated. Use fewer or shorter class names."
            )

    def max_prompt_tokens(self) -> int:
        return int(self.attention_tokenizer.model_max_length)

    def preprocess_image(self, image: Image.Image) -> torch.Tensor:
        """PIL image (any mode/size) -> (1, 3, R, R) float32 in [-1, 1], as the reference prepares it:
        the 8-bit RGB image resized with PIL's bilinear filter (antialiased when shrinking; diffusers'
        `VaeImageProcessor(resample="bilinear")`), then scaled to [-1, 1]."""
        rgb = to_rgb(image).resize((self.resolution, self.resolution), Image.Resampling.BILINEAR)
        x = np.asarray(rgb, dtype=np.float32) / 255.0 * 2.0 - 1.0  # (R, R, 3)
        return torch.from_numpy(x).permute(2, 0, 1)[None]

    @torch.no_grad()
    def encode_image(self, image: Image.Image) -> torch.Tensor:
        """PIL image (any mode/size) -> z0 (1, C, h, w) float32: posterior mean, shifted and scaled."""
        x = self.preprocess_image(image).to(self.vae_device, self.vae.dtype)
        z = self.vae.encode(x).latent_dist.mean.float().to(self.device)
        shift = self.vae.config.get("shift_factor", None) or 0.0
        return (z - shift) * self.vae.config.scaling_factor

    @torch.no_grad()
    def network(self, x: torch.Tensor, timestep: torch.Tensor, cond: Cond) -> torch.Tensor:
        """Raw denoiser call for samplers: x already scaled for the network, `timestep` the value
        the network is conditioned on (see `schedule.model_timestep`). Output in the model's own
        parameterisation (epsilon / v / velocity), in the network's dtype. Half-precision networks run
        under autocast (method.md §8: normalisations and softmax in float32, as the reference runs them)."""
        half = self.dtype in (torch.float16, torch.bfloat16)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=half):
            return self._forward(
                x.to(self.dtype), timestep.to(self.device), {k: v.to(self.device) for k, v in cond.items()}
            )

    @torch.no_grad()
    def predict(self, z_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """Batched network output in the target space of the schedule, float32.

        z_t (B, C, h, w) float32; t (B,) training indices; cond batch B.
        """
        out = self.network(self.schedule.model_input(z_t, t), self.schedule.model_timestep(t), cond)
        return self.schedule.to_target(out.float(), z_t, t)

    def recorder(self, weights: dict[str, dict[str, float]], **kwargs) -> AttentionRecorder:
        """An attention recorder for this denoiser (kwargs: chunk_mb, precision, per_layer, ...)."""
        return AttentionRecorder(
            self.denoiser,
            self.attention_layers(),
            weights,
            self.capture_processor,
            text_length=self.text_length,
            on_active=self._capture_on,
            device=self.device,
            **kwargs,
        )

    def _capture_on(self, active: bool) -> None:
        self._capturing += 1 if active else -1

    # ---- execution settings (opt-in, measured by the bench: docs/performance.md)
    def speed_up(
        self, channels_last: bool = False, compile_mode: str | None = None, compile_backend: Any = "inductor"
    ) -> None:
        """Run the denoiser faster; the maps stay the default path's up to float rounding.

        channels_last: the denoiser's weights (and so its convolutions' activations) in NHWC layout.
        compile_mode: `torch.compile` the denoiser with this mode ("default" or one of torch's:
            "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"). The compiled module
            runs every forward made outside an attention recorder of this adapter (ELBO forwards,
            samplers); the collection passes under a recorder stay eager, since their capture
            processors are Python with side effects. Shapes are static: each new batch size is
            compiled once, on its first call. compile_backend: torch.compile's backend.
        """
        if compile_mode is not None and compile_mode not in self.compile_modes:
            raise ValueError(
                f"compile_mode must be one of {self.compile_modes} or None, got {compile_mode!r}"
            )
        if channels_last:
            self.denoiser.to(memory_format=torch.channels_last)
        if compile_mode is not None:
            mode = None if compile_mode == "default" else compile_mode
            self._compiled = torch.compile(self.denoiser, mode=mode, backend=compile_backend, dynamic=False)

    @property
    def net(self) -> torch.nn.Module:
        """What `_forward` calls: the compiled denoiser (see speed_up) unless attention is being
        captured, else the denoiser itself."""
        return self._compiled if self._compiled is not None and not self._capturing else self.denoiser
