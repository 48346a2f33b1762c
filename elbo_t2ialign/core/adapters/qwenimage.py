"""Qwen-Image (`QwenImageTransformer2DModel`, `QwenImagePipeline`).

Text: the prompt is wrapped in the pipeline's instruction template (a system message asking to
describe the image, then the user turn and the assistant prompt); Qwen2.5-VL encodes it and the
pipeline keeps the last hidden state from position `prompt_template_encode_start_idx` (34) on, i.e. it
drops the system message and the user turn's opening and keeps the prompt's tokens plus the template's
closing tokens. Positions here are those kept tokens. The pipeline pads a batch of prompts to its
longest with a key mask; this adapter pads every prompt to `max_sequence_length` with that mask, which
leaves every output unchanged (masked keys get zero weight, text RoPE is per position), so that
prompts of any length batch together.
Image: the video VAE's single frame, latents normalised by the VAE's per-channel mean and std, packed
2x2 into tokens. Sequence [text; image] in one joint softmax per block (`QwenDoubleStreamAttnProcessor2_0`),
RoPE on text and image streams separately (complex form). Schedule: rectified flow, the transformer
takes sigma; dynamic shift with `calculate_shift` from the number of image tokens and the scheduler's
settings (exponential time shift); the scheduler's `shift_terminal` only stretches the sampling grid and
is not part of the training noise levels.
"""

from __future__ import annotations

import torch

from elbo_t2ialign.core.adapters.base import Cond
from elbo_t2ialign.core.adapters.chat import ChatTextAdapter, require_diffusers
from elbo_t2ialign.core.adapters.schedules import FlowSchedule, NoiseSchedule
from elbo_t2ialign.core.adapters.transformers import _TransformerAdapter
from elbo_t2ialign.core.capture import LayerInfo, _CaptureBase

# QwenImagePipeline is in diffusers 0.35.0, but before 0.37.0 its transformer ignores the text mask, so
# the padding this adapter adds to batch prompts would be attended to: 0.37.0 is the first it supports
QWENIMAGE_SINCE = "0.37.0"


class CaptureQwenImageAttnProcessor(_CaptureBase):
    """Qwen-Image joint attention, sequence [text; image]: `QwenDoubleStreamAttnProcessor2_0` of
    diffusers/models/transformers/transformer_qwenimage.py (0.42.1) with an explicit softmax."""

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        encoder_hidden_states_mask=None,
        attention_mask=None,
        image_rotary_emb=None,
    ):
        from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

        if encoder_hidden_states is None:
            raise ValueError("Qwen-Image attention needs the text stream (encoder_hidden_states)")
        # the joint key mask [text mask; image ones]: built here from the text mask (diffusers 0.42.1),
        # or built once by the transformer and passed in (0.37 to 0.41)
        mask = attention_mask
        if mask is None and encoder_hidden_states_mask is not None:
            image_mask = torch.ones(hidden_states.shape[:2], dtype=torch.bool, device=hidden_states.device)
            mask = torch.cat([encoder_hidden_states_mask, image_mask], dim=1)
        if mask is not None and mask.ndim == 2:
            mask = mask[:, None, None, :]
        n_txt = encoder_hidden_states.shape[1]
        head_dim = attn.inner_dim // attn.heads

        img = [f(hidden_states).unflatten(-1, (-1, head_dim)) for f in (attn.to_q, attn.to_k, attn.to_v)]
        txt = [
            f(encoder_hidden_states).unflatten(-1, (-1, head_dim))
            for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
        ]
        for stream, norms in (
            (img, (attn.norm_q, attn.norm_k)),
            (txt, (attn.norm_added_q, attn.norm_added_k)),
        ):
            for i, norm in enumerate(norms):
                if norm is not None:
                    stream[i] = norm(stream[i])
        if image_rotary_emb is not None:
            img_freqs, txt_freqs = image_rotary_emb
            for stream, freqs in ((img, img_freqs), (txt, txt_freqs)):
                stream[0], stream[1] = (apply_rotary_emb_qwen(x, freqs, use_real=False) for x in stream[:2])
        query, key, value = (torch.cat([t, i], dim=1).transpose(1, 2) for t, i in zip(txt, img, strict=True))
        out = self.attend_text_first(query, key, value, n_txt, scale=head_dim**-0.5, mask=mask)
        txt_out, img_out = out[:, :n_txt], out[:, n_txt:]
        img_out = attn.to_out[0](img_out.contiguous())
        if len(attn.to_out) > 1:
            img_out = attn.to_out[1](img_out)
        return img_out, attn.to_add_out(txt_out.contiguous())


