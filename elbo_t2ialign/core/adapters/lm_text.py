"""Families whose text encoder is a decoder language model (Gemma for Sana and Lumina-Image 2.0, GLM-4
for CogView4): the prompt reaches the denoiser inside an instruction template, padded or cut the way
the pipeline does it, so the attention's text columns are not the prompt's own tokens.

`LMTextAdapter.fed_ids(text)` is the one place per family that says which token id sits in each text
column of the denoiser's attention (`token_ids(text, True)`); `token_ids(text, False)` is a word or
phrase as it appears inside a prompt, i.e. after a space: byte-level BPE (GLM, Qwen) and SentencePiece
BPE without a dummy prefix (Gemma) give "cat" and " cat" different ids, and in every template these
families use the prompt's words follow a space. Without a template (CogView4) a word is looked up in
both spellings (`calibrate.locate_tokens`, `generation.weighting.token_positions`).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from elbo_t2ialign.core.adapters.base import TextBlock
from elbo_t2ialign.core.adapters.transformers import _TransformerAdapter


def shifted_sigmas(config, mu: float | None = None) -> torch.Tensor:
    """sigma for each training index t (ascending), (t + 1) / T shifted the way
    `FlowMatchEulerDiscreteScheduler.set_timesteps` shifts its sigmas: by `time_shift(mu)` when the
    config uses dynamic shifting (exponential or linear), else by the static `shift`."""
    import math

    n = int(config.get("num_train_timesteps", 1000))
    s = torch.arange(1, n + 1, dtype=torch.float64) / n
    if config.get("use_dynamic_shifting", False):
        if mu is None:
            raise ValueError("this scheduler shifts by resolution (use_dynamic_shifting) and needs mu")
        if config.get("time_shift_type", "exponential") == "linear":
            return (mu / (mu + (1 / s - 1))).float()
        return (math.exp(mu) / (math.exp(mu) + (1 / s - 1))).float()
    shift = float(config.get("shift", 1.0))
    return (shift * s / (1 + (shift - 1) * s)).float()


class _FedTokenizer:
    """Tokenizer-like view of an adapter for prompt weighting (`generation.weighting.token_positions`):
    a prompt gives the ids of the attention's text columns, a phrase its in-prompt ids."""

    def __init__(self, adapter: LMTextAdapter):
        self.adapter = adapter

    def __call__(self, text: str, add_special_tokens: bool = True, truncation: bool = False):
        return SimpleNamespace(input_ids=self.adapter.token_ids(text, add_special_tokens))


class LMTextAdapter(_TransformerAdapter):
    """Shared text handling of the language-model-encoded families."""

    generation_kind = "flow"
    default_guidance = 4.5  # Sana's pipeline default; the other families set theirs
    # the prompt follows a template that ends in a space (Sana, Lumina2): a word or phrase is tokenized
    # after a space, so that it is found after the template and never inside it; without a template
    # (CogView4) it is tokenized as given and located in either spelling (calibrate.locate_tokens)
    text_follows_space = True

    @property
    def attention_tokenizer(self):
        return self.pipe.tokenizer

    def fed_ids(self, text: str) -> list[int]:
        """The token ids of the denoiser's text columns for prompt `text`, in column order, up to the
        last one that is not padding appended after the prompt."""
        raise NotImplementedError

    def token_ids(self, text: str, special: bool = True) -> list[int]:
        if special:
            self.check_prompt_length(text)  # a cut prompt would lose words without a word about it
            return self.fed_ids(text)
        tokenizer = self.attention_tokenizer
        text = " " + text if self.text_follows_space else text
        return list(tokenizer(text, add_special_tokens=False, truncation=False).input_ids)

    def check_prompt_length(self, prompt: str) -> None:
        tokenizer = self.attention_tokenizer
        n = len(tokenizer(prompt, add_special_tokens=False, truncation=False).input_ids)
        limit = self.max_prompt_tokens()
        if n > limit:
            raise ValueError(
                f"prompt {prompt!r} has {n} tokens but the {self.family} pipeline keeps at most {limit}; "
                "it would be silently truncated. Use fewer or shorter class names, or a larger "
                "max_sequence_length."
            )

    def text_blocks(self) -> list[TextBlock]:
        """One block: the language model's tokens, located through `fed_ids` (template included)."""
        return [
            TextBlock(self.family, _FedTokenizer(self), 0, self.text_length, True, (self.pipe.text_encoder,))
        ]
