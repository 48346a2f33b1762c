"""The testbed's measurements go through the core: their parts against direct computations."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from elbo_t2ialign.core import calibrate, capture
from elbo_t2ialign.core.adapters.base import cat_cond
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
    evidence = aligner.observe(image, classes, seed=7)
    rec = aligner.record(image, evidence.prompts["collect"], seed=7)

    weights = capture.layer_weights(aligner.layers, aligner.options)["cross"]
    res = evidence.grid
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
        own = total[:, evidence.token_positions[c]].mean(1)
        expected = (own - own.min()) / (own.max() - own.min())
        torch.testing.assert_close(evidence.cross[c], expected, atol=2e-5, rtol=0)
    # and the positions measure uses are the method's
    start = calibrate.template_start(aligner.adapter.token_ids, aligner.options.collect_prompt)
    found = calibrate.class_token_positions(
        aligner.adapter.token_ids, evidence.prompts["collect"], classes, start
    )
    assert found == evidence.token_positions


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


@needs_model
def test_attention_mass_is_a_direct_sum_over_each_layers_token_columns():
    """Two scenes with two classes: measure's per-layer and finest-layer own-class mass equal a
    direct computation: the collection passes run by hand (the noise `observe` draws for the seed)
    under the adapter's per-layer recorder, each class's token column counted by hand in
    'a photo of c1, c2' (BOS, a, photo, of, c1, ",", c2: columns 4 and 6), an object's cells taken
    as those whose pixels are mostly that object."""
    aligner = measure.load(train.DEFAULT_MODEL_DIR)
    samples = [s for s in (world.generate(i, split="val") for i in range(8)) if len(set(s.classes)) == 2][:2]
    seed = 11
    got = measure.attention_mass(aligner, samples, seed=seed)

    ad, opts = aligner.adapter, aligner.options
    cross_layers = [layer for layer in ad.attention_layers() if layer.has_cross]
    finest = max(layer.resolution for layer in cross_layers)
    own: dict[str, list[float]] = {layer.name: [] for layer in cross_layers}
    other_fine: list[float] = []
    t = torch.tensor(opts.collect_timesteps)
    for i, s in enumerate(samples):
        classes = list(dict.fromkeys(s.classes))
        prompt = "a photo of " + ", ".join(classes)
        columns = [4, 6]
        assert ad.token_ids(prompt)[4:7] == [
            ad.token_ids(classes[0], False)[0],
            ad.token_ids(",", False)[0],
            ad.token_ids(classes[1], False)[0],
        ]
        z0 = ad.encode_image(Image.fromarray(s.image))
        gen = torch.Generator().manual_seed(seed + i)
        noise = torch.randn((len(t), *z0.shape[1:]), generator=gen)  # observe's collection noise
        cond = cat_cond([ad.encode_prompt(prompt)] * len(t))
        with ad.recorder({}, per_layer=True) as rec, torch.no_grad():
            ad.predict(ad.schedule.add_noise(z0, noise, t), t, cond)
        for layer in cross_layers:
            probs = rec.layer_mean(layer.name, "cross").numpy()  # (r*r, L), rows sum to 1
            np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
            r = layer.resolution
            f = s.mask.shape[0] // r
            for k, c in enumerate(classes):
                c_id = world.CLASSES.index(c) + 1
                cells = [
                    y * r + x
                    for y in range(r)
                    for x in range(r)
                    if np.bincount(s.mask[y * f : (y + 1) * f, x * f : (x + 1) * f].ravel()).argmax() == c_id
                ]
                if not cells:
                    continue
                own[layer.name].append(float(probs[cells, columns[k]].mean()))
                if r == finest:
                    other_fine.append(float(probs[cells, columns[1 - k]].mean()))

    assert list(got["own_per_layer"]) == list(own)  # the adapter's cross layers, in network order
    for name, values in own.items():
        assert got["own_per_layer"][name] == pytest.approx(np.mean(values), abs=1e-5), name
    fine_own = [v for layer in cross_layers if layer.resolution == finest for v in own[layer.name]]
    assert got["finest"]["own"] == pytest.approx(np.mean(fine_own), abs=1e-5)
    assert got["finest"]["other classes"] == pytest.approx(np.mean(other_fine), abs=1e-5)
    assert sum(got["finest"].values()) == pytest.approx(1.0)
