"""Runner: end to end with the evaluator, resumability, sharding, phrase files."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from elbo_t2ialign.devtools.fixtures import PixelAligner, fixture_config, random_samples, write_dataset
from elbo_t2ialign.segmentation import evaluate, run
from elbo_t2ialign.segmentation.config import ConfigError, SegmentationError

CLASSES = ["cat", "dog", "boat"]


@pytest.fixture
def data(tmp_path):
    return write_dataset(tmp_path / "data", CLASSES, random_samples(CLASSES, 8, convention="voc"))


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under maps/ by relative path -> bytes."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted((folder / "maps").rglob("*"))
        if p.is_file()
    }


class Interrupting(PixelAligner):
    """Raises KeyboardInterrupt (a kill) on call number `after + 1`."""

    def __init__(self, after):
        super().__init__()
        self.after = after

    def observe(self, image, class_names, phrases=None, seed=None, **kwargs):
        if len(self.calls) == self.after:
            raise KeyboardInterrupt
        return super().observe(image, class_names, phrases, seed, **kwargs)


def test_end_to_end_then_evaluate(tmp_path, data):
    aligner = PixelAligner()
    out = run(fixture_config(data, tmp_path / "run", "voc"), aligner=aligner)
    assert [c["seed"] for c in aligner.calls] == list(range(8))  # cfg.seed + index
    # lossless 8-bit storage of what the aligner returned
    first = aligner.heatmaps(Image.open(data / "images" / "img_000.png"), aligner.calls[0]["classes"], seed=0)
    scores = json.loads((out / "maps" / "img_000" / "scores.json").read_text())
    name, cid = scores["classes"][0], scores["class_ids"][0]
    stored = np.asarray(Image.open(out / "maps" / "img_000" / f"elbo_{cid:03d}.png"))
    assert np.abs(stored / 255.0 - first.heatmaps[name]).max() <= 0.5 / 255 + 1e-6
    assert scores["tau"][name] == pytest.approx(first.tau[name])
    for f in ("config.yaml", "run.json", "launches.jsonl", "segment.log"):
        assert (out / f).is_file()
    assert json.loads((out / "run.json").read_text())["seed"] == 0

    m = evaluate(out, progress=False, overlays=2)
    saved = json.loads((out / "metrics.json").read_text())
    for variant in ("elbo", "baseline"):
        assert saved[variant]["mIoU"] == pytest.approx(m[variant]["mIoU"])
        assert saved[variant]["mIoU"] == pytest.approx(
            max(v for v in saved[variant]["curve"]["mIoU"] if v is not None)
        )
        expected = _brute_miou(data, out, variant, saved[variant]["threshold"])
        assert saved[variant]["mIoU"] == pytest.approx(expected)
    assert saved["delta_mIoU"] == pytest.approx(saved["elbo"]["mIoU"] - saved["baseline"]["mIoU"])
    text = (out / "metrics.md").read_text()
    assert "| delta |" in text and f"{saved['elbo']['mIoU']:.2f}" in text
    for plot in ("miou_vs_threshold.png", "miou_by_size.png", "overlays.png"):
        assert Image.open(out / "plots" / plot).size[0] > 100

    fixed = evaluate(out, threshold=0.3, out_dir=tmp_path / "fixed", progress=False, overlays=0)
    assert fixed["threshold_mode"] == "fixed" and fixed["elbo"]["threshold"] == 0.3
    assert fixed["elbo"]["mIoU"] == pytest.approx(_brute_miou(data, out, "elbo", 0.3))
    assert (tmp_path / "fixed" / "metrics.md").is_file() and (
        tmp_path / "fixed" / "plots" / "overlays.png"
    ).is_file()


def test_crf_without_its_package_says_what_to_install(tmp_path, data, monkeypatch):
    out = run(fixture_config(data, tmp_path / "run", "voc", num_images=1), aligner=PixelAligner())
    monkeypatch.setitem(sys.modules, "pydensecrf", None)  # as if not installed
    with pytest.raises(SegmentationError, match="install the PyPI package 'pydensecrf2'"):
        evaluate(out, crf=True, progress=False)
    assert not (out / "metrics.json").exists()


def _brute_miou(data, out, variant, th):
    """mIoU recomputed from the PNGs and the raw VOC masks with plain loops over classes."""
    inter, union = np.zeros(4), np.zeros(4)
    for folder in sorted((out / "maps").iterdir()):
        scores = json.loads((folder / "scores.json").read_text())
        raw = np.asarray(Image.open(data / "masks" / f"{folder.name}.png")).astype(int)
        pred = np.zeros(raw.shape, int)
        best = np.full(raw.shape, -1.0)
        for cid in scores["class_ids"]:
            heat = np.asarray(Image.open(folder / f"{variant}_{cid:03d}.png")) / 255.0
            pred[(heat > best) & (heat >= th)] = cid
            best = np.maximum(best, heat)
        pred[best < th] = 0
        keep = raw != 255
        for c in range(4):
            p, g = (pred == c) & keep, (raw == c) & keep
            inter[c] += (p & g).sum()
            union[c] += (p | g).sum()
    return float(np.mean(inter[union > 0] / union[union > 0]) * 100)


def test_interrupted_run_resumes_to_identical_outputs(tmp_path, data):
    run(fixture_config(data, tmp_path / "whole", "voc"), aligner=PixelAligner())
    cfg = fixture_config(data, tmp_path / "resumed", "voc")
    with pytest.raises(KeyboardInterrupt):
        run(cfg, aligner=Interrupting(after=3))
    maps = tmp_path / "resumed" / "maps"
    assert sorted(p.name for p in maps.iterdir()) == ["img_000", "img_001", "img_002"]
    # what a kill during writing leaves: a half-written temporary folder for the image in flight
    (maps / ".tmp-img_003").mkdir()
    (maps / ".tmp-img_003" / "elbo_001.png").write_bytes(b"half a png")
    (maps / ".tmp-img_003" / "stray.png").write_bytes(b"x")
    second = PixelAligner()
    run(cfg, aligner=second)
    assert [c["seed"] for c in second.calls] == [3, 4, 5, 6, 7]  # finished images are not computed again
    assert tree(tmp_path / "resumed") == tree(tmp_path / "whole")
    third = PixelAligner()
    run(cfg, aligner=third)
    assert third.calls == []


def test_two_shards_equal_one_process(tmp_path, data):
    run(fixture_config(data, tmp_path / "one", "voc"), aligner=PixelAligner())
    seeds = []
    for i in range(2):
        aligner = PixelAligner()
        run(fixture_config(data, tmp_path / "two", "voc", shard=f"{i}/2"), aligner=aligner)
        seeds.append([c["seed"] for c in aligner.calls])
    assert seeds == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert tree(tmp_path / "two") == tree(tmp_path / "one")
    assert (tmp_path / "two" / "segment.shard1-of-2.log").is_file()


def test_shards_from_accelerate_environment(tmp_path, data, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "2")
    aligner = PixelAligner()
    run(fixture_config(data, tmp_path / "acc", "voc"), aligner=aligner)
    assert [c["seed"] for c in aligner.calls] == [2, 5]


def test_changed_config_is_refused_without_touching_outputs(tmp_path, data):
    cfg = fixture_config(data, tmp_path / "run", "voc", num_images=2)
    run(cfg, aligner=PixelAligner())
    before = tree(tmp_path / "run")
    cfg["elbo"] = {"strength": 2.0}
    with pytest.raises(ConfigError, match=r"elbo.strength: 3.0 -> 2.0.*output_dir"):
        run(cfg, aligner=PixelAligner())
    assert tree(tmp_path / "run") == before


def test_phrase_files_reach_the_aligner_and_fallback_is_reported(tmp_path, data):
    (data / "phrases").mkdir()
    samples = random_samples(CLASSES, 8, convention="voc")  # same seed -> same masks as `data`
    labels = sorted({int(v) for v in np.unique(samples["img_000"][1]) if 0 < v < 255})
    other = next(c for c in CLASSES if c != CLASSES[labels[0] - 1])
    (data / "phrases" / "img_000.json").write_text(
        json.dumps({"subject": [other, CLASSES[labels[0] - 1]], "phrase": ["a green wing", "a fluffy thing"]})
    )
    cfg = fixture_config(data, tmp_path / "run", "voc", num_images=2)
    cfg["dataset"]["phrase_path"] = "{data_root}/phrases/{img_name}.json"
    aligner = PixelAligner()
    out = run(cfg, aligner=aligner)
    assert aligner.calls[0]["phrases"][0] == "a fluffy thing"
    # as the reference: the collection prompt lists every phrase of the file, in its order
    assert aligner.calls[0]["prompt"] == "a photo of a green wing, a fluffy thing"
    assert aligner.calls[1]["phrases"] is None and aligner.calls[1]["prompt"] is None
    assert json.loads((out / "maps" / "img_001" / "scores.json").read_text())["phrase_source"].startswith(
        "class_names ("
    )
    assert "1 image(s) had no phrase file" in (out / "segment.log").read_text()
    evaluate(out, progress=False, overlays=1)
    assert "1 image(s) had no per-image phrase file" in (out / "metrics.md").read_text()


def test_image_without_foreground_classes(tmp_path):
    image = np.full((6, 8, 3), 12, np.uint8)
    data = write_dataset(tmp_path / "data", CLASSES, {"empty": (image, np.zeros((6, 8), np.uint8))})
    aligner = PixelAligner()
    out = run(fixture_config(data, tmp_path / "run"), aligner=aligner)
    assert aligner.calls == []  # nothing to ask the model
    assert json.loads((out / "maps" / "empty" / "scores.json").read_text())["class_ids"] == []
    m = evaluate(out, progress=False)
    # every pixel is predicted background and is background: IoU 1 for the only class present
    assert (
        m["elbo"]["mIoU"] == pytest.approx(100.0)
        and m["baseline"]["per_class"]["background"]["gt_pixels"] == 48
    )
