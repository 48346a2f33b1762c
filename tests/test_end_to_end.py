"""The real core inside the segmentation runner: a tiny SD-like model over a fixture dataset,
then the evaluator. The maps are meaningless (random weights); the plumbing is not."""

import json

import numpy as np
from conftest import tiny_aligner
from PIL import Image

from elbo_t2ialign.devtools.fixtures import fixture_config, random_samples, write_dataset
from elbo_t2ialign.segmentation import evaluate, run

CLASSES = ["cat", "dog", "bird"]


def test_tiny_model_through_runner_and_evaluator(tmp_path):
    data = write_dataset(tmp_path / "data", CLASSES, random_samples(CLASSES, 3, convention="voc"))
    aligner = tiny_aligner("sd", elbo_timesteps=[1, 501], collect_timesteps=[20, 100])
    out = run(fixture_config(data, tmp_path / "run", "voc", progress=False), aligner=aligner)

    scores = json.loads((out / "maps" / "img_001" / "scores.json").read_text())
    image = Image.open(data / "images" / "img_001.png")
    direct = aligner.heatmaps(image, scores["classes"], seed=1)  # the runner's seed: cfg.seed + index
    for name, cid in zip(scores["classes"], scores["class_ids"], strict=True):
        for variant, maps in (("elbo", direct.heatmaps), ("baseline", direct.baseline_heatmaps)):
            stored = np.asarray(Image.open(out / "maps" / "img_001" / f"{variant}_{cid:03d}.png")) / 255.0
            assert stored.shape == maps[name].shape == (image.height, image.width)
            assert np.abs(stored - maps[name]).max() <= 0.5 / 255 + 1e-5
        assert scores["tau"][name] == direct.tau[name]

    metrics = evaluate(out, progress=False, overlays=1)
    for variant in ("elbo", "baseline"):
        assert 0.0 <= metrics[variant]["mIoU"] <= 100.0 and 0.0 < metrics[variant]["threshold"] < 1.0
    assert (out / "metrics.md").is_file() and (out / "metrics.json").is_file()
    assert any((out / "plots").glob("*.png"))
