"""Z-Image (`ZImageTransformer2DModel`, `ZImagePipeline`): a single-stream DiT.

Text: the prompt rendered by the Qwen3 tokenizer's chat template (one user turn and the assistant
prompt, `enable_thinking=True` as the pipeline asks, which adds no thinking block), padded to
`max_sequence_length` for the encoder; the pipeline keeps the second-to-last hidden state of the valid
(unpadded) tokens only, so the caption is the whole templated prompt. The transformer pads the caption
to a multiple of 32 with a learned pad token (attended to, not masked) and the image tokens likewise.
Positions here are positions in the templated prompt, which are the caption's columns. This adapter
keeps each caption padded to `max_sequence_length` with its length and hands the transformer the valid
rows, as the pipeline does, so prompts of any length batch together.
Attention: `noise_refiner` blocks attend among image tokens only (captured as self-attention),
`context_refiner` blocks among caption tokens only (no image query: not captured), and the main
`layers` over the joint sequence [image (+ pad); caption (+ pad)] with 3-axis RoPE (complex form).
Schedule: rectified flow with the scheduler's shift (Z-Image's scheduler uses a fixed shift; a dynamic
one would be `calculate_shift` of the image tokens, as the pipeline passes it), but the transformer is
conditioned on 1 - sigma and predicts z0 - eps (the pipeline negates its output), so the ELBO target
eps - z0 is compared with minus the network's output.
"""

from __future__ import annotations

import inspect
import re

import torch

from elbo_t2ialign.core.adapters.base import Cond
from elbo_t2ialign.core.adapters.chat import ChatTextAdapter, chat_text, require_diffusers
from elbo_t2ialign.core.adapters.schedules import FlowSchedule, NoiseSchedule
from elbo_t2ialign.core.adapters.transformers import _TransformerAdapter
from elbo_t2ialign.core.capture import LayerInfo, _CaptureBase, attention_processors

ZIMAGE_SINCE = "0.36.0"  # first diffusers release with ZImagePipeline
SEQ_MULTIPLE = 32  # the transformer pads image and caption tokens to multiples of this (SEQ_MULTI_OF)


def _round_up(n: int) -> int:
    return n + (-n) % SEQ_MULTIPLE


class ZImageFlowSchedule(FlowSchedule):
    """Rectified flow whose network takes 1 - sigma and predicts z0 - eps."""

    def model_timestep(self, t):
        return 1.0 - self.sigma(t)

    def to_target(self, pred, z_t, t):
        return -pred


class CaptureZImageAttnProcessor(_CaptureBase):
    """Z-Image attention (image-only refiner blocks, joint [image; caption] main blocks):
    `ZSingleStreamAttnProcessor` of diffusers/models/transformers/transformer_z_image.py (0.42.1) with an
    explicit softmax. The image tokens are the first `resolution**2` rows; after them come the image
    pad tokens, then (main blocks) the caption and its pad tokens."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, freqs_cis=None):
        query, key, value = (
            f(hidden_states).unflatten(-1, (attn.heads, -1)) for f in (attn.to_q, attn.to_k, attn.to_v)
        )
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if freqs_cis is not None:
            query, key = _rotate(query, freqs_cis), _rotate(key, freqs_cis)
        if attention_mask is not None and attention_mask.ndim == 2:
            attention_mask = attention_mask[:, None, None, :]
        n_img = self.layer.resolution**2
        n_img_padded, total = _round_up(n_img), query.shape[1]
        blocks = {"self": slice(0, n_img)}
        if self.layer.has_cross:
            blocks["cross"] = slice(n_img_padded, total)
            pads = slice(n_img, n_img_padded)
        else:
            pads = slice(n_img, total)
        if pads.stop > pads.start:
            blocks["image_pad"] = pads
        query, key, value = (x.transpose(1, 2) for x in (query, key, value))
        out = self.attend(
            query,
            key,
            value,
            scale=query.shape[-1] ** -0.5,
            image_rows=slice(0, n_img),
            blocks=blocks,
            mask=attention_mask,
            cross_width=self.recorder.text_length,
        )
        out = out.transpose(1, 2).flatten(2, 3).to(query.dtype)
        out = attn.to_out[0](out)
        if len(attn.to_out) > 1:
            out = attn.to_out[1](out)
        return out


def _rotate(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Z-Image's RoPE: (B, S, H, D) as complex pairs times freqs (B, S, D/2), in float32."""
    with torch.autocast(x.device.type, enabled=False):
        z = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(z * freqs_cis.unsqueeze(2)).flatten(3).type_as(x)


