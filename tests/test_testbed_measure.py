"""The testbed's measurements go through the core: their parts against direct computations."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from elbo_t2ialign.core import calibrate, capture
from elbo_t2ialign.testbed import measure, train, world

needs_model = pytest.mark.skipif(
    not (train.DEFAULT_MODEL_DIR / "model_index.json").is_file(), reason="no committed testbed model"
)


def test_token_mass_is_the_mean_row_sum_over_each_objects_pixels():
    rng = np.random.default_rng(0)
    probs = rng.random((16, 9))
    probs /= probs.sum(1, keepdims=True)  # rows are probabilities over 9 tokens
    gt = rng.choice([0, 3, 5], size=16)
    positions = [[4], [6, 7]]  # class 3: token 4; class 5: tokens 6 and 7
    got = measure.token_mass(probs, gt, [3, 5], positions)
    for (c_id, own, other), pos, rest in zip(got, positions, ([6, 7], [4]), strict=True):
        pixels = [i for i in range(16) if gt[i] == c_id]
        assert own == pytest.approx(np.mean([sum(probs[i, p] for p in pos) for i in pixels]))
        assert other == pytest.approx(np.mean([sum(probs[i, p] for p in rest) for i in pixels]))
    assert [c for c, _, _ in got] == [3, 5]


def test_downsample_mask_takes_the_majority_label_of_each_cell():
    mask = np.zeros((4, 4), int)
    mask[:2, :2] = [[1, 1], [1, 2]]  # top-left cell: three 1s
    mask[2:, 2:] = 2
    assert measure.downsample_mask(mask, 2).tolist() == [[1, 0], [0, 2]]


@needs_model
def test_recorded_layers_reproduce_the_methods_class_maps():
    """Aligner.record keeps every layer; their Gaussian-weighted average, resized by hand, gives the
    cross maps the method itself aggregated (Evidence.cross) for the same image, prompt and seed."""
    aligner = measure.load(train.DEFAULT_MODEL_DIR)
    sample = world.generate(3, split="val")
    classes = list(dict.fromkeys(sample.classes))
    image = Image.fromarray(sample.image)
    evidence, info = aligner.observe(image, classes, seed=7)
    rec = aligner.record(image, info["prompts"]["collect"], seed=7)

    weights = capture.layer_weights(aligner.layers, aligner.options)["cross"]
    res = evidence.res
    total = torch.zeros(res * res, aligner.adapter.text_length)
    for layer in aligner.layers:
        if weights.get(layer.name, 0.0) == 0.0:
            continue
        mean = rec.layer_mean(layer.name, "cross")  # (r*r, L)
        grid = mean.T.reshape(1, -1, layer.resolution, layer.resolution)
        grid = F.interpolate(grid, size=(res, res), mode="bilinear", align_corners=False)
        total += weights[layer.name] * grid.reshape(mean.shape[1], -1).T
    total /= sum(weights.values())
    for c in classes:
        own = total[:, info["positions"][c]].mean(1)
        expected = (own - own.min()) / (own.max() - own.min())
        torch.testing.assert_close(evidence.cross[c], expected, atol=2e-5, rtol=0)
    # and the positions measure uses are the method's
    start = calibrate.template_start(aligner.adapter.token_ids, aligner.options.collect_prompt)
    found = calibrate.class_token_positions(
        aligner.adapter.token_ids, info["prompts"]["collect"], classes, start
    )
    assert found == info["positions"]


@needs_model
def test_loss_gap_rows_are_the_diffusion_losses_of_each_caption():
    """Two images: the table's 'right' row equals a direct noising and prediction per level."""
    aligner = measure.load(train.DEFAULT_MODEL_DIR)
    samples = [s for s in (world.generate(i, split="val") for i in range(8)) if len(s.objects) >= 2][:2]
    levels = (100, 700)
    gap = measure.loss_gap(aligner, samples, levels=levels, seed=5)
    ad = aligner.adapter
    gen = torch.Generator().manual_seed(5)
    expected = np.zeros(len(levels))
    for s in samples:
        z0 = ad.encode_image(Image.fromarray(s.image))
        noise = torch.randn((len(levels), *z0.shape[1:]), generator=gen)
        cond = ad.encode_prompt(world.caption(s.classes))
        for j, t in enumerate(levels):
            tt = torch.tensor([t])
            z_t = ad.schedule.add_noise(z0, noise[j : j + 1], tt)
            with torch.no_grad():
                pred = ad.predict(z_t, tt, cond)
            expected[j] += float(((ad.schedule.target(z0, noise[j : j + 1], tt) - pred) ** 2).mean())
    np.testing.assert_allclose(gap["loss"]["right"], expected / len(samples), rtol=1e-4)
    assert gap["images"] == 2
