"""Caption prompts in the segmentation runner (issue 25, dataset.prompt=caption): each image's
collection prompt is its caption with the class words it lacks appended, captions are made before the
model loads and recorded in the run folder, and a resumed run or an added variant needs no captioner.
End to end on the testbed model with the tiny BLIP, the maps equal the aligner's own on that prompt."""

import json

import numpy as np
import pytest
from PIL import Image

from elbo_t2ialign import captions
from elbo_t2ialign.captions import BlipCaptioner, fit_words, with_words
from elbo_t2ialign.devtools.fixtures import PixelAligner, fixture_config, random_samples, write_dataset
from elbo_t2ialign.segmentation import ConfigError, run
from elbo_t2ialign.segmentation.config import result_fingerprint, validate
from elbo_t2ialign.testbed import train

CLASSES = ["cat", "dog", "car"]


def test_with_words_appends_only_missing_whole_words():
    assert with_words("a photo of a cat on a sofa", ["cat", "sofa"]) == ("a photo of a cat on a sofa", [])
    assert with_words("a photo of cats", ["cat", "dog"]) == ("a photo of cats, cat, dog", ["cat", "dog"])
    assert with_words("A Photo of a Red Car", ["red car"]) == ("A Photo of a Red Car", [])


def test_fit_words_drops_caption_words_from_the_end_until_it_fits():
    words = lambda p: len(p.replace(",", " ").split())  # noqa: E731  (one token per word)
    prompt, appended, dropped = fit_words("a photo of a big dog on grass", ["cat"], lambda p: words(p) <= 6)
    assert (prompt, appended, dropped) == ("a photo of a big, cat", ["cat"], 3)
    # a class word dropped from the caption comes back appended
    prompt, appended, dropped = fit_words(
        "a photo of a cat and a dog", ["cat", "dog"], lambda p: words(p) <= 6
    )
    assert (prompt, appended, dropped) == ("a photo of a cat, dog", ["dog"], 3)
    assert fit_words("a photo", ["cat"], None) == ("a photo, cat", ["cat"], 0)


@pytest.fixture
def data(tmp_path):
    return write_dataset(tmp_path / "data", CLASSES, random_samples(CLASSES, 4, size=(32, 32), seed=5))


def caption_config(data, out, **top):
    cfg = fixture_config(data, out, num_images=None, **top)
    cfg["dataset"]["prompt"] = "caption"
    cfg["caption"] = {"model": "tiny", "max_new_tokens": 4, "cache": str(out.parent / "captions-cache.json")}
    return cfg


def test_config_checks(data, tmp_path):
    cfg = caption_config(data, tmp_path / "run")
    validate(cfg)
    with pytest.raises(ConfigError, match="dataset.prompt must be one of"):
        validate({**cfg, "dataset": {**cfg["dataset"], "prompt": "blip"}})
    with pytest.raises(ConfigError, match=r"unknown key\(s\) in caption.*colour"):
        validate({**cfg, "caption": {"colour": 1}})
    with pytest.raises(ConfigError, match="cannot use dataset.phrase_path"):
        validate({**cfg, "dataset": {**cfg["dataset"], "phrase_path": "{data_root}/p/{img_name}.json"}})
    # folders written before dataset.prompt existed resume as template runs; a switch is a new result
    old = fixture_config(data, tmp_path / "run")
    new = {**old, "dataset": {**old["dataset"], "prompt": "template"}}
    assert result_fingerprint(old) == result_fingerprint(new) != result_fingerprint(cfg)
    # the cache's location is not part of the result, the captioner is
    moved = {**cfg, "caption": {**cfg["caption"], "cache": "elsewhere.json"}}
    other = {**cfg, "caption": {**cfg["caption"], "max_new_tokens": 5}}
    assert result_fingerprint(moved) == result_fingerprint(cfg) != result_fingerprint(other)


