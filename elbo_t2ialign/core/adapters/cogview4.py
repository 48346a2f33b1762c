"""CogView4 (`CogView4Pipeline`, `CogView4Transformer2DModel`): joint attention over [GLM-4 text; image]
with 2-D RoPE on the image tokens only, SDXL-like size conditions, flow matching.

The text: GLM's tokenizer adds its own prefix ([gMASK] <sop>); the pipeline pads the batch on the LEFT
with the pad token up to a multiple of 16 and passes no mask (text encoder and denoiser both attend
to the padding). The adapter encodes each prompt on its own and joins prompts into batches, so every
prompt gets one width, max_sequence_length rounded up to 16, and it pads on the RIGHT, so that a
word's column does not move with the prompt's length (the class search counts from the start). The
denoiser gives its text tokens no position (RoPE is on the image tokens only), so the side of the
padding does not change how it treats the columns; GLM is causal, so the prompt's own embeddings are
those of the unpadded prompt, i.e. the pipeline's for a prompt whose length is a multiple of 16 (the
test checks this); only the padding's embeddings, which follow the prompt here, differ.

The schedule: the pipeline shifts the sigmas by mu = sqrt(image tokens / base_image_seq_len) *
max_shift + base_shift (its own `calculate_shift`, the scheduler's linear time shift) but conditions
the network on the UNshifted timestep, (t + 1) for training index t; the output is the velocity
eps - z0.
"""

from __future__ import annotations

import torch

from elbo_t2ialign.core.adapters.base import Cond
from elbo_t2ialign.core.adapters.chat import require_diffusers
from elbo_t2ialign.core.adapters.lm_text import LMTextAdapter, shifted_sigmas
from elbo_t2ialign.core.adapters.schedules import FlowSchedule, NoiseSchedule
from elbo_t2ialign.core.capture import LayerInfo, _CaptureBase

SINCE = "0.33.0"  # first diffusers release with CogView4Pipeline


class CaptureCogView4AttnProcessor(_CaptureBase):
    """`CogView4AttnProcessor` of diffusers/models/transformers/transformer_cogview4.py (0.42.1; 0.33.1
    differs only in the mask it builds from a text mask, which the pipeline never passes) with an
    explicit softmax."""

    def __call__(
        self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None
    ):
        from diffusers.models.embeddings import apply_rotary_emb

        dtype = encoder_hidden_states.dtype
        batch, n_txt, _ = encoder_hidden_states.shape
        n_img = hidden_states.shape[1]
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        query, key, value = (
            f(hidden_states).unflatten(2, (attn.heads, -1)).transpose(1, 2)
            for f in (attn.to_q, attn.to_k, attn.to_v)
        )
        if attn.norm_q is not None:
            query = attn.norm_q(query).to(dtype=dtype)
        if attn.norm_k is not None:
            key = attn.norm_k(key).to(dtype=dtype)
        if image_rotary_emb is not None:
            query[:, :, n_txt:, :] = apply_rotary_emb(
                query[:, :, n_txt:, :], image_rotary_emb, use_real_unbind_dim=-2
            )
            key[:, :, n_txt:, :] = apply_rotary_emb(
                key[:, :, n_txt:, :], image_rotary_emb, use_real_unbind_dim=-2
            )
        mask = None
        if attention_mask is not None:  # as 0.42.1 builds it: 0/1 values, used as an additive float mask
            mix = torch.ones((batch, n_txt + n_img), device=query.device)
            mix[:, :n_txt] = attention_mask.float().to(query.device)
            mix = mix.unsqueeze(2)
            mask = ((mix @ mix.transpose(1, 2)) > 0).unsqueeze(1).to(query.dtype)
        out = self.attend_text_first(query, key, value, n_txt, mask=mask)
        out = attn.to_out[1](attn.to_out[0](out))
        context, hidden_states = out.split([n_txt, out.size(1) - n_txt], dim=1)
        return hidden_states, context


class CogView4Schedule(FlowSchedule):
    """Shifted sigmas for the noise, the unshifted timestep t + 1 for the network (module docstring)."""

    def model_timestep(self, t):
        return t.float() + 1


class CogView4Adapter(LMTextAdapter):
    """CogView4: GLM-4 text, left-padded to a fixed width; joint attention with image RoPE."""

    family = "cogview4"
    capture_processor = CaptureCogView4AttnProcessor
    max_sequence_length = 128  # prompt tokens, GLM's prefix included; rounded up to a multiple of 16
    text_follows_space = False  # no template: the prompt's first word has no space before it
    default_guidance = 5.0  # the pipeline's guidance_scale

    def __init__(self, pipe, *args, **kwargs):
        require_diffusers("CogView4", SINCE)
        super().__init__(pipe, *args, **kwargs)

    def build_schedule(self) -> NoiseSchedule:
        from diffusers.pipelines.cogview4.pipeline_cogview4 import calculate_shift

        config = self.pipe.scheduler.config
        mu = calculate_shift(
            self.grid**2,
            config.get("base_image_seq_len", 256),
            config.get("base_shift", 0.25),
            config.get("max_shift", 0.75),
        )
        n = int(config.get("num_train_timesteps", 1000))
        return CogView4Schedule(shifted_sigmas(config, mu), n, 1.0)

    @property
    def text_length(self) -> int:
        return -(-self.max_sequence_length // 16) * 16

    def max_prompt_tokens(self) -> int:
        return self.text_length - len(self.pipe.tokenizer("").input_ids)

    def fed_ids(self, text: str) -> list[int]:
        tok = self.pipe.tokenizer
        return list(
            tok(text, add_special_tokens=True, truncation=True, max_length=self.text_length).input_ids
        )

    def _encode_prompt(self, prompt: str) -> Cond:
        # `CogView4Pipeline._get_glm_embeds` (no mask, the second-to-last hidden state) with the padding
        # to text_length on the right (module docstring)
        ids = self.fed_ids(prompt)
        ids = torch.tensor([ids + [self.pipe.tokenizer.pad_token_id] * (self.text_length - len(ids))])
        ids = ids.to(self.device)
        hidden = self.pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        return {"encoder_hidden_states": hidden.to(self.dtype)}

    def _forward(self, x, timestep, cond):
        b = x.shape[0]
        size = torch.tensor([[self.resolution, self.resolution]], dtype=self.dtype, device=x.device).repeat(
            b, 1
        )
        return self.net(
            hidden_states=x,
            encoder_hidden_states=cond["encoder_hidden_states"],
            timestep=timestep,
            original_size=size,
            target_size=size,
            crop_coords=torch.zeros_like(size),
            return_dict=False,
        )[0]

    def attention_layers(self) -> list[LayerInfo]:
        return self._layers(lambda name, module: "joint")