class ZImageAdapter(ChatTextAdapter, _TransformerAdapter):
    family = "zimage"
    capture_processor = CaptureZImageAttnProcessor
    max_sequence_length = 512  # the pipeline's default

    def __init__(self, pipe, device, dtype, resolution=None, max_sequence_length=None):
        require_diffusers("Z-Image", ZIMAGE_SINCE)
        super().__init__(pipe, device, dtype, resolution, max_sequence_length)

    @property
    def patch_size(self) -> int:
        return int(self.pipe.transformer.config.all_patch_size[0])  # the pipeline's patch_size=2

    @property
    def text_length(self) -> int:
        """Caption columns of the captured maps: the longest caption, padded as the transformer pads it
        (a shorter prompt's columns past its own padded caption are zero)."""
        return _round_up(self.max_sequence_length)

    def default_resolution(self) -> int:
        return int(getattr(self.pipe, "default_sample_size", 128)) * self.vae_scale_factor

    def build_schedule(self) -> NoiseSchedule:
        return ZImageFlowSchedule.from_scheduler_config(
            self.pipe.scheduler.config, image_seq_len=self.grid**2, timestep_scale=1.0 / 1000
        )

    @property
    def default_guidance(self) -> float:
        """The pipeline's guidance 5 in the sampler's convention: the pipeline steps with
        c + s (c - u) = u + (1 + s)(c - u)."""
        return 1.0 + float(inspect.signature(type(self.pipe).__call__).parameters["guidance_scale"].default)

    def _template_ids(self, text: str) -> list[int]:
        tokenizer = self.pipe.tokenizer
        return list(tokenizer(chat_text(tokenizer, text, enable_thinking=True)).input_ids)

    def _encode_prompt(self, prompt: str) -> Cond:
        embeds, _ = self.pipe.encode_prompt(
            prompt,
            device=self.text_device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        caption = embeds[0]  # (L, D): the valid tokens
        padded = caption.new_zeros((1, self.max_sequence_length, caption.shape[1]))
        padded[0, : len(caption)] = caption
        length = torch.tensor([len(caption)], device=caption.device)
        return {"encoder_hidden_states": padded.to(self.dtype), "cap_len": length}

    def _forward(self, x, timestep, cond):
        captions = [
            feats[:n]
            for feats, n in zip(cond["encoder_hidden_states"], cond["cap_len"].tolist(), strict=True)
        ]
        out = self.net(list(x.unsqueeze(2).unbind(0)), timestep, captions, return_dict=False)[0]
        return torch.stack(out).squeeze(2)  # the model's own z0 - eps; to_target negates it

    def attention_layers(self) -> list[LayerInfo]:
        """noise_refiner (image self-attention), then the joint main layers; context_refiner blocks
        see no image token and are left out."""
        names = [k.removesuffix(".processor") for k in attention_processors(self.denoiser)]
        group = {"noise_refiner": 0, "layers": 1}
        kept = sorted(
            (n for n in names if n.split(".")[0] in group),
            key=lambda n: (group[n.split(".")[0]], *map(int, re.findall(r"\d+", n))),
        )
        return [
            LayerInfo(n, "self" if n.startswith("noise_refiner") else "joint", i, self.grid, "stack")
            for i, n in enumerate(kept)
        ]
