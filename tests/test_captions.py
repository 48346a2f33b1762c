"""Captions (issue 15): a tiny BLIP built in code and saved as a local folder, the JSON cache (hit, miss,
another model, other settings), the OpenAI-compatible backend through a fake HTTP layer (no network)."""

import base64
import hashlib
import io
import json
import urllib.error

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import BlipForConditionalGeneration, BlipProcessor

from elbo_t2ialign import captions
from elbo_t2ialign.captions import BlipCaptioner, CaptionCache, CaptionError, ChatCaptioner
from elbo_t2ialign.devtools.tiny import tiny_blip


def _rgb(seed=0, w=24, h=20):
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def blip_folders(tmp_path_factory):
    """Two tiny BLIP captioners (other random weights) saved as local folders."""
    folders = []
    for seed in (0, 1):
        folder = tmp_path_factory.mktemp(f"blip{seed}")
        model, processor = tiny_blip(seed=seed)
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        folders.append(folder)
    return folders


def hand_caption(folder, image, prompt="a photo of", max_new_tokens=5):
    """transformers' BLIP called directly: processor, greedy generate, decode."""
    processor = BlipProcessor.from_pretrained(folder)
    model = BlipForConditionalGeneration.from_pretrained(folder).eval()
    with torch.no_grad():
        out = model.generate(
            **processor(images=image, text=prompt, return_tensors="pt"),
            max_new_tokens=max_new_tokens,
            num_beams=1,
        )
    return " ".join(processor.decode(out[0], skip_special_tokens=True).split())


def counting(captioner):
    calls = []
    inner = captioner.caption
    captioner.caption = lambda image: calls.append(1) or inner(image)
    return calls


def test_image_digest_is_sha256_of_size_and_rgb_pixels(tmp_path):
    img = _rgb()
    expected = hashlib.sha256(b"24x20:" + np.asarray(img).tobytes()).hexdigest()
    img.save(tmp_path / "x.png")
    for given in (img, np.asarray(img), tmp_path / "x.png", str(tmp_path / "x.png"), img.convert("RGBA")):
        assert captions.image_digest(given) == expected
    assert captions.image_digest(_rgb(seed=1)) != expected


def test_blip_folder_caption_matches_transformers(blip_folders):
    img = _rgb()
    captioner = BlipCaptioner.from_pretrained(str(blip_folders[0]), max_new_tokens=5)
    text = captioner.caption(img)
    assert text == hand_caption(blip_folders[0], img)
    assert text.startswith("a photo of ") and len(text.split()) > 3  # the prompt, continued
    assert captioner.settings == {
        "backend": "blip",
        "model": str(blip_folders[0].resolve()),
        "prompt": "a photo of",
        "max_new_tokens": 5,
        "num_beams": 1,
        "dtype": "float32",
    }
    free = BlipCaptioner.from_pretrained(str(blip_folders[0]), prompt="", max_new_tokens=5)
    assert free.settings["prompt"] is None
    assert free.caption(img) == hand_caption(blip_folders[0], img, prompt=None)


def test_cache_hit_miss_and_model_change(blip_folders, tmp_path):
    a = BlipCaptioner.from_pretrained(str(blip_folders[0]), max_new_tokens=5)
    b = BlipCaptioner.from_pretrained(str(blip_folders[1]), max_new_tokens=5)
    calls_a, calls_b = counting(a), counting(b)
    cache = CaptionCache(tmp_path / "cache" / "captions.json")
    img, other = _rgb(0), _rgb(1)

    first = cache.caption(img, a)  # miss: computed, stored
    assert first == hand_caption(blip_folders[0], img) and len(calls_a) == 1
    assert cache.caption(img, a) == first and len(calls_a) == 1  # hit
    img.save(tmp_path / "same.png")
    assert CaptionCache(tmp_path / "cache" / "captions.json").caption(tmp_path / "same.png", a) == first
    assert len(calls_a) == 1  # same pixels from a file, another cache object on the same file: hit

    assert (
        cache.caption(other, a) == hand_caption(blip_folders[0], other) and len(calls_a) == 2
    )  # other image
    by_b = cache.caption(img, b)  # other model: a miss, computed with that model
    assert len(calls_b) == 1 and by_b == hand_caption(blip_folders[1], img)
    assert by_b != first
    shorter = BlipCaptioner.from_pretrained(str(blip_folders[0]), max_new_tokens=2)
    assert cache.caption(img, shorter) == hand_caption(
        blip_folders[0], img, max_new_tokens=2
    )  # other settings
    assert (cache.hits, cache.misses) == (1, 4)

    stored = json.loads((tmp_path / "cache" / "captions.json").read_text())
    digest = captions.image_digest(img)
    assert set(stored) == {digest, captions.image_digest(other)}
    assert sorted(stored[digest].values()) == sorted(
        [first, by_b, hand_caption(blip_folders[0], img, max_new_tokens=2)]
    )
    assert stored[digest][CaptionCache.key(a.settings)] == first  # earlier captions are kept


def test_unreadable_cache_is_an_error_and_is_left_alone(tmp_path):
    path = tmp_path / "captions.json"
    path.write_text("{not json")
    fake = ChatCaptioner("http://x/v1", "m", post=lambda *a: pytest.fail("no request when the cache is bad"))
    with pytest.raises(CaptionError, match=r"captions.json is not valid JSON .*move it away"):
        CaptionCache(path).caption(_rgb(), fake)
    assert path.read_text() == "{not json"
    path.write_text('["a list"]')
    with pytest.raises(CaptionError, match="does not hold"):
        CaptionCache(path).caption(_rgb(), fake)


