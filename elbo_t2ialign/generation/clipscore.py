"""CLIP score (method.md §7): 100 x cosine similarity of CLIP image and prompt embeddings.

Default model CLIP ViT-B/32 (`openai/clip-vit-base-patch32`); any CLIP hub id or local folder works,
and "tiny" builds a random tiny CLIP in code (offline smoke runs; its scores mean nothing).
Prompts longer than the text encoder's limit are an error unless `truncate=True`, because a silently
truncated prompt scores a different text.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from elbo_t2ialign.core.compat import dtype_keyword

log = logging.getLogger(__name__)

DEFAULT_CLIP = "openai/clip-vit-base-patch32"


class ClipScoreError(Exception):
    """A model, prompt or image the CLIP score cannot use."""


class ClipScorer:
    """Batched CLIP score of (image, prompt) pairs; prompt embeddings are computed once per prompt."""

    def __init__(
        self,
        model,
        tokenizer,
        image_processor,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
        truncate: bool = False,
        name: str = "custom",
    ):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.batch_size = int(batch_size)
        self.truncate = truncate
        self.name = name
        self.max_tokens = int(model.config.text_config.max_position_embeddings)

    @classmethod
    def from_pretrained(
        cls, model_id: str = DEFAULT_CLIP, device: str | torch.device = "cpu", **kwargs
    ) -> ClipScorer:
        """A CLIP hub id or local folder, or "tiny"; unreachable models fail with what to do."""
        if model_id == "tiny":  # a random CLIP built in code, for tests and offline smoke runs
            from elbo_t2ialign.tiny.models import tiny_clip

            return cls(*tiny_clip(), device=device, name="tiny", **kwargs)
        from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

        local = Path(model_id).expanduser()
        source = str(local) if local.is_dir() else model_id
        try:
            model = CLIPModel.from_pretrained(source, **{dtype_keyword("transformers"): torch.float32})
            tokenizer = CLIPTokenizer.from_pretrained(source)
            processor = CLIPImageProcessor.from_pretrained(source)
        except (OSError, ValueError) as err:
            raise ClipScoreError(
                f"cannot load CLIP model {model_id!r} ({' '.join(str(err).split())}). Offline? Download it where "
                f"there is network (`hf download {model_id} --local-dir <folder>`) and pass --clip <folder>."
            ) from None
        return cls(model, tokenizer, processor, device=device, name=model_id, **kwargs)

    def check_prompt(self, prompt: str, what: str = "prompt") -> None:
        """Error (or, with truncate, a warning) for prompts the text encoder cannot take whole."""
        n = len(self.tokenizer(prompt, truncation=False).input_ids)
        if n <= self.max_tokens:
            return
        msg = (
            f"{what} {prompt!r} has {n} CLIP tokens but the CLIP text encoder takes at most {self.max_tokens}"
        )
        if not self.truncate:
            raise ClipScoreError(msg + "; pass --truncate to score its first tokens only")
        log.warning("%s; scoring the first %d tokens", msg, self.max_tokens)

    @torch.no_grad()
    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """(N, D) unit-norm prompt embeddings."""
        out = []
        for i in range(0, len(prompts), self.batch_size):
            ids = self.tokenizer(
                list(prompts[i : i + self.batch_size]),
                padding=True,
                truncation=True,
                max_length=self.max_tokens,
                return_tensors="pt",
            ).to(self.device)
            pooled = self.model.text_model(
                input_ids=ids.input_ids, attention_mask=ids.attention_mask
            ).pooler_output
            out.append(F.normalize(self.model.text_projection(pooled).float(), dim=-1))
        return torch.cat(out)

    @torch.no_grad()
    def image_embeddings(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(N, D) unit-norm image embeddings."""
        out = []
        for i in range(0, len(images), self.batch_size):
            chunk = [im.convert("RGB") for im in images[i : i + self.batch_size]]
            pixels = self.image_processor(images=chunk, return_tensors="pt").pixel_values.to(self.device)
            pooled = self.model.vision_model(pixel_values=pixels).pooler_output
            out.append(F.normalize(self.model.visual_projection(pooled).float(), dim=-1))
        return torch.cat(out)

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        """(N,) 100 * cos(image_i, prompt_i) for N pairs."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        unique = list(dict.fromkeys(prompts))
        for p in unique:
            self.check_prompt(p)
        text = self.text_embeddings(unique)  # (U, D)
        row_of = {p: i for i, p in enumerate(unique)}
        rows = torch.tensor([row_of[p] for p in prompts], device=text.device)
        return 100.0 * (self.image_embeddings(images) * text[rows]).sum(dim=-1)
