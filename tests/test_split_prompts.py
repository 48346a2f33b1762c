"""Class lists longer than the text encoder's context (elbo.prompt_overflow): split over several
collection prompts, refused, or truncated; on the bundled testbed model (20-token context)."""

import itertools
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import FAMILIES, tiny_aligner
from PIL import Image

from elbo_t2ialign.core.aligner import PromptTooLong, _split
from elbo_t2ialign.testbed import train, world

needs_model = pytest.mark.skipif(
    not (train.DEFAULT_MODEL_DIR / "model_index.json").is_file(), reason="no committed testbed model"
)
# 15 template tokens + BOS + EOS: two one-token classes and a comma fill the 20 tokens, a third does not
LONG = "a photo of a photo of a photo of a photo of a photo of {}"
FAST = {"elbo_timesteps": [101, 501, 901], "collect_timesteps": [20, 100, 200]}
SHAPES = {"self_weights_1": [0, 1, 0], "self_weights_2": [0, 1, 0]}  # configs/elbo/shapes.yaml


@pytest.mark.parametrize("seed", range(30))
def test_split_gives_the_fewest_contiguous_runs_as_even_as_fit(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 8))
    widths, limit = rng.integers(1, 5, n), int(rng.integers(4, 10))

    def fits(a, b):  # a prompt holds classes a..b-1 when their widths (plus commas) fit
        return int(widths[a:b].sum()) + (b - a - 1) <= limit

    runs = _split(n, fits)
    assert runs[0][0] == 0 and runs[-1][1] == n
    assert all(b0 == a1 for (_, b0), (a1, _) in itertools.pairwise(runs))
    assert all(fits(a, b) for a, b in runs)
    fewest = min(  # brute force over every way to cut the list
        len(cuts) + 1
        for k in range(n)
        for cuts in itertools.combinations(range(1, n), k)
        if all(fits(a, b) for a, b in itertools.pairwise([0, *cuts, n]))
    )
    assert len(runs) == fewest
    sizes = [b - a for a, b in runs]
    even = [n // fewest + (i < n % fewest) for i in range(fewest)]
    evens_fit = all(fits(a, b) for a, b in itertools.pairwise(np.cumsum([0, *even]).tolist()))
    assert sizes == even if evens_fit else True


@pytest.fixture(scope="module")
def testbed():
    from elbo_t2ialign import Aligner

    aligner = Aligner.from_pretrained(str(train.DEFAULT_MODEL_DIR), device="cpu", **SHAPES, **FAST)
    scene = next(s for s in (world.generate(i, "val") for i in range(50)) if len(s.objects) == 3)
    return aligner, scene.image, [o.cls for o in scene.objects]


def _forwards(aligner):
    """Samples sent through the denoiser, counted by a forward hook."""
    seen = []
    handle = aligner.adapter.denoiser.register_forward_hook(
        lambda m, args, out: seen.append(args[0].shape[0])
    )
    return seen, handle


@needs_model
def test_split_maps_equal_separate_runs_of_each_prompt(testbed):
    aligner, image, classes = testbed
    res = aligner.heatmaps(image, classes, collect_prompt=LONG)
    ev = res.evidence
    first, second = classes[:2], classes[2:]
    assert ev.collect_prompts == [LONG.format(", ".join(first)), LONG.format(second[0])]
    assert res.prompt_of == {classes[0]: 0, classes[1]: 0, classes[2]: 1}
    assert ev.tokens.shape == (2, 32 * 32, 20) and ev.refine_first.shape == (2, 1024, 1024)
    # the losses do not depend on the collection prompt: those of the one-prompt default template
    one = aligner.heatmaps(image, classes)
    assert one.evidence.collect_prompts == [f"a photo of {', '.join(classes)}"]
    np.testing.assert_allclose([res.losses[c] for c in classes], [one.losses[c] for c in classes], rtol=1e-6)
    # tau across all three classes, by hand
    losses = np.array([res.losses[c] for c in classes])
    tau = 3.0 ** ((losses - losses.min()) / (losses.max() - losses.min()))
    for g, members in enumerate((first, second)):
        sep = aligner.heatmaps(image, members, prompt=ev.collect_prompts[g], strength=1.0)
        for c in members:
            np.testing.assert_allclose(res.cross[c], sep.cross[c], atol=1e-5)
            np.testing.assert_allclose(res.baseline_heatmaps[c], sep.baseline_heatmaps[c], atol=1e-5)
            # calibrated: the separate run's cross map ** tau, then its S2 @ (S1 @ a), resized, min-max
            s1, s2 = sep.evidence.refine_first[0].double(), sep.evidence.refine_second[0].double()
            a = s2 @ (s1 @ sep.evidence.cross[c].double() ** float(tau[classes.index(c)]))
            grid = F.interpolate(a.reshape(1, 1, 32, 32), size=(64, 64), mode="bilinear", align_corners=False)
            want = ((grid - grid.min()) / (grid.max() - grid.min()))[0, 0].numpy()
            np.testing.assert_allclose(res.heatmaps[c], want, atol=1e-4)


@needs_model
def test_refuse_and_truncate(testbed):
    aligner, image, classes = testbed
    seen, handle = _forwards(aligner)
    try:
        with pytest.raises(PromptTooLong, match=r"22 tokens but the text encoder takes at most 20"):
            aligner.heatmaps(image, classes, collect_prompt=LONG, prompt_overflow="refuse")
    finally:
        handle.remove()
    assert seen == []  # refused before any forward
    res = aligner.heatmaps(image, classes, collect_prompt=LONG, prompt_overflow="truncate")
    ev = res.evidence
    # one prompt, cut by the text encoder after 19 tokens (EOS last): the third class is gone
    assert ev.collect_prompts == [LONG.format(", ".join(classes))] and ev.truncated == [classes[2]]
    assert ev.token_positions[classes[1]] == [18] and ev.token_positions[classes[2]] == []
    for maps in (res.heatmaps, res.baseline_heatmaps, res.cross):
        assert not maps[classes[2]].any() and all(maps[c].max() == 1.0 for c in classes[:2])
    # the kept classes' maps are those of the truncated prompt's own attention
    cut = aligner.adapter.pipe.tokenizer.decode(aligner.adapter.token_ids(ev.collect_prompts[0])[1:19])
    sep = aligner.heatmaps(image, classes[:2], prompt=cut, strength=1.0)
    for c in classes[:2]:
        np.testing.assert_allclose(res.cross[c], sep.cross[c], atol=1e-5)


@needs_model
def test_max_prompt_classes_splits_a_fitting_list(testbed):
    aligner, image, classes = testbed
    res = aligner.heatmaps(image, classes, max_prompt_classes=1, strength=1.0)
    assert res.evidence.collect_prompts == [f"a photo of {c}" for c in classes]
    alone = aligner.heatmaps(image, [classes[1]], strength=1.0)
    np.testing.assert_allclose(
        res.baseline_heatmaps[classes[1]], alone.baseline_heatmaps[classes[1]], atol=1e-5
    )


def _segment(tmp_path, *overrides):
    from hydra import compose, initialize_config_dir

    from elbo_t2ialign.cli import hydra_config_dir, to_container
    from elbo_t2ialign.segmentation import run

    world.ensure_dataset(tmp_path / "datasets" / "shapes")
    base = [
        "model=shapes",
        "dataset=shapes",
        "elbo=shapes",
        "device=cpu",
        "num_images=6",
        "progress=false",
        f"datasets_dir={tmp_path / 'datasets'}",
        f"elbo.collect_prompt='{LONG}'",
        "elbo.elbo_timesteps=[101,501,901]",
        "elbo.collect_timesteps=[20,100,200]",
    ]
    with initialize_config_dir(config_dir=hydra_config_dir(), version_base="1.3"):
        conf = to_container(compose("segment", overrides=[*base, *overrides]))
    return run(conf)


@needs_model
def test_segment_splits_an_image_whose_classes_do_not_fit(tmp_path):
    out = _segment(tmp_path, f"output_dir={tmp_path / 'split'}", "save_token_maps=true")
    images = sorted(p for p in (out / "maps").iterdir() if p.is_dir())
    assert len(images) == 6
    split = 0
    for folder in images:
        scores = json.loads((folder / "scores.json").read_text())
        n = len(scores["classes"])
        prompts = scores["collect_prompts"]
        assert len(prompts) == (2 if n == 3 else 1)  # 3 classes overflow the 20 tokens, 2 fit
        split += len(prompts) == 2
        for cid, c in zip(scores["class_ids"], scores["classes"], strict=True):
            assert c in prompts[scores["prompt_of"][c]].split(" of ")[-1].split(", ")
            for variant in ("elbo", "baseline"):
                assert (folder / f"{variant}_{cid:03d}.png").is_file()
        tokens = np.load(folder / "tokens.npy")
        assert tokens.shape == (len(prompts), 32, 32, 20) and tokens.dtype == np.float32
    assert split >= 1

    refused = _segment(tmp_path, f"output_dir={tmp_path / 'refuse'}", "elbo.prompt_overflow=refuse")
    skipped = {p.stem: json.loads(p.read_text()) for p in (refused / "skipped").glob("*.json")}
    assert len(skipped) == split and all("at most 20" in s["error"] for s in skipped.values())

    cut = _segment(tmp_path, f"output_dir={tmp_path / 'truncate'}", "elbo.prompt_overflow=truncate")
    for folder in sorted(p for p in (cut / "maps").iterdir() if p.is_dir()):
        scores = json.loads((folder / "scores.json").read_text())
        assert len(scores["collect_prompts"]) == 1
        lost = scores.get("truncated", [])
        assert lost == (scores["classes"][2:] if len(scores["classes"]) == 3 else [])
        for c in lost:
            cid = scores["class_ids"][scores["classes"].index(c)]
            assert not np.asarray(Image.open(folder / f"elbo_{cid:03d}.png")).any()
        assert not (folder / "tokens.npy").exists()  # save_token_maps is off by default


def test_split_batches_every_prompt_in_one_recorder_pass():
    """Two prompts, ten timesteps, batch 8: 20 samples in 3 forwards, not 2 x 2."""
    aligner = tiny_aligner("sd", collect_timesteps=list(range(10, 101, 10)), batch_size=8)
    seen, handle = _forwards(aligner)
    try:
        res = aligner.heatmaps(
            np.zeros((32, 32, 3), np.uint8), ["cat", "dog"], max_prompt_classes=1, strength=1.0
        )
    finally:
        handle.remove()
    assert res.evidence.collect_prompts == ["a photo of cat", "a photo of dog"]
    assert seen == [8, 8, 4]
    assert torch.isfinite(res.evidence.tokens).all()


@needs_model
def test_a_phrase_file_prompt_that_does_not_fit_is_split_by_class(tmp_path):
    """Phrases "a photo of a <class>": three of them overflow the 20 tokens in one prompt, so the
    runner leaves the phrase-file prompt and the aligner splits the phrases over template prompts."""
    world.ensure_dataset(tmp_path / "datasets" / "shapes")
    names = (tmp_path / "datasets" / "shapes" / "val_id.txt").read_text().split()[:6]
    (tmp_path / "phrases").mkdir()
    for name in names:
        classes = sorted({o.cls for o in world.generate(int(name.split("_")[-1]), "val").objects})
        entry = {"subject": classes, "phrase": [f"a photo of a {c}" for c in classes]}
        (tmp_path / "phrases" / f"{name}.json").write_text(json.dumps(entry))
    out = _segment(
        tmp_path,
        f"output_dir={tmp_path / 'run'}",
        "elbo.collect_prompt='a photo of {}'",
        f"dataset.phrase_path='{tmp_path}/phrases/{{img_name}}.json'",
    )
    seen = set()
    for name in names:
        scores = json.loads((out / "maps" / name / "scores.json").read_text())
        assert scores["phrase_source"] == "phrase_file"
        n = len(scores["classes"])
        seen.add(n)
        if n == 3:  # 22 tokens in one prompt: split, the phrases in the template
            assert "prompt" not in scores and len(scores["collect_prompts"]) == 2
            assert scores["collect_prompts"][1] == f"a photo of {scores['phrases'][2]}"
        else:  # fits: the reference's prompt of every phrase
            assert scores["collect_prompts"] == [scores["prompt"]]
    assert 3 in seen


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_splits_into_prompt_groups_that_equal_separate_runs(family):
    """The recorder's prompt groups in every family's capture (softmax attention, and Sana's linear
    self-attention): one prompt per class, collected in one pass, gives each prompt the token maps and
    self-attention matrices of a run of that prompt alone. (The evidence is compared, not the
    min-max-normalised maps: a random tiny model's refined maps are nearly flat, so normalising
    magnifies float rounding to 1e-3.)"""
    aligner = tiny_aligner(family, collect_timesteps=[100, 300], elbo_timesteps=[101, 501])
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    classes = ["cat", "dog"]
    res = aligner.heatmaps(image, classes, max_prompt_classes=1, strength=1.0)
    ev = res.evidence
    assert ev.collect_prompts == [f"a photo of {c}" for c in classes]
    for g, c in enumerate(classes):
        alone = aligner.heatmaps(image, [c], strength=1.0)
        np.testing.assert_allclose(res.cross[c], alone.cross[c], atol=1e-5)
        torch.testing.assert_close(ev.tokens[g], alone.evidence.tokens[0], rtol=1e-4, atol=1e-6)
        for split, single in (
            (ev.refine_first, alone.evidence.refine_first),
            (ev.refine_second, alone.evidence.refine_second),
        ):
            assert (split is None) == (single is None)
            if split is not None:
                torch.testing.assert_close(split[g], single[0], rtol=1e-4, atol=1e-6)
