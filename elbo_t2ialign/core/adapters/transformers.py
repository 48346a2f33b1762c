"""Transformer denoisers: MMDiT joint attention (SD3, SD3.5), FLUX.1, and DiT
with cross-attention (PixArt-Sigma). All work on one token grid, so the
layer stack is a single resolution stage."""

from __future__ import annotations

import re

import torch

from elbo_t2ialign.core.adapters.base import Cond, ModelAdapter, TextBlock
from elbo_t2ialign.core.adapters.schedules import FlowSchedule, NoiseSchedule, schedule_from_scheduler
from elbo_t2ialign.core.capture import (
    CaptureAttnProcessor,
    CaptureFluxAttnProcessor,
    CaptureJointAttnProcessor,
    LayerInfo,
    attention_processors,
)


class _TransformerAdapter(ModelAdapter):
    @property
    def denoiser(self):
        return self.pipe.transformer

    @property
    def patch_size(self) -> int:
        return int(self.pipe.transformer.config.get("patch_size") or 1)

    @property
    def grid(self) -> int:
        """Side of the image-token grid."""
        return self.latent_size // self.patch_size

    def default_resolution(self) -> int:
        size = self.pipe.transformer.config.get("sample_size")
        if size:  # the size the denoiser was configured for
            return int(size) * self.vae_scale_factor
        return super().default_resolution()

    def _layers(self, kind_of) -> list[LayerInfo]:
        names = [k.removesuffix(".processor") for k in attention_processors(self.denoiser)]

        def rank(name: str) -> tuple:
            return (name.startswith("single_"), *map(int, re.findall(r"\d+", name)))

        modules = dict(self.denoiser.named_modules())
        return [
            LayerInfo(n, kind_of(n, modules[n]), i, self.grid, "stack")
            for i, n in enumerate(sorted(names, key=rank))
        ]


class MMDiTAdapter(_TransformerAdapter):
    """SD3 / SD3.5: sequence [image; text], text = [CLIP (77 tokens); T5]."""

    family = "mmdit"
    capture_processor = CaptureJointAttnProcessor
    max_sequence_length = 256
    generation_kind = "sd3"
    default_guidance = 7.0

    @property
    def attention_tokenizer(self):
        return self.pipe.tokenizer  # CLIP-L: its tokens open the text block

    @property
    def text_length(self) -> int:
        return int(self.pipe.tokenizer.model_max_length) + self.max_sequence_length

    def text_blocks(self) -> list[TextBlock]:
        """[CLIP-L|CLIP-G (77); T5 (max_sequence_length)]; a phrase T5 splits differently in context
        may be missing from the T5 block (not required)."""
        clip = self.pipe.tokenizer
        encoders = (self.pipe.text_encoder, self.pipe.text_encoder_2)
        blocks = [TextBlock("CLIP", clip, 0, int(clip.model_max_length), True, encoders)]
        if getattr(self.pipe, "tokenizer_3", None) is not None:
            blocks.append(
                TextBlock(
                    "T5",
                    self.pipe.tokenizer_3,
                    int(clip.model_max_length),
                    self.max_sequence_length,
                    False,
                    tuple(e for e in (getattr(self.pipe, "text_encoder_3", None),) if e is not None),
                )
            )
        return blocks

    def build_schedule(self) -> NoiseSchedule:
        return FlowSchedule.from_scheduler_config(
            self.pipe.scheduler.config, image_seq_len=self.grid**2, timestep_scale=1.0
        )

    def _encode_prompt(self, prompt: str) -> Cond:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt,
            prompt_2=None,
            prompt_3=None,
            device=self.text_device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return {"encoder_hidden_states": embeds.to(self.dtype), "pooled_projections": pooled.to(self.dtype)}

    def _forward(self, x, timestep, cond):
        return self.net(hidden_states=x, timestep=timestep, return_dict=False, **cond)[0]

    def attention_layers(self) -> list[LayerInfo]:
        # `attn` is joint; SD3.5's dual-attention blocks add an image-only `attn2`
        return self._layers(lambda name, module: "joint" if module.add_q_proj is not None else "self")


class _T5TextAdapter(_TransformerAdapter):
    """The denoiser attends to T5 tokens only, `max_sequence_length` of them, padding included."""

    @property
    def text_length(self) -> int:
        return self.max_sequence_length

    def max_prompt_tokens(self) -> int:
        return self.max_sequence_length


