"""FLUX.2 (`Flux2Transformer2DModel`): FLUX.2 [dev] (`Flux2Pipeline`, Mistral-3 text encoder) and
FLUX.2 [klein] (`Flux2KleinPipeline`, Qwen3 text encoder).

Text: the prompt is wrapped in the pipeline's chat template (FLUX.2 [dev]: a system message and the
user turn; [klein]: the user turn, the generation prompt and an empty thinking block), padded to
`max_sequence_length`, and the hidden states of several text-encoder layers are stacked along the
feature axis; the transformer attends to all `max_sequence_length` positions (no mask, padding
included). Image: the VAE latents are patchified 2x2 into 4C channels and normalised by the VAE's
batch-norm statistics; one token per patchified cell. Sequence [text; image], 4-axis RoPE
(text ids (0, 0, 0, l), image ids (0, row, col, 0)), double-stream blocks (`Flux2Attention`) then
single-stream blocks (`Flux2ParallelSelfAttention`, attention fused with the MLP).
Schedule: rectified flow, the transformer takes sigma; dynamic shift with the pipeline's
`compute_empirical_mu(image tokens, steps)` at its default number of steps (docs/method.md §2).
"""

from __future__ import annotations

import inspect

import torch

from elbo_t2ialign.core.adapters.base import Cond
from elbo_t2ialign.core.adapters.chat import ChatTextAdapter, chat_text, require_diffusers
from elbo_t2ialign.core.adapters.schedules import FlowSchedule, NoiseSchedule
from elbo_t2ialign.core.adapters.transformers import _TransformerAdapter
from elbo_t2ialign.core.capture import LayerInfo, _CaptureBase

FLUX2_SINCE = "0.36.0"  # first diffusers release with Flux2Pipeline
FLUX2_KLEIN_SINCE = "0.37.0"  # first with Flux2KleinPipeline


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:  # (B, S, H*D) -> (B, S, H, D)
    return x.unflatten(-1, (-1, head_dim))


class CaptureFlux2AttnProcessor(_CaptureBase):
    """FLUX.2 double-stream attention, sequence [text; image]: `Flux2AttnProcessor` of
    diffusers/models/transformers/transformer_flux2.py (0.42.1) with an explicit softmax."""

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None
    ):
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux2 import _get_qkv_projections

        query, key, value, c_query, c_key, c_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )
        query, key, value = (_heads(x, attn.head_dim) for x in (query, key, value))
        query, key = attn.norm_q(query), attn.norm_k(key)
        n_txt = 0
        if attn.added_kv_proj_dim is not None:
            n_txt = encoder_hidden_states.shape[1]
            c_query, c_key, c_value = (_heads(x, attn.head_dim) for x in (c_query, c_key, c_value))
            c_query, c_key = attn.norm_added_q(c_query), attn.norm_added_k(c_key)
            query, key, value = (
                torch.cat(p, dim=1) for p in ((c_query, query), (c_key, key), (c_value, value))
            )
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        query, key, value = (x.transpose(1, 2) for x in (query, key, value))  # (B, H, S, D)
        out = self.attend_text_first(query, key, value, n_txt, mask=attention_mask)
        context, hidden_states = out[:, :n_txt], out[:, n_txt:]
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if encoder_hidden_states is None:
            return hidden_states
        return hidden_states, attn.to_add_out(context)