def test_default_blip_offline_is_one_line_saying_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CaptionError) as err:
        BlipCaptioner.from_pretrained()
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("cannot load the BLIP captioner 'Salesforce/blip-image-captioning-large'")
    assert "hf download Salesforce/blip-image-captioning-large --local-dir <folder>" in message


def test_chat_backend_request_and_answer(tmp_path):
    sent = []

    def post(url, payload, headers, timeout):
        sent.append((url, payload, headers, timeout))
        return {"choices": [{"message": {"role": "assistant", "content": " A red  circle\n on a wall. "}}]}

    img = _rgb()
    chat = ChatCaptioner(
        "http://localhost:8000/v1/",
        "llava",
        api_key="k",
        system_prompt="Be brief.",
        max_completion_tokens=40,
        post=post,
    )
    assert chat.caption(img) == "A red circle on a wall."
    url, payload, headers, timeout = sent[0]
    assert url == "http://localhost:8000/v1/chat/completions" and headers == {"Authorization": "Bearer k"}
    assert timeout == 60.0 and payload["model"] == "llava" and payload["max_completion_tokens"] == 40
    system, user = payload["messages"]
    assert system == {"role": "system", "content": "Be brief."}
    assert user["content"][0] == {"type": "text", "text": captions.DEFAULT_CHAT_PROMPT}
    data_url = user["content"][1]["image_url"]["url"]
    assert data_url.startswith("data:image/png;base64,")
    sent_image = Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1])))
    np.testing.assert_array_equal(np.asarray(sent_image), np.asarray(img))  # lossless

    cache = CaptionCache(tmp_path / "c.json")
    cache.caption(img, chat)
    cache.caption(img, chat)
    other = ChatCaptioner("http://localhost:8000/v1", "qwen-vl", post=post)
    cache.caption(img, other)
    assert len(sent) == 3  # one request each for llava (then a hit) and for the other model
    assert "Authorization" not in sent[-1][2]  # no key, no header

    with pytest.raises(CaptionError, match="answered without a caption"):
        ChatCaptioner("http://x/v1", "m", post=lambda *a: {"error": "busy"}).caption(img)
    with pytest.raises(CaptionError, match="needs caption.url"):
        ChatCaptioner(None, "m")


class FakeResponse(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_post_json_through_urllib_without_network(monkeypatch):
    seen = {}

    def urlopen(request, timeout):
        seen.update(
            url=request.full_url,
            body=json.loads(request.data),
            headers=dict(request.header_items()),
            timeout=timeout,
        )
        return FakeResponse(b'{"choices": [{"message": {"content": "a cat"}}]}')

    monkeypatch.setattr(captions.urllib.request, "urlopen", urlopen)
    assert ChatCaptioner("https://api.example/v1", "gpt", api_key="s3").caption(_rgb()) == "a cat"
    assert seen["url"] == "https://api.example/v1/chat/completions" and seen["body"]["model"] == "gpt"
    assert (
        seen["headers"]["Authorization"] == "Bearer s3"
        and seen["headers"]["Content-type"] == "application/json"
    )

    def refused(request, timeout):
        raise urllib.error.HTTPError(
            request.full_url, 401, "Unauthorized", {}, io.BytesIO(b'{"error":\n"bad key"}')
        )

    monkeypatch.setattr(captions.urllib.request, "urlopen", refused)
    with pytest.raises(
        CaptionError,
        match=r'^https://api.example/v1/chat/completions answered HTTP 401: \{"error": "bad key"\}$',
    ):
        ChatCaptioner("https://api.example/v1", "gpt").caption(_rgb())

    def offline(request, timeout):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(captions.urllib.request, "urlopen", offline)
    with pytest.raises(
        CaptionError, match=r"cannot reach https://api.example/v1/chat/completions \(Name or service"
    ):
        ChatCaptioner("https://api.example/v1", "gpt").caption(_rgb())


def test_from_config(monkeypatch, tmp_path):
    monkeypatch.setenv("MY_KEY", "abc")
    chat, cache = captions.from_config(
        {
            "backend": "chat",
            "url": "http://h/v1",
            "model": "m",
            "api_key_env": "MY_KEY",
            "cache": str(tmp_path / "c.json"),
        }
    )
    assert isinstance(chat, ChatCaptioner) and chat.api_key == "abc" and cache.path == tmp_path / "c.json"
    assert chat.settings["prompt"] == captions.DEFAULT_CHAT_PROMPT
    blip, _ = captions.from_config({"model": "tiny", "max_new_tokens": 4})
    assert blip.settings["prompt"] == "a photo of" and blip.settings["max_new_tokens"] == 4
    with pytest.raises(CaptionError, match=r"unknown key\(s\) in caption: \['modle'\]"):
        captions.from_config({"modle": "x"})
    with pytest.raises(CaptionError, match="caption.backend must be 'blip' or 'chat', got 'gpt'"):
        captions.from_config({"backend": "gpt"})
    with pytest.raises(CaptionError, match="max_new_tokens must be an integer >= 1, got 0"):
        captions.from_config({"model": "tiny", "max_new_tokens": 0})