class FluxAdapter(_T5TextAdapter):
    """FLUX.1: sequence [text; image] (T5 tokens), 2x2-packed latents, RoPE, single-stream blocks."""

    family = "flux"
    capture_processor = CaptureFluxAttnProcessor
    max_sequence_length = 512
    guidance_scale = 3.5  # the pipeline's default for guidance-distilled checkpoints

    @property
    def patch_size(self) -> int:
        return 2  # latents are packed 2x2 into tokens

    @property
    def attention_tokenizer(self):
        return self.pipe.tokenizer_2  # T5: the only text the transformer attends to

    def default_resolution(self) -> int:
        return int(getattr(self.pipe, "default_sample_size", 128)) * self.vae_scale_factor

    def build_schedule(self) -> NoiseSchedule:
        return FlowSchedule.from_scheduler_config(
            self.pipe.scheduler.config, image_seq_len=self.grid**2, timestep_scale=1.0 / 1000
        )

    def _encode_prompt(self, prompt: str) -> Cond:
        embeds, pooled, _ = self.pipe.encode_prompt(
            prompt,
            prompt_2=None,
            device=self.text_device,
            num_images_per_prompt=1,
            max_sequence_length=self.max_sequence_length,
        )
        return {"encoder_hidden_states": embeds.to(self.dtype), "pooled_projections": pooled.to(self.dtype)}

    def _forward(self, x, timestep, cond):
        b, c, h, w = x.shape
        # (B, C, h, w) -> (B, h/2 * w/2, 4C)
        tokens = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * 4)
        txt_ids, img_ids = self._position_ids(h, w, cond["encoder_hidden_states"].shape[1], x)
        guidance = None
        if self.pipe.transformer.config.get("guidance_embeds"):
            guidance = torch.full((b,), self.guidance_scale, device=x.device, dtype=torch.float32)
        out = self.net(
            hidden_states=tokens,
            timestep=timestep,
            guidance=guidance,
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
            **cond,
        )[0]
        # (B, h/2 * w/2, 4C) -> (B, C, h, w)
        return out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)

    def attention_layers(self) -> list[LayerInfo]:
        return self._layers(lambda name, module: "joint")

    def _position_ids(
        self, h: int, w: int, n_text: int, like: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE ids of the text tokens (zeros) and of the (h/2, w/2) token grid (0, row, col), made
        on the host once per shape and device: a copy to the device in every call would wait for
        all queued work."""
        cache = self.__dict__.setdefault("_ids", {})
        key = (h, w, n_text, like.device, like.dtype)
        if key not in cache:
            rows, cols = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
            img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)
            txt_ids = torch.zeros(n_text, 3)
            cache[key] = (txt_ids.to(like.device, like.dtype), img_ids.to(like.device, like.dtype))
        return cache[key]


class PixArtAdapter(_T5TextAdapter):
    """PixArt-Sigma: DiT blocks with self-attention (attn1) and T5 cross-attention (attn2)."""

    family = "pixart"
    capture_processor = CaptureAttnProcessor
    max_sequence_length = 300

    @property
    def attention_tokenizer(self):
        return self.pipe.tokenizer

    def build_schedule(self) -> NoiseSchedule:
        return schedule_from_scheduler(self.pipe.scheduler)

    def _encode_prompt(self, prompt: str) -> Cond:
        embeds, mask, _, _ = self.pipe.encode_prompt(
            prompt,
            do_classifier_free_guidance=False,
            device=self.text_device,
            num_images_per_prompt=1,
            clean_caption=False,
            max_sequence_length=self.max_sequence_length,
        )
        return {"encoder_hidden_states": embeds.to(self.dtype), "encoder_attention_mask": mask}

    def _forward(self, x, timestep, cond):
        out = self.net(
            x,
            encoder_hidden_states=cond["encoder_hidden_states"],
            encoder_attention_mask=cond["encoder_attention_mask"],
            timestep=timestep,
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
            return_dict=False,
        )[0]
        c = x.shape[1]
        return out[:, :c] if out.shape[1] == 2 * c else out  # learned sigma: keep the noise half

    def attention_layers(self) -> list[LayerInfo]:
        return self._layers(lambda name, module: "cross" if module.is_cross_attention else "self")
