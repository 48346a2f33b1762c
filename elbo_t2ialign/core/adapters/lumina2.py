"""Lumina-Image 2.0 (`Lumina2Pipeline`, `Lumina2Transformer2DModel`): Gemma-2 text refined by text-only
blocks (`context_refiner`), image tokens refined by image-only blocks (`noise_refiner`), then joint
blocks over one sequence [text (unpadded length); image; padding], 3-axis RoPE, grouped-query heads.

The text: the pipeline writes `system_prompt + " <Prompt Start> " + prompt`, pads it to
max_sequence_length (the system prompt counts) and masks the padding; in the joint blocks each
sample's text is cut to its own unpadded length, so its image tokens start there.

The schedule: flow matching with `FlowMatchEulerDiscreteScheduler`; the network is conditioned on
1 - sigma and predicts z0 - eps (the pipeline negates its output before the Euler step). The pipeline
computes the resolution shift mu from `latents.shape[1]`, which is the latent channel count, not the
token count; the schedule repeats that, so the noise levels are the ones the pipeline samples.
"""

from __future__ import annotations

import math

import torch

from elbo_t2ialign.core.adapters.base import Cond
from elbo_t2ialign.core.adapters.chat import require_diffusers
from elbo_t2ialign.core.adapters.lm_text import LMTextAdapter
from elbo_t2ialign.core.adapters.schedules import FlowSchedule, NoiseSchedule
from elbo_t2ialign.core.capture import LayerInfo, _CaptureBase, attention_processors

SINCE = "0.33.0"  # first diffusers release with Lumina2Pipeline


class CaptureLumina2AttnProcessor(_CaptureBase):
    """`Lumina2AttnProcessor2_0` of diffusers/models/transformers/transformer_lumina2.py (0.33.1, 0.42.1)
    with an explicit softmax. Image-only blocks give the "self" block; joint blocks, per sample, the
    image rows of [text; image] with its own text length (from the key mask, or all text when the
    batch's lengths are equal and the model passes no mask); the "cross" block is padded with zeros
    to the adapter's text length."""

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states,
        attention_mask=None,
        image_rotary_emb=None,
        base_sequence_length=None,
    ):
        from diffusers.models.embeddings import apply_rotary_emb

        batch, sequence_length, _ = hidden_states.shape
        query = attn.to_q(hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        head_dim = query.shape[-1] // attn.heads
        dtype = query.dtype
        kv_heads = key.shape[-1] // head_dim
        query = query.view(batch, -1, attn.heads, head_dim)
        key, value = key.view(batch, -1, kv_heads, head_dim), value.view(batch, -1, kv_heads, head_dim)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, use_real=False)
            key = apply_rotary_emb(key, image_rotary_emb, use_real=False)
        query, key = query.to(dtype), key.to(dtype)
        scale = attn.scale
        if base_sequence_length is not None:
            scale = math.sqrt(math.log(sequence_length, base_sequence_length)) * attn.scale
        n_rep = attn.heads // kv_heads
        if n_rep >= 1:
            key = key.unsqueeze(3).repeat(1, 1, 1, n_rep, 1).flatten(2, 3)
            value = value.unsqueeze(3).repeat(1, 1, 1, n_rep, 1).flatten(2, 3)
        query, key, value = (x.transpose(1, 2) for x in (query, key, value))
        n_img = self.layer.resolution**2
        if self.layer.kind == "self":
            out = self.attend(
                query, key, value, scale=scale, image_rows=slice(None), blocks={"self": slice(None)}
            )
        else:
            # [text; image; padding] per sample: text as long as the sample's key mask says
            keep = None if attention_mask is None else attention_mask.bool().view(batch, 1, 1, -1)
            valid = [sequence_length] * batch if keep is None else keep.flatten(1).sum(1).tolist()
            groups = [list(range(batch))] if len(set(valid)) == 1 else [[i] for i in range(batch)]
            outs = []
            for group in groups:
                n_txt = int(valid[group[0]]) - n_img
                outs.append(
                    self.attend(
                        query[group],
                        key[group],
                        value[group],
                        scale=scale,
                        image_rows=slice(n_txt, n_txt + n_img),
                        blocks={"cross": slice(0, n_txt), "self": slice(n_txt, n_txt + n_img)}
                        | (
                            {"padding": slice(n_txt + n_img, None)} if n_txt + n_img < sequence_length else {}
                        ),
                        mask=None if keep is None else keep[group],
                        cross_width=self.recorder.text_length,
                    )
                )
            out = torch.cat(outs)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


class Lumina2Schedule(FlowSchedule):
    """Flow matching as `Lumina2Pipeline` samples it: network time 1 - sigma, output z0 - eps."""

    def model_timestep(self, t):
        return 1 - self.sigma(t)

    def to_target(self, pred, z_t, t):
        return -pred


class Lumina2Adapter(LMTextAdapter):
    """Lumina-Image 2.0: Gemma-2 text after the pipeline's system prompt; image-only and joint blocks."""

    family = "lumina2"
    capture_processor = CaptureLumina2AttnProcessor
    max_sequence_length = 256  # the pipeline's default, system prompt included
    default_guidance = 4.0  # the pipeline's guidance_scale (its cfg_normalization is not applied)

    def __init__(self, pipe, *args, **kwargs):
        require_diffusers("Lumina-Image 2.0", SINCE)
        super().__init__(pipe, *args, **kwargs)

    def build_schedule(self) -> NoiseSchedule:
        # the pipeline's mu is computed from latents.shape[1], the latent channels (module docstring)
        channels = int(self.pipe.transformer.config.in_channels)
        return Lumina2Schedule.from_scheduler_config(
            self.pipe.scheduler.config, image_seq_len=channels, timestep_scale=1.0
        )

    @property
    def template(self) -> str:
        return self.pipe.system_prompt + " <Prompt Start> "

    @property
    def text_length(self) -> int:
        return self.max_sequence_length

    def max_prompt_tokens(self) -> int:
        return self.max_sequence_length - len(self.pipe.tokenizer(self.template.rstrip()).input_ids)

    def fed_ids(self, text: str) -> list[int]:
        tok = self.pipe.tokenizer
        ids = tok(self.template + text, truncation=True, max_length=self.max_sequence_length).input_ids
        return list(ids)

    def _encode_prompt(self, prompt: str) -> Cond:
        embeds, mask, _, _ = self.pipe.encode_prompt(
            prompt,
            do_classifier_free_guidance=False,
            device=self.text_device,
            num_images_per_prompt=1,
            max_sequence_length=self.max_sequence_length,
        )
        return {"encoder_hidden_states": embeds.to(self.dtype), "encoder_attention_mask": mask}

    def _forward(self, x, timestep, cond):
        return self.net(
            hidden_states=x,
            timestep=timestep,
            encoder_hidden_states=cond["encoder_hidden_states"],
            encoder_attention_mask=cond["encoder_attention_mask"],
            return_dict=False,
        )[0]

    def attention_layers(self) -> list[LayerInfo]:
        """The image-only refiner blocks ("self"), then the joint blocks; the text-only refiner blocks
        have no image token and are left out."""
        names = [k.removesuffix(".processor") for k in attention_processors(self.denoiser)]
        image = [n for n in names if n.startswith("noise_refiner.")]
        joint = [n for n in names if n.startswith("layers.")]
        return [
            LayerInfo(n, "self" if n in image else "joint", i, self.grid, "stack")
            for i, n in enumerate(image + joint)
        ]