class CaptureFlux2ParallelAttnProcessor(_CaptureBase):
    """FLUX.2 single-stream block, sequence [text; image] already joined, attention and MLP share the
    input and output projections: `Flux2ParallelSelfAttnProcessor` of transformer_flux2.py (0.42.1)
    with an explicit softmax. The text length is the recorder's (the adapter's `text_length`)."""

    def __call__(self, attn, hidden_states, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb

        hidden_states = attn.to_qkv_mlp_proj(hidden_states)
        qkv_dim = 3 * attn.inner_dim
        mlp_dim = attn.mlp_hidden_dim * attn.mlp_mult_factor
        local_qkv = hidden_states.shape[-1] * qkv_dim // (qkv_dim + mlp_dim)
        qkv, mlp = torch.split(hidden_states, [local_qkv, hidden_states.shape[-1] - local_qkv], dim=-1)
        query, key, value = (_heads(x, attn.head_dim) for x in qkv.chunk(3, dim=-1))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        query, key, value = (x.transpose(1, 2) for x in (query, key, value))
        n_txt = self.recorder.text_length
        out = self.attend_text_first(query, key, value, n_txt, mask=attention_mask)
        return attn.to_out(torch.cat([out, attn.mlp_act_fn(mlp)], dim=-1))


def capture_flux2(recorder, layer: LayerInfo):
    """The capture processor of a FLUX.2 attention layer: single-stream blocks have their own."""
    single = layer.name.startswith("single_transformer_blocks")
    return (CaptureFlux2ParallelAttnProcessor if single else CaptureFlux2AttnProcessor)(recorder, layer)


class Flux2Adapter(ChatTextAdapter, _TransformerAdapter):
    family = "flux2"
    capture_processor = staticmethod(capture_flux2)
    max_sequence_length = 512  # the pipelines' default

    def __init__(self, pipe, device, dtype, resolution=None, max_sequence_length=None):
        self.klein = type(pipe).__name__.startswith("Flux2Klein")
        require_diffusers(
            "FLUX.2 [klein]" if self.klein else "FLUX.2", FLUX2_KLEIN_SINCE if self.klein else FLUX2_SINCE
        )
        super().__init__(pipe, device, dtype, resolution, max_sequence_length)

    @property
    def patch_size(self) -> int:
        return 2  # the pipeline patchifies latents 2x2 into channels; the transformer's own patch is 1

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (4 * int(self.vae.config.latent_channels), self.latent_size // 2, self.latent_size // 2)

    def default_resolution(self) -> int:
        return int(getattr(self.pipe, "default_sample_size", 128)) * self.vae_scale_factor

    def _pipeline_default(self, name: str):
        return inspect.signature(type(self.pipe).__call__).parameters[name].default

    def build_schedule(self) -> NoiseSchedule:
        from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

        steps = int(self._pipeline_default("num_inference_steps"))
        mu = compute_empirical_mu(image_seq_len=self.grid**2, num_steps=steps)
        return FlowSchedule.from_scheduler_config(
            self.pipe.scheduler.config, image_seq_len=self.grid**2, timestep_scale=1.0 / 1000, mu=mu
        )

    def _template_ids(self, text: str) -> list[int]:
        """[klein] the Qwen3 chat template without thinking; [dev] `format_input`'s system message and
        user turn through the Pixtral processor's chat template (both unpadded here)."""
        if self.klein:
            return list(
                self.pipe.tokenizer(chat_text(self.pipe.tokenizer, text, enable_thinking=False)).input_ids
            )
        from diffusers.pipelines.flux2.pipeline_flux2 import format_input

        messages = format_input(prompts=[text], system_message=self.pipe.system_message)
        out = self.pipe.tokenizer.apply_chat_template(
            messages, add_generation_prompt=False, tokenize=True, return_dict=True
        )
        ids = out["input_ids"]
        return list(ids[0] if ids and isinstance(ids[0], list) else ids)

    @property
    def attention_tokenizer(self):
        tokenizer = self.pipe.tokenizer
        return getattr(tokenizer, "tokenizer", tokenizer)  # [dev]: the Pixtral processor's tokenizer

    @torch.no_grad()
    def encode_image(self, image) -> torch.Tensor:
        """The pipeline's `_encode_vae_image`: latent mode, 2x2 patchified, batch-norm normalised."""
        x = self.preprocess_image(image).to(self.device, self.vae.dtype)
        z = self.pipe._patchify_latents(self.vae.encode(x).latent_dist.mode().float())
        bn = self.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).float()
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1).float() + self.vae.config.batch_norm_eps)
        return (z - mean) / std

    @property
    def default_guidance(self) -> float:
        """The pipeline's classifier-free guidance scale ([klein] base, same convention as the sampler's);
        1 (none) for guidance-distilled checkpoints: [dev] embeds its guidance, distilled [klein] has none."""
        distilled = bool(getattr(self.pipe.config, "is_distilled", False))
        if self.pipe.transformer.config.get("guidance_embeds") or distilled or not self.klein:
            return 1.0
        return float(self._pipeline_default("guidance_scale"))

    @torch.no_grad()
    def vae_decode(self, z: torch.Tensor) -> torch.Tensor:
        """Undo the batch-norm normalisation and the 2x2 patchify, then decode (the pipeline's steps)."""
        bn = self.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).float()
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1).float() + self.vae.config.batch_norm_eps)
        z = self.pipe._unpatchify_latents(z.float() * std + mean)
        return self.vae.decode(z.to(self.vae.device, self.vae.dtype), return_dict=False)[0]

    def _encode_prompt(self, prompt: str) -> Cond:
        embeds, text_ids = self.pipe.encode_prompt(
            prompt,
            device=self.text_device,
            num_images_per_prompt=1,
            max_sequence_length=self.max_sequence_length,
        )
        return {"encoder_hidden_states": embeds.to(self.dtype), "txt_ids": text_ids.to(self.device)}

    def _forward(self, x, timestep, cond):
        b, c, h, w = x.shape
        tokens = x.reshape(b, c, h * w).permute(0, 2, 1)  # the pipeline's _pack_latents
        guidance = None
        if self.pipe.transformer.config.get("guidance_embeds"):  # [dev] is guidance-distilled
            scale = float(self._pipeline_default("guidance_scale") or 4.0)
            guidance = torch.full((b,), scale, device=x.device, dtype=torch.float32)
        out = self.net(
            hidden_states=tokens,
            timestep=timestep,
            guidance=guidance,
            encoder_hidden_states=cond["encoder_hidden_states"],
            txt_ids=cond["txt_ids"],
            img_ids=self._image_ids(h, w, x),
            return_dict=False,
        )[0]
        return out[:, : h * w].permute(0, 2, 1).reshape(b, c, h, w)

    def _image_ids(self, h: int, w: int, like: torch.Tensor) -> torch.Tensor:
        """(h*w, 4) ids (0, row, col, 0), the pipeline's `_prepare_latent_ids`, made once per shape."""
        cache = self.__dict__.setdefault("_ids", {})
        key = (h, w, like.device)
        if key not in cache:
            ids = torch.cartesian_prod(torch.arange(1), torch.arange(h), torch.arange(w), torch.arange(1))
            cache[key] = ids.to(like.device)
        return cache[key]

    def attention_layers(self) -> list[LayerInfo]:
        return self._layers(lambda name, module: "joint")
