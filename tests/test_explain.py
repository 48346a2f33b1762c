"""Explore one image (issue 15): the figure API on HeatmapResult, and `python -m elbo_t2ialign.explain`
on the bundled testbed model (few timesteps): word and phrase positions, errors, files, captions."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_aligner
from PIL import Image
from transformers import CLIPTokenizer

from elbo_t2ialign import explain
from elbo_t2ialign.captions import BlipCaptioner
from elbo_t2ialign.explain import ExplainError
from elbo_t2ialign.testbed import world

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "elbo_t2ialign" / "testbed" / "model"
FAST = ["elbo.elbo_timesteps=[101,501]", "elbo.collect_timesteps=[100]"]
PROMPT = "a photo of a square and a triangle"


def _rgb(w=24, h=20, seed=0):
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype(np.uint8))


# ---------------------------------------------------------------- figures


@pytest.fixture(scope="module")
def small_result():
    aligner = tiny_aligner("sd", elbo_timesteps=[1, 501], collect_timesteps=[20])
    image = _rgb()
    return image, aligner.heatmaps(image, ["cat", "red car"])


def test_plot_has_a_row_per_word_with_the_image_and_three_overlays(small_result):
    import matplotlib.pyplot as plt

    image, res = small_result
    before = plt.get_fignums()
    fig = res.plot(image)
    assert plt.get_fignums() == before  # nothing registered with pyplot
    axes = fig.axes
    assert len(axes) == 2 * 4
    titles = [ax.get_title() for ax in axes]
    for row, word in enumerate(["cat", "red car"]):
        tau, elbo = res.tau[word], res.losses[word]
        assert titles[4 * row : 4 * row + 4] == [
            f"'{word}' (tokens {res.token_positions[word]})",
            "baseline (tau 1)",
            f"ELBO-calibrated: tau {tau:.3g}, loss {elbo:.4g}",
            "cross-attention",
        ]
    assert fig.get_suptitle() == "a photo of cat, red car"
    # the image under every panel, the map of each kind over it
    np.testing.assert_array_equal(axes[0].images[0].get_array(), np.asarray(image))
    assert len(axes[0].images) == 1
    for ax, maps in zip(axes[5:8], (res.baseline_heatmaps, res.heatmaps, res.cross), strict=True):
        np.testing.assert_array_equal(ax.images[0].get_array(), np.asarray(image))
        np.testing.assert_array_equal(ax.images[1].get_array(), maps["red car"])
        assert ax.images[1].get_alpha() == 0.5 and ax.images[1].get_clim() == (0.0, 1.0)
    assert len(res.plot(image, names=["cat"], kinds=["elbo"], title="x").axes) == 2


def test_overlay_draws_one_map_over_the_image(small_result):
    image, res = small_result
    fig = res.overlay("cat", image, kind="cross", alpha=0.3, cmap="magma")
    (ax,) = fig.axes
    base, heat = ax.images
    np.testing.assert_array_equal(base.get_array(), np.asarray(image))
    np.testing.assert_array_equal(heat.get_array(), res.cross["cat"])
    assert heat.get_alpha() == 0.3 and heat.get_cmap().name == "magma"
    assert ax.get_title() == "cat: cross-attention"
    # into given axes, with the single-word result of an ELBO that was not needed
    single = tiny_aligner("sd", elbo_timesteps=[1, 501], collect_timesteps=[20]).heatmaps(image, ["cat"])
    target = fig.add_subplot(2, 1, 2)
    assert single.overlay("cat", np.asarray(image), ax=target) is fig
    assert target.get_title() == "cat: ELBO-calibrated: tau 1, loss not computed"
    with pytest.raises(ValueError, match=r"the maps are 24x20 \(WxH\) but the image is 20x24"):
        res.overlay("cat", image.transpose(Image.Transpose.TRANSPOSE))
    with pytest.raises(KeyError, match=r"no map for 'dog'; this result has maps for \['cat', 'red car'\]"):
        res.overlay("dog", image)
    with pytest.raises(ValueError, match="kind must be one of"):
        res.overlay("cat", image, kind="heat")


# ---------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """Scene val_00003 of the shapes world (a square and a triangle) as a PNG file."""
    s = world.generate(3, "val")
    assert sorted(s.classes) == ["square", "triangle"]
    path = tmp_path_factory.mktemp("img") / "scene.png"
    Image.fromarray(s.image).save(path)
    return path


@pytest.fixture(scope="module")
def bundled(tmp_path_factory):
    """(config, aligner) of the default command config with few timesteps; the model loaded once."""
    out = tmp_path_factory.mktemp("runs")
    conf = explain.compose([*FAST, f"output_dir={out}"])
    assert conf["model"]["id"] == "elbo_t2ialign/testbed/model" and conf["elbo"]["self_weights_1"] == [
        0,
        1,
        0,
    ]
    return conf, explain.load_aligner(conf, explain._options(conf))


def token_positions(prompt, word):
    """Brute force: where the word's tokens occur as a run in the prompt's tokens (testbed tokenizer)."""
    tok = CLIPTokenizer.from_pretrained(MODEL / "tokenizer")
    ids, sub = tok(prompt).input_ids, tok(word, add_special_tokens=False).input_ids
    starts = [i for i in range(len(ids) - len(sub) + 1) if ids[i : i + len(sub)] == sub]
    return list(range(starts[0], starts[0] + len(sub)))


def test_words_and_phrases_of_a_prompt(bundled, sample):
    conf, aligner = bundled
    info = explain.run(conf, str(sample), ["a square", "triangle"], prompt=PROMPT, aligner=aligner)
    assert info["token_positions"] == {
        "a square": token_positions(PROMPT, "a square"),
        "triangle": token_positions(PROMPT, "triangle"),
    }
    assert info["token_positions"]["a square"] == [4, 5]  # BOS a photo of | a square
    assert info["prompts"]["collect"] == PROMPT and info["mode"] == "prompt"
    folder = Path(info["folder"])
    assert json.loads((folder / "result.json").read_text())["token_positions"] == info["token_positions"]
    # the files hold the API's maps for the same call
    direct = aligner.heatmaps(
        sample,
        ["a square", "triangle"],
        prompt=PROMPT,
        elbo_timesteps=[101, 501],
        collect_timesteps=[100],
    )
    assert info["tau"] == direct.tau and info["losses"] == direct.losses
    # tokens.npy: every token's attention; a word's cross map is the min-max of its columns' mean
    tokens = np.load(folder / "tokens.npy")
    assert tokens.shape[0] == 1 and tokens.shape[-1] == 20 and info["collect_prompts"] == [PROMPT]
    own = tokens[0][..., info["token_positions"]["triangle"]].mean(-1).ravel()
    own = (own - own.min()) / (own.max() - own.min() + 1e-10)
    np.testing.assert_allclose(own, direct.evidence.cross["triangle"].numpy(), atol=1e-6)
    assert sorted(direct.tau.values())[-1] == pytest.approx(3.0)  # strength 3 of elbo=shapes
    for tag, maps in (
        ("baseline", direct.baseline_heatmaps),
        ("elbo", direct.heatmaps),
        ("cross", direct.cross),
    ):
        saved = np.load(folder / f"a_square.{tag}.npy")
        np.testing.assert_array_equal(saved, maps["a square"])
        png = np.asarray(Image.open(folder / f"a_square.{tag}.png"))
        np.testing.assert_array_equal(png, np.round(saved * 255).astype(np.uint8))
    assert png.shape == (64, 64)


def test_class_names_go_into_the_template(bundled, sample):
    conf, aligner = bundled
    info = explain.run(conf, str(sample), ["triangle", "square"], aligner=aligner)
    assert info["prompts"] == {
        "triangle": "a photo of triangle",
        "square": "a photo of square",
        "collect": "a photo of triangle, square",
    }
    assert info["token_positions"] == {"triangle": [4], "square": [6]} and info["mode"] == "classes"


def test_bad_input_is_one_error_and_writes_nothing(bundled, sample):
    conf, aligner = bundled
    root = Path(conf["output_dir"])
    before = sorted(root.iterdir())
    cases = [
        (
            dict(words=["square", "heart"], prompt=PROMPT),
            r"^cannot locate 'heart' in prompt 'a photo of a square and a triangle'",
        ),
        (dict(words=[]), "give at least one word"),
        (dict(words=["square"], prompt=PROMPT, caption=True), "give --prompt or --caption, not both"),
        (dict(words=["square"], prompt="  "), "--prompt is empty"),
        (dict(words=["square", "square"]), r"duplicate class names in \['square', 'square'\]"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ExplainError, match=message) as err:
            explain.run(conf, str(sample), aligner=aligner, **kwargs)
        assert "\n" not in str(err.value)
    with pytest.raises(ExplainError, match=r"image file not found: .*missing\.png"):
        explain.run(conf, str(sample.parent / "missing.png"), ["square"], aligner=aligner)
    with pytest.raises(ExplainError, match=r"in elbo: strength must be a finite number > 0"):
        explain.run(conf | {"elbo": conf["elbo"] | {"strength": 0}}, str(sample), ["square"], aligner=aligner)
    assert sorted(root.iterdir()) == before
    with pytest.raises(
        ExplainError, match=r"elbo.strenght is not a setting .* \(did you mean elbo.strength\?\)"
    ):
        explain.compose(["elbo.strenght=2"])


def test_arguments_split_into_words_and_overrides():
    args, words, overrides = explain.parse_args(
        [
            "img.png",
            "cat",
            "red sofa",
            "--prompt",
            "a cat on a red sofa",
            "model=sd15",
            "elbo.strength=2",
            "+x.y=1",
        ]
    )
    assert (args.image, args.prompt, args.caption) == ("img.png", "a cat on a red sofa", False)
    assert words == ["cat", "red sofa"] and overrides == ["model=sd15", "elbo.strength=2", "+x.y=1"]
    assert explain.with_words("a photo of a cat on a sofa", ["cat", "dog", "so"]) == (
        "a photo of a cat on a sofa, dog, so",
        ["dog", "so"],
    )
    assert explain.file_names(["red sofa", "red_sofa", "a/b"]) == {
        "red sofa": "red_sofa",
        "red_sofa": "red_sofa-2",
        "a/b": "a_b",
    }


def test_caption_prompt_and_its_cache(tmp_path, sample, capsys):
    cache = tmp_path / "captions.json"
    argv = [
        str(sample),
        "square",
        "triangle",
        "--caption",
        *FAST,
        f"output_dir={tmp_path / 'out'}",
        "caption.model=tiny",
        "caption.max_new_tokens=3",
        f"caption.cache={cache}",
    ]
    assert explain.main(argv) == 0
    first = capsys.readouterr().out
    info = json.loads((tmp_path / "out" / "scene-1" / "result.json").read_text())
    expected = BlipCaptioner.from_pretrained("tiny", max_new_tokens=3).caption(Image.open(sample))
    assert info["caption"] == expected and info["caption_from_cache"] is False
    missing = [w for w in ("square", "triangle") if w not in expected.split()]
    assert info["prompts"]["collect"] == ", ".join([expected, *missing])
    assert first.startswith(f"caption: {expected}")
    assert explain.main(argv) == 0
    assert capsys.readouterr().out.startswith(f"caption (from the cache): {expected}")
    assert len(json.loads(cache.read_text())) == 1


def test_command_end_to_end_on_the_bundled_model(tmp_path, sample, bundled):
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "elbo_t2ialign.explain",
        str(sample),
        "square",
        "triangle",
        *FAST,
        f"output_dir={tmp_path}",
        "dpi=50",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    folder = tmp_path / "scene-1"
    assert f"figure: {folder / 'figure.png'}" in done.stdout.splitlines()
    lines = {line.split()[0]: line for line in done.stdout.splitlines() if line.startswith("  ")}
    info = json.loads((folder / "result.json").read_text())
    assert lines["square"].split() == [
        "square",
        "tokens",
        "[4]",
        "loss",
        f"{info['losses']['square']:.5g}",
        "tau",
        f"{info['tau']['square']:.3g}",
    ]
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["figure.png", "result.json", "tokens.npy"]
        + [
            f"{w}.{t}.{e}"
            for w in ("square", "triangle")
            for t in ("elbo", "baseline", "cross")
            for e in ("npy", "png")
        ]
    )
    with Image.open(folder / "figure.png") as fig:
        assert fig.size == (
            4 * 130,
            round((2 * 2.6 + 0.5) * 50),
        )  # 4 panels of 2.6 in, 2 rows + title, 50 dpi
    kept = (folder / "square.elbo.npy").read_bytes()

    conf, aligner = bundled
    again = explain.run(
        conf | {"output_dir": str(tmp_path)}, str(sample), ["square", "triangle"], aligner=aligner
    )
    assert again["folder"] == str(tmp_path / "scene-2") and (tmp_path / "scene-2" / "figure.png").is_file()
    assert (folder / "square.elbo.npy").read_bytes() == kept  # a new folder; the first is untouched

    bad = subprocess.run(
        [*cmd[:4], "square", "heart", "--prompt", PROMPT, *cmd[6:]],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: cannot locate 'heart' in prompt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scene-1", "scene-2"]
