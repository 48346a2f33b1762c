"""Generation runner: configs, run folder, resume, errors (tiny models, offline, CPU)."""

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

from elbo_t2ialign.cli import config_dir, to_container
from elbo_t2ialign.generation.config import GenerationError, validate
from elbo_t2ialign.generation.runner import run

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model.id=tiny:sd",
    "model.name=tiny_sd",
    "prompts=demo",
    "steps=2",
    "num_prompts=2",
    "progress=false",
]


def config(*overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return to_container(compose("generate", overrides=list(overrides)))


def test_defaults_follow_the_protocol():
    cfg = config()
    assert cfg["model"]["name"] == "sd15" and cfg["prompts"]["file"] == "AnE.txt"
    assert (cfg["steps"], cfg["guidance"], cfg["strength"], cfg["elbo_steps"], cfg["seed"]) == (
        50,
        None,
        1.2,
        50,
        4307,
    )
    assert (cfg["num_prompts"], cfg["images_per_prompt"], cfg["baseline"]) == (1000, 1, True)
    assert cfg["output_dir"] == "runs/generate/sd15/ane/strength-1.2"
    assert "top" in cfg["phrases"]["stopwords"]
    # the reference's phrase rule and step schedule by default; the stricter rule by name
    assert (cfg["phrases"]["match"], cfg["phrases"]["dedupe"], cfg["after_elbo_steps"]) == (
        "word",
        False,
        "reset",
    )
    strict = config("phrases=dedupe")["phrases"]
    assert (strict["match"], strict["dedupe"], strict["stopwords"]) == (
        "lemma",
        True,
        cfg["phrases"]["stopwords"],
    )


@pytest.mark.parametrize("prompts", [p.stem for p in sorted((ROOT / "configs/prompts").glob("*.yaml"))])
def test_every_prompt_set_config_loads(prompts):
    cfg = config(f"prompts={prompts}", *(["prompts.file=x.txt"] if prompts == "custom" else []))
    validate(cfg)


def test_unknown_keys_are_errors_naming_them():
    with pytest.raises(Exception, match="stepz"):
        config("stepz=3")  # Hydra's struct mode
    cfg = config()
    with pytest.raises(GenerationError, match=r"unknown key\(s\) in the generation config: \['stepz'\]"):
        validate({**cfg, "stepz": 3})
    with pytest.raises(GenerationError, match=r"unknown key\(s\) in model: \['guidance'\]"):
        validate({**cfg, "model": {**cfg["model"], "guidance": 3}})


def test_steps_rule_is_checked_and_older_folders_resume_where_the_rules_agree():
    from elbo_t2ialign.generation.config import result_fingerprint
    from elbo_t2ialign.runfolder import fingerprint_diff

    cfg = config()
    assert cfg["steps_rule"] == "stride"
    with pytest.raises(GenerationError, match="steps_rule must be 'stride'"):
        validate({**cfg, "steps_rule": "leading"})
    old = {k: v for k, v in cfg.items() if k != "steps_rule"}  # a folder from before the key: exact steps
    assert fingerprint_diff(result_fingerprint(old), result_fingerprint(cfg)) == []  # 50 divides 1000
    seven = {**cfg, "steps": 7}
    assert fingerprint_diff(result_fingerprint({**old, "steps": 7}), result_fingerprint(seven)) == [
        "steps_rule: 'exact' -> 'stride'"
    ]
    assert (
        fingerprint_diff(
            result_fingerprint({**old, "steps": 7}), result_fingerprint({**seven, "steps_rule": "exact"})
        )
        == []
    )


def test_run_writes_images_weights_and_resumes(tmp_path):
    out = tmp_path / "run"
    cfg = config(*TINY, f"output_dir={out}")
    assert run(cfg) == out
    names = ["00000_4307.png", "00001_4307.png"]
    for variant in ("elbo", "baseline"):
        assert sorted(p.name for p in (out / "images" / variant).iterdir()) == names
    w = json.loads((out / "weights/00001_4307.json").read_text())
    assert w["prompt"] == "a red car and a green plant" and w["phrases"] == ["a red car", "a green plant"]
    assert len(w["weights"]) == 2 and all(sorted(s) == [1.0, 1.2] for s in w["weights"])
    assert w["final_prompt"].startswith("(a red car)")
    assert [e["phrases"] for e in json.loads((out / "prompts.json").read_text())] == [
        ["a cat", "a dog"],
        ["a red car", "a green plant"],
    ]
    saved = OmegaConf.to_container(OmegaConf.load(out / "config.yaml"))
    assert saved["seed"] == 4307 and saved["model"]["id"] == "tiny:sd"
    assert {"git_revision", "seed"} <= set(json.loads((out / "run.json").read_text()))

    # rerun: nothing regenerated; a removed image comes back identical (same seed, deterministic)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    elbo1 = out / "images/elbo/00001_4307.png"
    pixels = Image.open(elbo1).tobytes()
    elbo1.unlink()
    run(cfg)
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    assert {p for p in after if after[p] != before.get(p)} == {elbo1}
    assert Image.open(elbo1).tobytes() == pixels
    assert len((out / "launches.jsonl").read_text().splitlines()) == 2
    assert not list(out.rglob("*.tmp*"))
    # a damaged image (truncated outside the run) is moved aside and generated again, identical
    elbo1.write_bytes(elbo1.read_bytes()[:100])
    run(cfg)
    assert Image.open(elbo1).tobytes() == pixels
    assert (out / "damaged/images/elbo/00001_4307.png").stat().st_size == 100

    # more images per prompt extend the run; the baseline uses the same seeds
    run(config(*TINY, f"output_dir={out}", "images_per_prompt=2", "baseline=false"))
    assert (
        len(list((out / "images/elbo").iterdir())) == 4
        and len(list((out / "images/baseline").iterdir())) == 2
    )

    with pytest.raises(GenerationError, match=r"another config \(strength: 1.2 -> 2.0\)"):
        run(config(*TINY, f"output_dir={out}", "strength=2.0"))


def test_tiny_sd3_run(tmp_path):
    out = tmp_path / "sd3"
    run(
        config(
            "model.id=tiny:sd3",
            "model.name=tiny_sd3",
            "model.max_sequence_length=16",
            "prompts=demo",
            "steps=2",
            "num_prompts=1",
            "progress=false",
            f"output_dir={out}",
        )
    )
    assert Image.open(out / "images/elbo/00000_4307.png").size == (32, 32)
    assert (out / "images/baseline/00000_4307.png").is_file()


def test_prompt_errors(tmp_path):
    with pytest.raises(GenerationError, match=r"prompt file 'missing.txt' not found.*prepare_data"):
        run(config(*TINY, "prompts=custom", "prompts.file=missing.txt", f"output_dir={tmp_path / 'a'}"))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(GenerationError, match="holds no prompts"):
        run(config(*TINY, "prompts=custom", f"prompts.file={empty}", f"output_dir={tmp_path / 'b'}"))
    long = tmp_path / "long.txt"
    long.write_text("a cat and a dog\n" + " ".join(["cat"] * 80) + " and a dog\n")
    with pytest.raises(
        GenerationError, match=r"1 prompt\(s\) exceed the text encoder's 77 tokens: 1 \(85 tokens\)"
    ):
        run(config(*TINY, "prompts=custom", f"prompts.file={long}", f"output_dir={tmp_path / 'c'}"))
    with pytest.raises(GenerationError, match="unknown tiny model 'tiny:nope'"):
        run(config(*TINY, "model.id=tiny:nope", f"output_dir={tmp_path / 'd'}"))


def test_prompts_without_two_phrases_reuse_the_weighted_image_as_baseline(tmp_path, monkeypatch):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\na cat and a dog\n")
    cfg = config(*TINY, "prompts=custom", f"prompts.file={prompts}", f"output_dir={tmp_path / 'r'}")
    from elbo_t2ialign.generation import runner as module

    sampler = module.build_sampler(validate(cfg))
    calls = []
    original = sampler.sample
    monkeypatch.setattr(
        sampler, "sample", lambda *a, **k: calls.append((a[0], k["weighted"])) or original(*a, **k)
    )
    run(cfg, sampler=sampler)
    assert calls == [("a cat", True), ("a cat and a dog", True), ("a cat and a dog", False)]
    out = tmp_path / "r/images"
    for i in (0, 1):
        same = (
            Image.open(out / f"elbo/0000{i}_4307.png").tobytes()
            == Image.open(out / f"baseline/0000{i}_4307.png").tobytes()
        )
        assert same == (i == 0)
    assert (
        Image.open(out / "baseline/00000_4307.png").tobytes()
        == original("a cat", [], 4307, weighted=False).image.tobytes()
    )
