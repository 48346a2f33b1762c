"""Sana (`SanaPipeline`, `SanaTransformer2DModel`): a DiT whose blocks have a linear (ReLU-kernel)
self-attention over the image tokens (`attn1`) and a softmax cross-attention to Gemma-2 text tokens
(`attn2`); a 32x deep-compression autoencoder (`AutoencoderDC`); flow matching, sampled by the
pipeline with DPM-Solver in its flow mode (`use_flow_sigmas`, static `flow_shift`).

The text: the pipeline prepends its "complex human instruction" to the prompt, tokenizes the whole
with Gemma's BOS, pads it to (instruction tokens + max_sequence_length - 2) and keeps only the BOS and
the last max_sequence_length - 1 positions (`SanaPipeline.encode_prompt`, "Section 3.1 of the paper"):
the denoiser sees BOS, the instruction's last token, the prompt, then masked padding.

The self-attention: linear attention is a row-stochastic attention matrix too,
A[i, j] = relu(q_i) . relu(k_j) / sum_j' relu(q_i) . relu(k_j'), and its output is A @ V; the
capture materialises that matrix (the model's own kernel, not a softmax) for the refinement.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from elbo_t2ialign.core.adapters.base import Cond
from elbo_t2ialign.core.adapters.chat import require_diffusers
from elbo_t2ialign.core.adapters.lm_text import LMTextAdapter
from elbo_t2ialign.core.adapters.schedules import FlowSchedule, NoiseSchedule
from elbo_t2ialign.core.capture import LayerInfo, _CaptureBase

SINCE = "0.32.0"  # first diffusers release with SanaPipeline


class CaptureSanaCrossProcessor(_CaptureBase):
    """Sana's cross-attention: `SanaAttnProcessor2_0` of diffusers/models/transformers/sana_transformer.py
    (0.33.1, 0.42.1) with an explicit softmax; the key-padding mask is the model's additive bias."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch, sequence_length = context.shape[:2]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (
            x.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for x in (query, key, value)
        )
        out = self.attend(
            query,
            key,
            value,
            scale=head_dim**-0.5,  # SDPA's default: the processor passes no scale
            image_rows=slice(None),
            blocks={"cross": slice(None)},
            mask=attention_mask,
        )
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        return out / attn.rescale_output_factor


