"""CLIP score on a tiny CLIP built in code, and the evaluator of a generation run folder (method.md §7)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from elbo_t2ialign.cli import DamagedFileError
from elbo_t2ialign.devtools.tiny import tiny_clip
from elbo_t2ialign.generation.clipscore import ClipScoreError, ClipScorer
from elbo_t2ialign.generation.config import GenerationError, read_prompts
from elbo_t2ialign.generation.evaluate import evaluate, main

PROMPTS = ["a cat and a dog", "a red car", "a bird on a sofa"]


def images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.RandomState(seed)
    return [Image.fromarray(rng.randint(0, 256, (32, 32, 3)).astype(np.uint8)) for _ in range(n)]


def hand_scores(model, tokenizer, ims, prompts) -> list[float]:
    """100 * cos through CLIPModel.forward, with the pixels normalised by hand (32 px: no resize)."""
    mean, std = np.array([0.48145466, 0.4578275, 0.40821073]), np.array([0.26862954, 0.26130258, 0.27577711])
    pixels = torch.tensor(
        np.stack([(np.asarray(im) / 255.0 - mean) / std for im in ims]), dtype=torch.float32
    )
    out = []
    for k, prompt in enumerate(prompts):
        ids = tokenizer([prompt], return_tensors="pt").input_ids
        with torch.no_grad():
            logits = model(input_ids=ids, pixel_values=pixels[k : k + 1].permute(0, 3, 1, 2)).logits_per_image
            out.append(float(100 * logits[0, 0] / model.logit_scale.exp()))
    return out


def test_clip_score_equals_hand_computation():
    model, tok, proc = tiny_clip()
    ims = images(3)
    expected = hand_scores(model, tok, ims, PROMPTS)
    for batch in (1, 2, 32):
        got = ClipScorer(model, tok, proc, batch_size=batch).score(ims, PROMPTS)
        np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-4)
    assert len(set(np.round(expected, 3))) == 3  # three different numbers, not one constant


def test_long_prompt_is_a_clear_error_unless_truncated(caplog):
    scorer = ClipScorer(*tiny_clip())
    long = " ".join(["cat"] * 100)
    with pytest.raises(ClipScoreError, match=r"102 CLIP tokens .* at most 77.*--truncate"):
        scorer.score(images(1), [long])
    truncated = ClipScorer(*tiny_clip(), truncate=True).score(images(1), [long])
    expected = ClipScorer(*tiny_clip()).score(images(1), [" ".join(["cat"] * 75)])
    torch.testing.assert_close(truncated, expected)
    assert "scoring the first 77 tokens" in caplog.text


def fake_run(root, scores_seed: int = 0):
    """A run folder with prompts.json and 2 seeds x 3 prompts of each variant (prompt 2: elbo only)."""
    (root / "prompts.json").write_text(
        json.dumps([{"index": i, "prompt": p, "phrases": [p]} for i, p in enumerate(PROMPTS)])
    )
    ims = images(12, scores_seed)
    paths = {}
    for v, variant in enumerate(("elbo", "baseline")):
        (root / "images" / variant).mkdir(parents=True)
        for i in range(3 if variant == "elbo" else 2):
            for s in (4307, 4308):
                path = root / "images" / variant / f"{i:05d}_{s}.png"
                ims[v * 6 + i * 2 + s - 4307].save(path)
                paths[(variant, i, s)] = path
    return paths


def test_evaluate_run_folder_means_per_prompt_then_overall(tmp_path):
    paths = fake_run(tmp_path)
    model, tok, proc = tiny_clip()
    result = evaluate(tmp_path, ClipScorer(model, tok, proc, batch_size=4), grid=2)
    per = {
        k: hand_scores(model, tok, [Image.open(p).convert("RGB")], [PROMPTS[k[1]]])[0]
        for k, p in paths.items()
    }
    for variant, n in (("elbo", 3), ("baseline", 2)):
        prompt_means = [(per[(variant, i, 4307)] + per[(variant, i, 4308)]) / 2 for i in range(n)]
        got = result["variants"][variant]
        np.testing.assert_allclose([got["per_prompt"][str(i)] for i in range(n)], prompt_means, atol=1e-4)
        np.testing.assert_allclose(got["clip_score"], np.mean(prompt_means), atol=1e-4)
        assert got["num_images"] == 2 * n
    e = np.mean([result["variants"]["elbo"]["per_prompt"][k] for k in ("0", "1")])
    b = result["variants"]["baseline"]["clip_score"]
    assert result["paired"]["num_prompts"] == 2
    np.testing.assert_allclose(result["paired"]["delta"], e - b, atol=1e-6)
    assert (
        json.loads((tmp_path / "clip_scores.json").read_text())["paired"]["delta"]
        == result["paired"]["delta"]
    )
    md = (tmp_path / "clip_scores.md").read_text()
    assert f"**delta {e - b:+.2f}**" in md and "| 2 | a bird on a sofa |" in md
    assert Image.open(tmp_path / "grid.png").size == (512, 2 * (256 + 34))


def test_unreadable_image_names_the_file(tmp_path):
    paths = fake_run(tmp_path)
    paths[("baseline", 1, 4308)].write_bytes(b"not a png")
    with pytest.raises(
        DamagedFileError, match=r"00001_4308\.png is damaged \(.*rerun the generation command"
    ):
        evaluate(tmp_path, ClipScorer(*tiny_clip()))


def test_cli_reports_errors_without_traceback(tmp_path, capsys):
    assert main([str(tmp_path), "--clip", "tiny"]) == 2
    assert "not a generation run folder" in capsys.readouterr().err
    fake_run(tmp_path)
    assert main([str(tmp_path), "--clip", "tiny", "--device", "cpu"]) == 0
    assert "delta (ELBO - baseline)" in capsys.readouterr().out


def test_empty_prompt_file_is_a_clear_error(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(GenerationError, match="holds no prompts"):
        read_prompts(empty)
    (tmp_path / "two.txt").write_text("a cat\n\n a dog \n")
    assert read_prompts(tmp_path / "two.txt") == ["a cat", "a dog"]
