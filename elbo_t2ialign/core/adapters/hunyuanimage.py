"""HunyuanImage 2.1 (`HunyuanImagePipeline`, `HunyuanImageTransformer2DModel`): double-stream blocks
(separate image and text projections) and single-stream blocks over [image; text], 2-D RoPE on the
image tokens, a 32x autoencoder (`AutoencoderKLHunyuanImage`, 64 channels), flow matching.

The text: Qwen2.5-VL reads the prompt inside the pipeline's instruction template
(`prompt_template_encode`), padded to `tokenizer_max_length` + 34 positions, and the pipeline keeps
its hidden states from position `prompt_template_encode_start_idx` (34) on. Text in quotes is also
rendered by a ByT5 glyph encoder (`extract_glyph_text`); the transformer reorders each sample's text
as [valid ByT5; valid Qwen; padding ByT5; padding Qwen]. So the text columns are the glyph tokens (none
without quotes; -1 here, so no word is ever found in them), then the kept Qwen tokens, then masked
padding; `max_sequence_length` is the pipeline's `tokenizer_max_length` (Qwen positions kept).

The schedule: the pipeline samples sigma = 1 .. 1/n through the scheduler's static shift and gives the
network sigma * 1000; the output is the velocity eps - z0. A guidance-distilled checkpoint gets the
pipeline's default `distilled_guidance_scale` (3.25, times 1000 as the pipeline passes it); a
MeanFlow one gets timestep_r = timestep, i.e. the instantaneous velocity.
"""

from __future__ import annotations

import torch

from elbo_t2ialign.core.adapters.base import Cond
from elbo_t2ialign.core.adapters.chat import require_diffusers
from elbo_t2ialign.core.adapters.lm_text import LMTextAdapter
from elbo_t2ialign.core.adapters.schedules import FlowSchedule, NoiseSchedule
from elbo_t2ialign.core.capture import LayerInfo, _CaptureBase

SINCE = "0.36.0"  # first diffusers release with HunyuanImagePipeline
GLYPH = -1  # the id given to ByT5 glyph columns in `token_ids`: no word's token


class CaptureHunyuanImageAttnProcessor(_CaptureBase):
    """`HunyuanImageAttnProcessor` of diffusers/models/transformers/transformer_hunyuanimage.py (0.42.1)
    with an explicit softmax; sequence [image; text] in both block kinds."""

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None
    ):
        from diffusers.models.embeddings import apply_rotary_emb

        n_img = hidden_states.shape[1]
        single = attn.add_q_proj is None and encoder_hidden_states is not None
        if single:
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)
        query, key, value = (
            f(hidden_states).unflatten(2, (attn.heads, -1)) for f in (attn.to_q, attn.to_k, attn.to_v)
        )
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            if single:
                query = torch.cat(
                    [apply_rotary_emb(query[:, :n_img], image_rotary_emb, sequence_dim=1), query[:, n_img:]],
                    dim=1,
                )
                key = torch.cat(
                    [apply_rotary_emb(key[:, :n_img], image_rotary_emb, sequence_dim=1), key[:, n_img:]],
                    dim=1,
                )
            else:
                query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
                key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        if attn.add_q_proj is not None and encoder_hidden_states is not None:
            context = [
                f(encoder_hidden_states).unflatten(2, (attn.heads, -1))
                for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
            ]
            if attn.norm_added_q is not None:
                context[0] = attn.norm_added_q(context[0])
            if attn.norm_added_k is not None:
                context[1] = attn.norm_added_k(context[1])
            query, key, value = (
                torch.cat([x, c], dim=1) for x, c in zip((query, key, value), context, strict=True)
            )
        # (B, S, H, D) -> (B, H, S, D), the layout SDPA gets from the native attention dispatch
        query, key, value = (x.transpose(1, 2) for x in (query, key, value))
        out = self.attend(
            query,
            key,
            value,
            scale=query.shape[-1] ** -0.5,
            image_rows=slice(0, n_img),
            blocks={"self": slice(0, n_img), "cross": slice(n_img, None)},
            mask=attention_mask,
        )
        out = out.transpose(1, 2).flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return out, encoder_hidden_states
        hidden_states, encoder_hidden_states = out[:, :n_img], out[:, n_img:]
        if getattr(attn, "to_out", None) is not None:
            hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if getattr(attn, "to_add_out", None) is not None:
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return hidden_states, encoder_hidden_states


