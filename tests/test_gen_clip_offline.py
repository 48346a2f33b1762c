"""Offline CLIP scoring (issue 15): `--clip FOLDER` loads a CLIP saved on disk; the default hub model,
unreachable offline, is one error line that says how to get the folder."""

import json

import pytest
from test_gen_clipscore import fake_run

from elbo_t2ialign.devtools.tiny import tiny_clip
from elbo_t2ialign.generation.clipscore import DEFAULT_CLIP, ClipScoreError, ClipScorer
from elbo_t2ialign.generation.evaluate import main


def test_clip_folder_scores_as_the_model_it_holds(tmp_path):
    folder = tmp_path / "clip"
    model, tokenizer, processor = tiny_clip()
    for part in (model, tokenizer, processor):
        part.save_pretrained(folder)
    runs = {name: tmp_path / name for name in ("from_folder", "in_memory")}
    for run in runs.values():
        run.mkdir()
        fake_run(run)
    assert main([str(runs["from_folder"]), "--clip", str(folder), "--device", "cpu", "--grid", "0"]) == 0
    assert main([str(runs["in_memory"]), "--clip", "tiny", "--device", "cpu", "--grid", "0"]) == 0
    got, expected = (json.loads((run / "clip_scores.json").read_text()) for run in runs.values())
    assert got["clip_model"] == str(folder)
    for variant in ("elbo", "baseline"):
        assert got["variants"][variant]["per_image"] == pytest.approx(
            expected["variants"][variant]["per_image"], abs=1e-4
        )


def test_default_clip_offline_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ClipScoreError) as err:
        ClipScorer.from_pretrained(DEFAULT_CLIP)
    assert "\n" not in str(err.value)
    fake_run(tmp_path)
    assert main([str(tmp_path), "--device", "cpu"]) == 2
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    (line,) = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert line.startswith(f"error: cannot load CLIP model '{DEFAULT_CLIP}' (")
    assert line.endswith(f"(`hf download {DEFAULT_CLIP} --local-dir <folder>`) and pass --clip <folder>.")
    assert not (tmp_path / "clip_scores.json").exists()