def test_caption_prompts_recorded_and_reused_without_captioner(data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    aligner = PixelAligner()
    run(caption_config(data, out), aligner=aligner)
    recorded = json.loads((out / "captions.json").read_text())
    assert recorded["captioner"]["model"] == "tiny" and recorded["captioner"]["max_new_tokens"] == 4
    blip = BlipCaptioner.from_pretrained("tiny", max_new_tokens=4)
    names = sorted(recorded["captions"])
    assert names == [f"img_{i:03d}" for i in range(4)]
    for i, name in enumerate(names):
        image = Image.open(data / "images" / f"{name}.png")
        assert recorded["captions"][name] == blip.caption(image)  # the captioner called directly
        scores = json.loads((out / "maps" / name / "scores.json").read_text())
        caption = recorded["captions"][name]
        expected = caption + "".join(f", {c}" for c in scores["classes"] if f" {c}" not in f" {caption}")
        assert scores["prompt"] == expected and scores["caption"] == caption
        assert scores["appended_to_caption"] == [c for c in scores["classes"] if f" {c}" not in f" {caption}"]
        assert scores["phrase_source"] == "caption"
        assert aligner.calls[i]["prompt"] == expected and aligner.calls[i]["phrases"] is None

    # a rerun adding a variant, and a rerun of a lost image, need no captioner
    def no_captioner(*args, **kwargs):
        raise AssertionError("the captioner was loaded")

    monkeypatch.setattr(captions, "from_config", no_captioner)
    again = PixelAligner()
    run(caption_config(data, out, variants=["baseline", "elbo", "s5"]), aligner=again)
    assert [c["prompt"] for c in again.calls] == [
        json.loads((out / "maps" / n / "scores.json").read_text())["prompt"] for n in names
    ]
    lost = out / "maps" / names[1]
    for f in lost.iterdir():
        f.unlink()
    lost.rmdir()
    third = PixelAligner()
    run(caption_config(data, out, variants=["baseline", "elbo", "s5"]), aligner=third)
    assert [c["prompt"] for c in third.calls] == [again.calls[1]["prompt"]]  # from captions.json
    assert json.loads((lost / "scores.json").read_text())["variants"] == ["baseline", "elbo", "s5"]


def test_shards_merge_their_captions(data, tmp_path):
    out = tmp_path / "run"
    for i in range(2):
        run(caption_config(data, out, shard=f"{i}/2"), aligner=PixelAligner())
    recorded = json.loads((out / "captions.json").read_text())["captions"]
    assert sorted(recorded) == [f"img_{i:03d}" for i in range(4)]


def test_unloadable_captioner_is_a_config_error(data, tmp_path):
    cfg = caption_config(data, tmp_path / "run")
    cfg["caption"]["model"] = str(tmp_path / "no-blip-here")
    with pytest.raises(ConfigError, match="dataset.prompt=caption: cannot load the BLIP captioner"):
        run(cfg, aligner=PixelAligner())


@pytest.mark.skipif(
    not (train.DEFAULT_MODEL_DIR / "model_index.json").is_file(), reason="no committed testbed model"
)
def test_caption_prompts_end_to_end_on_the_testbed(tmp_path):
    """The testbed model, the shapes world and the tiny BLIP over the world's words: the stored maps
    are the aligner's own maps for the stored prompt."""
    from hydra import compose, initialize_config_dir

    from elbo_t2ialign.cli import to_container
    from elbo_t2ialign.segmentation.datasets import SegDataset
    from elbo_t2ialign.segmentation.runner import build_aligner
    from elbo_t2ialign.testbed import world

    world.ensure_dataset(tmp_path / "datasets" / "shapes")
    overrides = [
        "model=shapes",
        "dataset=shapes",
        "elbo=shapes",
        "device=cpu",
        "num_images=3",
        "progress=false",
        "dataset.prompt=caption",
        "caption.model=tiny-shapes",
        "caption.max_new_tokens=6",
        f"caption.cache={tmp_path / 'cache.json'}",
        f"datasets_dir={tmp_path / 'datasets'}",
        f"output_dir={tmp_path / 'run'}",
        "elbo.elbo_timesteps=[101,501,901]",  # fewer network passes: a test, not a measurement
    ]
    from elbo_t2ialign.cli import hydra_config_dir

    with initialize_config_dir(config_dir=hydra_config_dir(), version_base="1.3"):
        conf = to_container(compose("segment", overrides=overrides))
    out = run(conf)
    recorded = json.loads((out / "captions.json").read_text())
    assert recorded["captioner"]["model"] == "tiny-shapes" and len(recorded["captions"]) == 3
    options = validate(conf)
    aligner = build_aligner(conf, options)
    dataset = SegDataset(conf["dataset"])
    for name in dataset.images[:3]:
        scores = json.loads((out / "maps" / name / "scores.json").read_text())
        assert scores["caption"] == recorded["captions"][name]
        assert scores["caption"].startswith("a photo of")
        for c in scores["classes"]:
            assert c in scores["prompt"].replace(",", " ").split()
        image = dataset.load_image(name)
        evidence = aligner.observe(
            image, scores["classes"], None, scores["seed"], prompt=scores["prompt"], need_elbo=True
        )
        assert evidence.prompts["collect"] == scores["prompt"]
        for variant, strength in (("elbo", options.strength), ("baseline", 1.0)):
            maps = evidence.maps(strength)
            for cid, cname in zip(scores["class_ids"], scores["classes"], strict=True):
                stored = (
                    np.asarray(Image.open(out / "maps" / name / f"{variant}_{cid:03d}.png"), np.float32) / 255
                )
                assert np.abs(stored - maps[cname]).max() <= 0.5 / 255 + 1e-6, (name, variant, cname)
