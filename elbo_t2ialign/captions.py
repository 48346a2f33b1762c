"""Image captions for richer prompts ("a photo of a cat sleeping on a sofa" instead of "a photo of cat,
sofa"): BLIP through transformers, or any OpenAI-compatible chat endpoint, with a JSON disk cache.

    captioner = BlipCaptioner.from_pretrained()   # Salesforce/blip-image-captioning-large, or a local folder
    cache = CaptionCache("runs/cache/captions.json")
    text = cache.caption(image, captioner)        # computed once per (image, captioner settings)

The cache file maps the SHA-256 of an image's RGB pixels (and size) to {captioner settings: caption};
the settings are the backend, the model id (a local folder by its absolute path), the prompt and the
generation settings, so another model or setting is a miss and earlier captions stay in the file.
`model_id="tiny"` builds a random tiny BLIP in code (offline smoke runs; its captions are random words);
`"tiny-shapes"` the same over the shapes world's words only, so the testbed model's tokenizer reads them.

`with_words` appends the words a caption lacks (the prompt of `explain --caption` and of the
segmentation runner's `dataset.prompt=caption`); `fit_words` shortens a caption so that the prompt fits
the text encoder.

As the reference (utils/img2text.py), BLIP is prompted with the start of a caption ("a photo of") and
continues it; unlike the reference, the caption returned keeps that start, so it reads as a prompt.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from elbo_t2ialign.cli import DamagedFileError
from elbo_t2ialign.core.compat import dtype_keyword

DEFAULT_BLIP = "Salesforce/blip-image-captioning-large"
BLIP_PROMPT = "a photo of"  # the start of the caption BLIP continues ("" or None: unconditional)
DEFAULT_CHAT_PROMPT = "Describe this image in one short sentence."


class CaptionError(Exception):
    """A captioner, endpoint or cache file that cannot be used; the message is one line."""


class DamagedCacheError(CaptionError, DamagedFileError):
    """The caption cache file cannot be parsed (exit status 3 on the command line)."""


class Captioner(Protocol):
    settings: dict[str, Any]  # what determines the caption of an image (the cache key)

    def caption(self, image: Image.Image) -> str: ...


def one_line(text: Any) -> str:
    return " ".join(str(text).split())


def image_digest(image: Image.Image | str | Path | np.ndarray) -> str:
    """SHA-256 of the image's size and RGB pixels: the same picture from a file, a PIL image or an array
    gives the same digest, whatever the file format."""
    from elbo_t2ialign.core.images import as_image

    rgb = as_image(image).convert("RGB")
    h = hashlib.sha256(f"{rgb.width}x{rgb.height}:".encode())
    h.update(rgb.tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------- BLIP


class BlipCaptioner:
    """BLIP image captioning (`BlipForConditionalGeneration`), optionally continuing a prompt."""

    def __init__(
        self,
        model,
        processor,
        name: str,
        prompt: str | None = BLIP_PROMPT,
        max_new_tokens: int = 30,
        num_beams: int = 1,
        device: Any = "cpu",
    ):
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise CaptionError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if not isinstance(num_beams, int) or num_beams < 1:
            raise CaptionError(f"num_beams must be an integer >= 1, got {num_beams!r}")
        self.model = model.to(device).eval()
        self.processor = processor
        self.prompt = prompt or None
        self.settings = {
            "backend": "blip",
            "model": name,
            "prompt": self.prompt,
            "max_new_tokens": max_new_tokens,
            "num_beams": num_beams,
            "dtype": str(model.dtype).removeprefix("torch."),
        }

    @classmethod
    def from_pretrained(
        cls, model_id: str = DEFAULT_BLIP, device: Any = "cpu", dtype: str = "float32", **settings: Any
    ) -> BlipCaptioner:
        """A hub id, a local BLIP folder, or "tiny"; an unreachable model fails with what to do."""
        from elbo_t2ialign.core.adapters import resolve_device, resolve_dtype

        dev = resolve_device(device)
        if model_id in ("tiny", "tiny-shapes"):
            from elbo_t2ialign.tiny.models import SHAPES_WORDS, tiny_blip

            model, processor = tiny_blip(words=SHAPES_WORDS if model_id == "tiny-shapes" else None)
            return cls(model, processor, model_id, device=dev, **settings)
        from transformers import BlipForConditionalGeneration, BlipProcessor

        local = Path(model_id).expanduser()
        source = str(local.resolve()) if local.is_dir() else model_id
        try:
            torch_dtype = resolve_dtype(dtype, dev)
            processor = BlipProcessor.from_pretrained(source)
            model = BlipForConditionalGeneration.from_pretrained(
                source, **{dtype_keyword("transformers"): torch_dtype}
            )
        except (OSError, ValueError) as err:
            raise CaptionError(
                f"cannot load the BLIP captioner {model_id!r} ({one_line(err)}). Offline? Download it where "
                f"there is network (`hf download {model_id} --local-dir <folder>`) and pass that folder "
                "(caption.model=<folder>)"
            ) from None
        return cls(model, processor, source, device=dev, **settings)

    def caption(self, image: Image.Image) -> str:
        import torch

        inputs = self.processor(images=image.convert("RGB"), text=self.prompt, return_tensors="pt")
        inputs = inputs.to(self.model.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        with torch.no_grad():
            out = self.model.generate(
                **inputs, max_new_tokens=self.settings["max_new_tokens"], num_beams=self.settings["num_beams"]
            )
        return one_line(self.processor.decode(out[0], skip_special_tokens=True))


# ---------------------------------------------------------------- caption -> prompt


def with_words(caption: str, words: list[str]) -> tuple[str, list[str]]:
    """The caption, with the words it does not contain (as whole words, any case) appended after
    commas: (prompt, appended words)."""
    missing = [w for w in words if not re.search(rf"(?<!\w){re.escape(w.lower())}(?!\w)", caption.lower())]
    return (", ".join([caption, *missing]) if missing else caption), missing


def fit_words(
    caption: str, words: list[str], fits: Callable[[str], bool] | None = None
) -> tuple[str, list[str], int]:
    """`with_words`, dropping the caption's last words until `fits(prompt)` (the text encoder's
    length limit): (prompt, appended words, number of caption words dropped). When even the bare
    caption start does not fit, the shortest prompt is returned (the aligner then names the limit)."""
    tokens = caption.split()
    for dropped in range(len(tokens) + 1):
        prompt, appended = with_words(" ".join(tokens[: len(tokens) - dropped]), words)
        if fits is None or fits(prompt):
            return prompt, appended, dropped
    return prompt, appended, len(tokens)


# ---------------------------------------------------------------- OpenAI-compatible chat endpoint

PostJson = Callable[[str, dict[str, Any], dict[str, str], float], Any]


def post_json(url: str, payload: dict[str, Any], headers: dict[str, str], timeout: float) -> Any:
    """POST a JSON body, return the decoded JSON answer; network and HTTP failures as CaptionError."""
    request = urllib.request.Request(
        url,
        data=json.dumps(payload).encode("utf-8"),
        method="POST",
        headers={"Content-Type": "application/json", **headers},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
    except urllib.error.HTTPError as err:
        detail = one_line(err.read().decode("utf-8", errors="replace"))[:300]
        raise CaptionError(f"{url} answered HTTP {err.code}: {detail}") from None
    except (urllib.error.URLError, OSError) as err:
        raise CaptionError(
            f"cannot reach {url} ({one_line(getattr(err, 'reason', err))}); check caption.url and the network"
        ) from None
    try:
        return json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CaptionError(f"{url} did not answer with JSON: {one_line(body[:200])}") from None


class ChatCaptioner:
    """Captions from an OpenAI-compatible chat-completions endpoint that accepts images (OpenAI, vLLM,
    Ollama, ...): the image goes as a base64 PNG data URL in the user message."""

    def __init__(
        self,
        url: str,
        model: str,
        api_key: str | None = None,
        prompt: str = DEFAULT_CHAT_PROMPT,
        system_prompt: str = "",
        max_completion_tokens: int = 70,
        timeout: float = 60.0,
        post: PostJson | None = None,
    ):
        if not url or not model:
            raise CaptionError(
                "the chat backend needs caption.url (e.g. https://api.openai.com/v1) and "
                "caption.model (e.g. gpt-4o-mini)"
            )
        url = url.rstrip("/")
        self.endpoint = url if url.endswith("/chat/completions") else url + "/chat/completions"
        self.api_key = api_key
        self.prompt, self.system_prompt = prompt or DEFAULT_CHAT_PROMPT, system_prompt or ""
        self.timeout = timeout
        self.post = post or post_json
        self.settings = {
            "backend": "chat",
            "model": model,
            "prompt": self.prompt,
            "system_prompt": self.system_prompt,
            "max_completion_tokens": max_completion_tokens,
        }

    def payload(self, image: Image.Image) -> dict[str, Any]:
        buf = io.BytesIO()
        image.convert("RGB").save(buf, format="PNG")
        data_url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        messages.append(
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": self.prompt},
                    {"type": "image_url", "image_url": {"url": data_url}},
                ],
            }
        )
        return {
            "model": self.settings["model"],
            "messages": messages,
            "max_completion_tokens": self.settings["max_completion_tokens"],
        }

    def caption(self, image: Image.Image) -> str:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        answer = self.post(self.endpoint, self.payload(image), headers, self.timeout)
        try:
            text = answer["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            text = None
        if not isinstance(text, str) or not text.strip():
            raise CaptionError(
                f"{self.endpoint} answered without a caption: {one_line(json.dumps(answer))[:300]}"
            )
        return one_line(text)


# ---------------------------------------------------------------- cache


class CaptionCache:
    """One JSON file {image digest: {captioner settings (JSON): caption}}; written atomically, read
    before every write so that captions added by another process are kept."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        self.hits = self.misses = 0

    def load(self) -> dict[str, dict[str, str]]:
        if not self.path.is_file():
            return {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise DamagedCacheError(
                f"the caption cache {self.path} is not valid JSON ({one_line(err)}); "
                "move it away (or set caption.cache=<another file>)"
            ) from None
        if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
            raise DamagedCacheError(
                f"the caption cache {self.path} does not hold {{image digest: {{settings: "
                "caption}}}; move it away (or set caption.cache=<another file>)"
            )
        return data

    @staticmethod
    def key(settings: Mapping[str, Any]) -> str:
        return json.dumps(dict(settings), sort_keys=True)

    def caption(self, image: Image.Image | str | Path | np.ndarray, captioner: Captioner) -> str:
        """The cached caption of this image by this captioner, or a new one (then stored)."""
        from elbo_t2ialign.core.images import as_image

        image = as_image(image)
        digest, key = image_digest(image), self.key(captioner.settings)
        found = self.load().get(digest, {}).get(key)
        if found is not None:
            self.hits += 1
            return found
        text = captioner.caption(image)
        self.misses += 1
        data = self.load()
        data.setdefault(digest, {})[key] = text
        from elbo_t2ialign.runfolder import write_text_atomic

        write_text_atomic(self.path, json.dumps(data, indent=1, sort_keys=True) + "\n")
        return text


# ---------------------------------------------------------------- from a config

CONFIG_KEYS = {
    "backend",
    "model",
    "prompt",
    "max_new_tokens",
    "num_beams",
    "dtype",
    "cache",
    "url",
    "api_key_env",
    "system_prompt",
    "max_completion_tokens",
    "timeout",
}


def from_config(conf: Mapping[str, Any], device: Any = "cpu") -> tuple[Captioner, CaptionCache]:
    """(captioner, cache) from a `caption:` config section (configs/explain.yaml)."""
    from elbo_t2ialign.cli import check_known

    check_known("caption", set(conf), CONFIG_KEYS, CaptionError)
    backend = conf.get("backend", "blip")
    cache = CaptionCache(conf.get("cache") or "runs/cache/captions.json")
    if backend == "blip":
        captioner: Captioner = BlipCaptioner.from_pretrained(
            conf.get("model") or DEFAULT_BLIP,
            device=device,
            dtype=conf.get("dtype") or "float32",
            prompt=BLIP_PROMPT if conf.get("prompt") is None else conf["prompt"],
            max_new_tokens=conf.get("max_new_tokens", 30),
            num_beams=conf.get("num_beams", 1),
        )
    elif backend == "chat":
        env = conf.get("api_key_env") or "OPENAI_API_KEY"
        captioner = ChatCaptioner(
            conf.get("url"),
            conf.get("model"),
            api_key=os.environ.get(env),
            prompt=conf.get("prompt") or DEFAULT_CHAT_PROMPT,
            system_prompt=conf.get("system_prompt") or "",
            max_completion_tokens=conf.get("max_completion_tokens", 70),
            timeout=conf.get("timeout", 60.0),
        )
    else:
        raise CaptionError(f"caption.backend must be 'blip' or 'chat', got {backend!r}")
    return captioner, cache