class QwenImageAdapter(ChatTextAdapter, _TransformerAdapter):
    family = "qwenimage"
    capture_processor = CaptureQwenImageAttnProcessor
    max_sequence_length = 512  # prompt positions kept (the pipeline allows up to 1024)

    def __init__(self, pipe, device, dtype, resolution=None, max_sequence_length=None):
        require_diffusers("Qwen-Image", QWENIMAGE_SINCE)
        super().__init__(pipe, device, dtype, resolution, max_sequence_length)

    def vae_scale(self) -> int:
        return 2 ** len(self.vae.temperal_downsample)  # the pipeline's vae_scale_factor

    @property
    def patch_size(self) -> int:
        return 2  # latents are packed 2x2 into tokens

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (int(self.vae.config.z_dim), self.latent_size, self.latent_size)

    def default_resolution(self) -> int:
        return int(getattr(self.pipe, "default_sample_size", 128)) * self.vae_scale_factor

    def build_schedule(self) -> NoiseSchedule:
        return FlowSchedule.from_scheduler_config(
            self.pipe.scheduler.config, image_seq_len=self.grid**2, timestep_scale=1.0 / 1000
        )

    def _template_ids(self, text: str) -> list[int]:
        """The template's ids from `prompt_template_encode_start_idx` on, as the pipeline keeps them."""
        pipe = self.pipe
        ids = pipe.tokenizer(pipe.prompt_template_encode.format(text)).input_ids
        return list(ids[pipe.prompt_template_encode_start_idx :])

    @torch.no_grad()
    def encode_image(self, image) -> torch.Tensor:
        """One video frame through the VAE: the latent mode, normalised as the img2img pipeline does."""
        x = self.preprocess_image(image).to(self.device, self.vae.dtype)[:, :, None]  # (1, 3, 1, R, R)
        z = self.vae.encode(x).latent_dist.mode().float()[:, :, 0]
        cfg = self.vae.config
        mean = torch.tensor(cfg.latents_mean, device=z.device).view(1, -1, 1, 1)
        std = torch.tensor(cfg.latents_std, device=z.device).view(1, -1, 1, 1)
        return (z - mean) / std

    # classifier-free guidance against the empty prompt at the pipeline's true_cfg_scale (the pipeline
    # also rescales the guided prediction to the conditional one's norm; the sampler does not)
    default_guidance = 4.0

    def encoder_offset(self, block) -> int:
        return int(self.pipe.prompt_template_encode_start_idx)  # the dropped template prefix

    @torch.no_grad()
    def vae_decode(self, z: torch.Tensor) -> torch.Tensor:
        cfg = self.vae.config
        mean = torch.tensor(cfg.latents_mean, device=z.device).view(1, -1, 1, 1)
        std = torch.tensor(cfg.latents_std, device=z.device).view(1, -1, 1, 1)
        z = (z.float() * std + mean)[:, :, None].to(self.vae.device, self.vae.dtype)
        return self.vae.decode(z, return_dict=False)[0][:, :, 0]

    def _encode_prompt(self, prompt: str) -> Cond:
        embeds, mask = self.pipe.encode_prompt(
            prompt,
            device=self.text_device,
            num_images_per_prompt=1,
            max_sequence_length=self.max_sequence_length,
        )
        n = embeds.shape[1]
        padded = embeds.new_zeros((1, self.max_sequence_length, embeds.shape[2]))
        padded[:, :n] = embeds
        keep = torch.zeros((1, self.max_sequence_length), dtype=torch.long, device=embeds.device)
        keep[:, :n] = 1 if mask is None else mask
        return {"encoder_hidden_states": padded.to(self.dtype), "encoder_hidden_states_mask": keep}

    def _forward(self, x, timestep, cond):
        b, c, h, w = x.shape
        tokens = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * 4)
        guidance = None
        if self.pipe.transformer.config.get("guidance_embeds"):
            guidance = torch.ones((b,), device=x.device, dtype=torch.float32)
        out = self.net(
            hidden_states=tokens,
            timestep=timestep,
            guidance=guidance,
            encoder_hidden_states=cond["encoder_hidden_states"],
            encoder_hidden_states_mask=cond["encoder_hidden_states_mask"],
            img_shapes=[[(1, h // 2, w // 2)]] * b,
            return_dict=False,
        )[0]
        return out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)

    def attention_layers(self) -> list[LayerInfo]:
        return self._layers(lambda name, module: "joint")
