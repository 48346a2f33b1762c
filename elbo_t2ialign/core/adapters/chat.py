"""Shared parts of the families whose text encoder is a chat language model (FLUX.2, Qwen-Image,
Z-Image): the prompt is wrapped in a chat or instruction template before it is tokenized, and the
denoiser attends to the template's tokens as well, minus any prefix the pipeline drops. Token
positions (what `token_ids(prompt)` returns, what the class words are searched in) are therefore
positions in the wrapped sequence as the denoiser receives it, so a class word's positions are the
columns of its keys in the captured attention."""

from __future__ import annotations

from types import SimpleNamespace

from elbo_t2ialign.core.adapters.base import ModelAdapter, TextBlock
from elbo_t2ialign.core.compat import release


class ReleaseError(ImportError, ValueError):
    """The installed diffusers predates a family (a ValueError too, so that the commands report it
    in one line like other bad input)."""


def missing_release(since: str) -> str | None:
    """None when the installed diffusers is `since` or newer, else the installed version."""
    from importlib.metadata import version

    installed = version("diffusers")
    return installed if release(installed) < release(since) else None


def require_diffusers(family: str, since: str) -> None:
    """One clear line when the installed diffusers predates the first release `family` works with."""
    installed = missing_release(since)
    if installed is not None:
        raise ReleaseError(
            f"{family} needs diffusers >= {since} (installed: {installed}); "
            f"pip install 'diffusers>={since}' and a transformers release with its text encoder"
        )


class ChatTextAdapter(ModelAdapter):
    """`token_ids(text)` is the templated sequence the denoiser attends to (`_template_ids`); with
    `special=False`, the text's own tokens. A prompt may use at most `max_sequence_length` positions."""

    max_sequence_length = 512

    @property
    def attention_tokenizer(self):
        return self.pipe.tokenizer

    @property
    def text_length(self) -> int:
        return self.max_sequence_length

    def max_prompt_tokens(self) -> int:
        return self.max_sequence_length

    def _template_ids(self, text: str) -> list[int]:
        """The ids of `text` wrapped as the pipeline wraps it, from the first position the denoiser sees."""
        raise NotImplementedError

    def token_ids(self, text: str, special: bool = True) -> list[int]:
        if special:
            return self._template_ids(text)
        return list(self.attention_tokenizer(text, add_special_tokens=False, truncation=False).input_ids)

    @property
    def generation_kind(self) -> str:
        return self.family

    def text_blocks(self) -> list[TextBlock]:
        """One block: the templated prompt's positions, filled by the one text encoder."""
        return [
            TextBlock("text", TemplateTokenizer(self), 0, self.text_length, True, (self.pipe.text_encoder,))
        ]


class TemplateTokenizer:
    """Tokenizes text as the adapter's denoiser sees it, for the prompt weighting's phrase search: with
    special tokens, the templated prompt (`token_ids`), without, the text's own tokens."""

    def __init__(self, adapter: ChatTextAdapter):
        self.adapter = adapter

    def __call__(self, text: str, add_special_tokens: bool = True, truncation: bool = False):
        return SimpleNamespace(input_ids=self.adapter.token_ids(text, add_special_tokens))


def chat_text(tokenizer, text: str, **template_kwargs) -> str:
    """One user turn rendered by the tokenizer's chat template, as the Qwen3-based pipelines render it."""
    messages = [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, **template_kwargs
    )