def linear_attention_probs(
    query: torch.Tensor,
    key: torch.Tensor,
    chunk_mb: float = 256.0,
    groups: torch.Tensor | None = None,
    n_groups: int = 1,
) -> torch.Tensor:
    """The attention matrix of ReLU linear attention, averaged over heads and summed over the batch.

    query, key (B, H, D, N) after the ReLU kernel, float32, in `SanaLinearAttnProcessor2_0`'s layout.
    Row i is relu(q_i) . relu(k_j) over j, divided by its sum plus the processor's 1e-15: (N, N);
    with `groups` ((B,) long, as `attend_and_capture` takes them) summed per group: (G, N, N)."""
    b, h, _, n = query.shape
    key_sum = key.sum(dim=-1)  # (B, H, D)
    probs = query.new_zeros((n, n) if groups is None else (n_groups, n, n))
    step = max(1, int(chunk_mb * 2**20 // (4 * b * h * n)))
    for lo in range(0, n, step):
        q = query[..., lo : lo + step]  # (B, H, D, r)
        scores = torch.einsum("bhdr,bhdn->bhrn", q, key)
        norm = torch.einsum("bhdr,bhd->bhr", q, key_sum).unsqueeze(-1) + 1e-15
        head_mean = (scores / norm).mean(dim=1)  # (B, r, N)
        if groups is None:
            probs[lo : lo + step] = head_mean.sum(dim=0)
        else:
            probs[:, lo : lo + step].index_add_(0, groups, head_mean)
    return probs


class CaptureSanaLinearProcessor(_CaptureBase):
    """Sana's linear self-attention: `SanaLinearAttnProcessor2_0` of diffusers/models/attention_processor.py
    (0.33.1, 0.42.1), its output computed as it computes it; its attention matrix is recorded besides."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        original_dtype = hidden_states.dtype
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        # (B, N, H*D) -> query, value (B, H, D, N); key (B, H, N, D)
        query = query.transpose(1, 2).unflatten(1, (attn.heads, -1))
        key = key.transpose(1, 2).unflatten(1, (attn.heads, -1)).transpose(2, 3)
        value = value.transpose(1, 2).unflatten(1, (attn.heads, -1))
        query, key, value = F.relu(query).float(), F.relu(key).float(), value.float()

        probs = linear_attention_probs(
            query, key.transpose(2, 3), self.recorder.chunk_mb, **self.recorder.grouping()
        )
        self.recorder.add(self.layer, {"self": probs}, query.shape[0])

        value = F.pad(value, (0, 0, 0, 1), mode="constant", value=1.0)
        out = torch.matmul(torch.matmul(value, key), query)
        out = out[:, :, :-1] / (out[:, :, -1:] + 1e-15)
        out = out.flatten(1, 2).transpose(1, 2).to(original_dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if original_dtype == torch.float16:
            out = out.clip(-65504, 65504)
        return out


def capture_sana(recorder, layer: LayerInfo):
    """The capture processor of a Sana layer: linear self-attention or softmax cross-attention."""
    return (CaptureSanaLinearProcessor if layer.kind == "self" else CaptureSanaCrossProcessor)(
        recorder, layer
    )


class SanaFlowSchedule(FlowSchedule):
    """Flow matching as `SanaPipeline` samples it: DPM-Solver's flow sigmas with the static
    `flow_shift` (sigma = shift s / (1 + (shift - 1) s)), the network conditioned on sigma * T times
    the transformer's `timestep_scale`, sigma * T truncated to an integer as DPM-Solver stores its
    timesteps (int64); a flow-match Euler scheduler is read as the other flow families."""

    integer_timesteps = False

    def model_timestep(self, t):
        if not self.integer_timesteps:
            return super().model_timestep(t)
        return torch.floor(self.sigma(t) * self.num_train_timesteps) * self.timestep_scale

    @classmethod
    def for_pipeline(cls, pipe, image_seq_len: int) -> FlowSchedule:
        config = pipe.scheduler.config
        scale = float(pipe.transformer.config.get("timestep_scale", 1.0))
        if config.get("use_flow_sigmas", False):
            n = int(config.get("num_train_timesteps", 1000))
            shift = float(config.get("flow_shift", 1.0))
            s = torch.arange(1, n + 1, dtype=torch.float64) / n
            schedule = cls(shift * s / (1 + (shift - 1) * s), n, scale)
            schedule.integer_timesteps = True
            return schedule
        if "shift" in config or config.get("use_dynamic_shifting", False):
            return FlowSchedule.from_scheduler_config(
                config, image_seq_len=image_seq_len, timestep_scale=scale
            )
        raise ValueError(
            f"Sana's scheduler {type(pipe.scheduler).__name__} is not a flow-matching one (no use_flow_sigmas, "
            "no shift): load the checkpoint's own scheduler"
        )


class SanaAdapter(LMTextAdapter):
    """Sana: Gemma-2 text with the pipeline's instruction, linear self- and softmax cross-attention."""

    family = "sana"
    capture_processor = staticmethod(capture_sana)
    max_sequence_length = 300  # the pipeline's default

    def __init__(self, pipe, *args, **kwargs):
        require_diffusers("Sana", SINCE)
        if pipe.transformer.config.get("guidance_embeds"):
            raise ValueError(
                "guidance-distilled Sana (Sana-Sprint) is not supported; use a SanaPipeline checkpoint"
            )
        # the instruction SanaPipeline.__call__ prepends by default, read from its signature
        default = inspect.signature(type(pipe).__call__).parameters.get("complex_human_instruction")
        self.instruction = list(default.default) if default is not None and default.default else []
        super().__init__(pipe, *args, **kwargs)

    def vae_scale(self) -> int:
        return 2 ** (len(self.pipe.vae.config.encoder_block_out_channels) - 1)

    @torch.no_grad()
    def encode_image(self, image) -> torch.Tensor:
        x = self.preprocess_image(image).to(self.device, self.vae.dtype)
        return self.vae.encode(x).latent.float() * self.vae.config.scaling_factor

    def build_schedule(self) -> NoiseSchedule:
        return SanaFlowSchedule.for_pipeline(self.pipe, self.grid**2)

    @property
    def text_length(self) -> int:
        return self.max_sequence_length

    def max_prompt_tokens(self) -> int:
        return self.max_sequence_length - 2  # BOS and the instruction's last token come first

    def fed_ids(self, text: str) -> list[int]:
        tok = self.pipe.tokenizer
        n = self.max_sequence_length
        if self.instruction:
            chi = "\n".join(self.instruction)
            text = chi + text
            total = len(tok.encode(chi)) + n - 2
        else:
            total = n
        ids = list(tok(text, add_special_tokens=True, truncation=True, max_length=total).input_ids)
        padded = ids + [tok.pad_token_id] * (total - len(ids))
        kept = [0, *range(total - n + 1, total)]  # encode_prompt's select_index
        return [padded[i] for i in kept if i < len(ids)]

    def encoder_offset(self, block) -> int:
        """Gemma's input position of text column k (k >= 1) is k + this: the pipeline keeps BOS and the
        last max_sequence_length - 1 of (instruction tokens + max_sequence_length - 2) positions."""
        if not self.instruction:
            return 0
        return len(self.pipe.tokenizer.encode("\n".join(self.instruction))) - 2

    def _encode_prompt(self, prompt: str) -> Cond:
        embeds, mask, _, _ = self.pipe.encode_prompt(
            prompt,
            do_classifier_free_guidance=False,
            device=self.text_device,
            num_images_per_prompt=1,
            clean_caption=False,
            max_sequence_length=self.max_sequence_length,
            complex_human_instruction=self.instruction,
        )
        return {"encoder_hidden_states": embeds.to(self.dtype), "encoder_attention_mask": mask}

    def _forward(self, x, timestep, cond):
        out = self.net(
            x,
            encoder_hidden_states=cond["encoder_hidden_states"],
            encoder_attention_mask=cond["encoder_attention_mask"],
            timestep=timestep,
            return_dict=False,
        )[0]
        c = x.shape[1]
        return out[:, :c] if out.shape[1] == 2 * c else out  # learned sigma: the velocity half

    def attention_layers(self) -> list[LayerInfo]:
        return self._layers(lambda name, module: "self" if name.endswith("attn1") else "cross")

    def linear_attention_layers(self) -> list[str]:
        """The layers whose attention is the ReLU linear kernel, not a softmax."""
        return [layer.name for layer in self.attention_layers() if layer.kind == "self"]
