"""Chroma (`ChromaTransformer2DModel`): FLUX.1's layout (sequence [text; image], 2x2-packed latents,
3-axis RoPE, double- then single-stream blocks with `FluxAttention`) conditioned on T5 text only: no
CLIP pooled text and no guidance embedding (the timestep goes through Chroma's approximator).

Text: T5 tokens padded to `max_sequence_length`; the pipeline encodes them with the tokenizer's mask
and passes the transformer an attention mask over [text; image] that keeps the prompt's tokens and its
first padding token and drops the other padding tokens. The mask is built by the pipeline's own
`_prepare_attention_mask` and passed as the pipeline passes it (in diffusers 0.42.1 a float 0/1 mask,
which SDPA adds to the scores: the kept tokens get +1, the dropped ones 0, so padding keys are damped,
not removed; the capture adds it the same way). Schedule: FLUX.1's (the transformer takes sigma, the
dynamic shift of `calculate_shift` from the number of image tokens).
"""

from __future__ import annotations

from elbo_t2ialign.core.adapters.base import Cond, TextBlock
from elbo_t2ialign.core.adapters.chat import require_diffusers
from elbo_t2ialign.core.adapters.transformers import FluxAdapter

CHROMA_SINCE = "0.34.0"  # first diffusers release with ChromaPipeline


class ChromaAdapter(FluxAdapter):
    family = "chroma"

    def __init__(self, pipe, device, dtype, resolution=None, max_sequence_length=None):
        require_diffusers("Chroma", CHROMA_SINCE)
        super().__init__(pipe, device, dtype, resolution, max_sequence_length)

    generation_kind = "chroma"
    default_guidance = 5.0  # the pipeline's, same convention as the sampler's (u + s (c - u))

    def text_blocks(self) -> list[TextBlock]:
        """One T5 block of max_sequence_length positions."""
        tokenizer = self.pipe.tokenizer
        return [TextBlock("T5", tokenizer, 0, self.max_sequence_length, True, (self.pipe.text_encoder,))]

    @property
    def attention_tokenizer(self):
        return self.pipe.tokenizer  # T5, the only text encoder

    def _encode_prompt(self, prompt: str) -> Cond:
        embeds, _, mask, *_ = self.pipe.encode_prompt(
            prompt,
            device=self.text_device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return {"encoder_hidden_states": embeds.to(self.dtype), "text_mask": mask}

    def _forward(self, x, timestep, cond):
        b, c, h, w = x.shape
        tokens = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * 4)
        txt_ids, img_ids = self._position_ids(h, w, cond["encoder_hidden_states"].shape[1], x)
        mask = self.pipe._prepare_attention_mask(
            batch_size=b, sequence_length=tokens.shape[1], dtype=x.dtype, attention_mask=cond["text_mask"]
        )
        out = self.net(
            hidden_states=tokens,
            timestep=timestep,
            encoder_hidden_states=cond["encoder_hidden_states"],
            txt_ids=txt_ids,
            img_ids=img_ids,
            attention_mask=mask,
            return_dict=False,
        )[0]
        return out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)
