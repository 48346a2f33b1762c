"""AuraFlow (`AuraFlowPipeline`, `AuraFlowTransformer2DModel`): MMDiT joint blocks and single-stream
blocks over [text; image], the text being 8 learned register tokens the transformer prepends, then the
UMT5 tokens padded to max_sequence_length (padding zeroed by the pipeline, not masked); flow matching
with the scheduler's static shift, the network conditioned on sigma (t / 1000), velocity output.
The text is a T5 tokenizer's, so its words are found as in PixArt and FLUX; positions are shifted by
the 8 register columns (id -1 in `token_ids`, so no word is found in them)."""

from __future__ import annotations

from elbo_t2ialign.core.adapters.base import Cond
from elbo_t2ialign.core.adapters.schedules import FlowSchedule, NoiseSchedule
from elbo_t2ialign.core.adapters.transformers import _T5TextAdapter
from elbo_t2ialign.core.capture import LayerInfo, _CaptureBase

REGISTER = -1  # the id of the register columns in `token_ids`


class CaptureAuraFlowAttnProcessor(_CaptureBase):
    """`AuraFlowAttnProcessor2_0` of diffusers/models/attention_processor.py (0.42.1) with an explicit
    softmax; single-stream blocks get [text; image] already joined (text length from the recorder).
    0.33.1 normalises the text keys with `norm_added_q` instead of `norm_added_k`; AuraFlow's are both
    parameter-free FP32 layer norms (qk_norm "fp32_layer_norm"), so the two compute the same."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        import torch

        batch = hidden_states.shape[0]
        head_dim = attn.to_k.out_features // attn.heads

        def heads(x):  # (B, S, H*D) -> (B, S, H, D)
            return x.view(batch, -1, attn.heads, head_dim)

        query, key, value = (heads(f(hidden_states)) for f in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is not None:
            n_txt = encoder_hidden_states.shape[1]
            cq, ck, cv = (
                heads(f(encoder_hidden_states)) for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
            )
            if attn.norm_added_q is not None:
                cq = attn.norm_added_q(cq)
            if attn.norm_added_k is not None:
                ck = attn.norm_added_k(ck)
            query, key, value = (torch.cat(p, dim=1) for p in ((cq, query), (ck, key), (cv, value)))
        else:
            n_txt = self.recorder.text_length
        query, key, value = (x.transpose(1, 2) for x in (query, key, value))
        out = self.attend_text_first(query, key, value, n_txt, scale=attn.scale)
        if encoder_hidden_states is not None:
            out, context = out[:, n_txt:], out[:, :n_txt]
        out = attn.to_out[1](attn.to_out[0](out))
        if encoder_hidden_states is None:
            return out
        return out, attn.to_add_out(context)


class AuraFlowAdapter(_T5TextAdapter):
    """AuraFlow: [8 registers + UMT5 text; image], joint then single-stream blocks."""

    family = "auraflow"
    capture_processor = CaptureAuraFlowAttnProcessor
    max_sequence_length = 256  # the pipeline's default

    @property
    def attention_tokenizer(self):
        return self.pipe.tokenizer

    @property
    def registers(self) -> int:
        return int(self.pipe.transformer.register_tokens.shape[1])

    @property
    def text_length(self) -> int:
        return self.registers + self.max_sequence_length

    def max_prompt_tokens(self) -> int:
        return self.text_length  # token_ids counts the register columns too

    def token_ids(self, text: str, special: bool = True) -> list[int]:
        ids = super().token_ids(text, special)
        return [REGISTER] * self.registers + ids if special else ids

    def build_schedule(self) -> NoiseSchedule:
        return FlowSchedule.from_scheduler_config(
            self.pipe.scheduler.config, image_seq_len=self.grid**2, timestep_scale=1.0 / 1000
        )

    def _encode_prompt(self, prompt: str) -> Cond:
        embeds, _, _, _ = self.pipe.encode_prompt(
            prompt,
            do_classifier_free_guidance=False,
            device=self.text_device,
            num_images_per_prompt=1,
            max_sequence_length=self.max_sequence_length,
        )
        return {"encoder_hidden_states": embeds.to(self.dtype)}

    def _forward(self, x, timestep, cond):
        return self.net(
            x, encoder_hidden_states=cond["encoder_hidden_states"], timestep=timestep, return_dict=False
        )[0]

    def attention_layers(self) -> list[LayerInfo]:
        return self._layers(lambda name, module: "joint")