class HunyuanImageAdapter(LMTextAdapter):
    """HunyuanImage 2.1: Qwen2.5-VL text after a dropped template prefix (+ ByT5 glyphs), double- and
    single-stream blocks."""

    family = "hunyuanimage"
    capture_processor = CaptureHunyuanImageAttnProcessor
    max_sequence_length = 1000  # the pipeline's tokenizer_max_length
    text_follows_space = False  # the template's user turn opens with "\n", a word after it has no space
    distilled_guidance_scale = 3.25  # the pipeline's default

    def __init__(self, pipe, *args, **kwargs):
        require_diffusers("HunyuanImage 2.1", SINCE)
        super().__init__(pipe, *args, **kwargs)

    @property
    def default_guidance(self) -> float:
        """The pipeline's guider's scale as plain classifier-free guidance (its adaptive projection is
        not applied); 1 (no second prediction) for a checkpoint without a guider (distilled)."""
        guider = getattr(self.pipe, "guider", None)
        return float(guider.config.guidance_scale) if guider is not None else 1.0

    def vae_scale(self) -> int:
        return int(self.pipe.vae.config.spatial_compression_ratio)

    @property
    def patch_size(self) -> int:
        return int(self.pipe.transformer.config.patch_size[0])

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (int(self.vae.config.latent_channels), self.latent_size, self.latent_size)

    def default_resolution(self) -> int:
        return int(self.pipe.default_sample_size) * self.vae_scale_factor

    def build_schedule(self) -> NoiseSchedule:
        return FlowSchedule.from_scheduler_config(
            self.pipe.scheduler.config, image_seq_len=self.grid**2, timestep_scale=1.0
        )

    @property
    def text_length(self) -> int:
        return self.max_sequence_length + int(self.pipe.tokenizer_2_max_length)

    def max_prompt_tokens(self) -> int:
        pipe = self.pipe
        template = len(pipe.tokenizer(pipe.prompt_template_encode.format("")).input_ids)
        return self.max_sequence_length + pipe.prompt_template_encode_start_idx - template

    def fed_ids(self, text: str) -> list[int]:
        from diffusers.pipelines.hunyuan_image.pipeline_hunyuanimage import extract_glyph_text

        pipe = self.pipe
        start = pipe.prompt_template_encode_start_idx
        ids = pipe.tokenizer(
            pipe.prompt_template_encode.format(text),
            truncation=True,
            max_length=self.max_sequence_length + start,
        ).input_ids
        glyph = extract_glyph_text(text)
        n_glyph = 0
        if glyph is not None:
            tok2 = pipe.tokenizer_2(glyph, truncation=True, max_length=pipe.tokenizer_2_max_length)
            n_glyph = len(tok2.input_ids)
        return [GLYPH] * n_glyph + list(ids[start:])

    def encoder_offset(self, block) -> int:
        """Qwen's input position of a text column: the pipeline drops the template's first 34 positions
        (glyph columns, which come first, are refused in `encode_prompt_masked`)."""
        return int(self.pipe.prompt_template_encode_start_idx)

    def encode_prompt_masked(self, prompt: str, positions: list[int]):
        from diffusers.pipelines.hunyuan_image.pipeline_hunyuanimage import extract_glyph_text

        if extract_glyph_text(prompt) is not None:
            raise ValueError(
                f"prompt {prompt!r}: a phrase weight below 1 with quoted (glyph) text is not supported on "
                "HunyuanImage 2.1 (the glyph columns come before the prompt's); leave out the quotes"
            )
        return super().encode_prompt_masked(prompt, positions)

    def _encode_prompt(self, prompt: str) -> Cond:
        pipe = self.pipe
        embeds, mask = pipe._get_qwen_prompt_embeds(
            tokenizer=pipe.tokenizer,
            text_encoder=pipe.text_encoder,
            prompt=prompt,
            device=self.text_device,
            tokenizer_max_length=self.max_sequence_length,
            template=pipe.prompt_template_encode,
            drop_idx=pipe.prompt_template_encode_start_idx,
        )
        embeds, mask, embeds_2, mask_2 = pipe.encode_prompt(
            prompt, device=self.text_device, prompt_embeds=embeds, prompt_embeds_mask=mask
        )
        return {
            "encoder_hidden_states": embeds.to(self.dtype),
            "encoder_attention_mask": mask,
            "encoder_hidden_states_2": embeds_2.to(self.dtype),
            "encoder_attention_mask_2": mask_2,
        }

    def _forward(self, x, timestep, cond):
        config = self.pipe.transformer.config
        b = x.shape[0]
        guidance = None
        if config.get("guidance_embeds"):
            guidance = torch.full(
                (b,), self.distilled_guidance_scale * 1000.0, device=x.device, dtype=x.dtype
            )
        return self.net(
            hidden_states=x,
            timestep=timestep.to(x.dtype),
            timestep_r=timestep.to(x.dtype) if config.get("use_meanflow") else None,
            guidance=guidance,
            return_dict=False,
            **cond,
        )[0]

    def attention_layers(self) -> list[LayerInfo]:
        """Double- then single-stream blocks; the text-only token refiner has no image token."""
        blocks = [
            layer.name
            for layer in self._layers(lambda name, module: "joint")
            if layer.name.startswith(("transformer_blocks.", "single_transformer_blocks."))
        ]
        return [LayerInfo(name, "joint", i, self.grid, "stack") for i, name in enumerate(blocks)]
