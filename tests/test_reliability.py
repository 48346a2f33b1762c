"""Reliability of run folders (issue 12): checks before work, the label cache never touching a user's
file, identity of what produced a folder, the launch lock, repair of damaged images on resume, and
one-line errors on the command line."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from elbo_t2ialign.cli import DamagedFileError
from elbo_t2ialign.devtools.fixtures import PixelAligner, fixture_config, random_samples, write_dataset
from elbo_t2ialign.runfolder import RunLock, folder_digest
from elbo_t2ialign.segmentation import evaluate, run
from elbo_t2ialign.segmentation.config import ConfigError, InputError

CLASSES = ["cat", "dog", "boat"]


@pytest.fixture
def data(tmp_path):
    return write_dataset(tmp_path / "data", CLASSES, random_samples(CLASSES, 4))


def _maps(out):
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted((out / "maps").rglob("*")) if p.is_file()}


# ------------------------------------------------------------------ item 7: checks before any file
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"elbo": {"strength": "abc"}}, "in elbo: strength must be a finite number > 0, got 'abc'"),
        (
            {"num_images": "abc"},
            "num_images must be an integer >= 0 (or null for the whole split), got 'abc'",
        ),
        ({"seed": 1.5}, "seed must be an integer >= 0, got 1.5"),
        ({"shard": "2/2"}, "shard '2/2': need 0 <= i < n"),
        ({"on_error": "maybe"}, "on_error must be 'skip' or 'stop', got 'maybe'"),
        ({"device": "cuda"}, "device=cuda but torch sees no CUDA device here; use device=auto or device=cpu"),
        ({"device": "toaster"}, "device must be auto, cpu, cuda, cuda:<i> or mps, got 'toaster'"),
    ],
)
def test_bad_value_fails_before_any_file_is_written(tmp_path, data, monkeypatch, override, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "run"
    with pytest.raises(ConfigError) as err:
        run({**fixture_config(data, out), **override}, aligner=PixelAligner())
    assert str(err.value) == message
    assert not out.exists()


def _cli(module, *args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def test_command_line_prints_one_line_and_traceback_only_on_request(tmp_path):
    out = tmp_path / "run"
    common = ["dataset=folder", "model.name=pixel", "model.id=none", f"output_dir={out}"]
    missing = _cli("elbo_t2ialign.segment", *common, cwd=tmp_path)
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        "error: dataset.root is not set; give it on the command line (dataset.root=...)"
    ]
    assert not out.exists()  # Hydra does not create output_dir either
    bad = _cli(
        "elbo_t2ialign.segment",
        *common,
        f"dataset.root={tmp_path}",
        "elbo.strength=abc",
        "--debug",
        cwd=tmp_path,
    )
    assert bad.returncode != 0 and "Traceback" in bad.stderr
    assert "ConfigError: in elbo: strength must be a finite number > 0, got 'abc'" in bad.stderr
    assert not out.exists()
    corrupt = tmp_path / "evalrun"
    corrupt.mkdir()
    (corrupt / "config.yaml").write_text("a: [\n")
    ev = _cli("elbo_t2ialign.evaluate", str(corrupt), cwd=tmp_path)
    assert ev.returncode == 3 and len(ev.stderr.strip().splitlines()) == 1
    assert ev.stderr.startswith(f"error: {corrupt / 'config.yaml'} is damaged (")


def test_failed_model_load_leaves_no_folder(tmp_path, data):
    out = tmp_path / "run"
    cfg = fixture_config(data, out, model={"name": "x", "id": str(tmp_path / "no-such-model")})
    with pytest.raises(ConfigError, match="cannot load a diffusers pipeline from folder|cannot load model"):
        run(cfg)  # no aligner: the runner loads the model and fails
    assert not out.exists()


# ------------------------------------------------------------------ item 3: the label cache
def test_label_cache_leaves_user_files_alone(tmp_path, data):
    user = data / "image_labels.json"  # the old default cache path
    user.write_text('{"mine": true}\n')
    out = run(fixture_config(data, tmp_path / "run", num_images=2), aligner=PixelAligner())
    assert user.read_text() == '{"mine": true}\n'
    cached = list((Path(os.environ["ELBO_T2IALIGN_CACHE"]) / "labels").glob("fixture-*.json"))
    assert cached and all(
        json.loads(p.read_text())["format"] == "elbo_t2ialign label cache 1" for p in cached
    )
    assert (out / "maps" / "img_001" / "scores.json").is_file()

    for content in ("[1, 2]\n", '{"mine": true}\n', "not json"):
        user.write_text(content)
        cfg = fixture_config(data, tmp_path / "other", num_images=2)
        cfg["dataset"]["label_cache"] = str(user)
        with pytest.raises(
            ConfigError,
            match=r"dataset.label_cache .*image_labels.json holds a file that is not a "
            "label cache of this project; it is left untouched",
        ):
            run(cfg, aligner=PixelAligner())
        assert user.read_text() == content and not (tmp_path / "other").exists()


# ------------------------------------------------------------------ item 4: identity
def test_relaunch_with_other_data_or_weights_is_refused(tmp_path, data):
    model = tmp_path / "model"
    (model / "unet").mkdir(parents=True)
    weights = model / "unet" / "w.safetensors"
    weights.write_bytes(b"\0" * 64)
    cfg = fixture_config(data, tmp_path / "run", num_images=2, model={"name": "m", "id": str(model)})
    out = run(cfg, aligner=PixelAligner())
    before = _maps(out)
    recorded = json.loads((out / "identity.json").read_text())
    assert recorded["model"] == {"id": str(model), "digest": folder_digest(model)}
    assert recorded["dataset"]["data_root"] == str(data.resolve())

    other = write_dataset(tmp_path / "other", CLASSES, random_samples(CLASSES, 4, seed=1))
    moved = {**cfg, "dataset": {**cfg["dataset"], "data_root": str(other)}}
    with pytest.raises(
        ConfigError, match=rf"made from other inputs \(dataset.data_root: '{data}' -> '{other}'\)"
    ):
        run(moved, aligner=PixelAligner())

    weights.write_bytes(b"\1" + b"\0" * 63)  # retrained in place: same names and sizes
    with pytest.raises(
        ConfigError, match=r"made from other inputs \(model.digest: '[0-9a-f]{64}' -> '[0-9a-f]{64}'\)"
    ):
        run(cfg, aligner=PixelAligner())
    assert _maps(out) == before

    weights.write_bytes(b"\0" * 64)  # restored: the run resumes
    run({**cfg, "num_images": 3}, aligner=PixelAligner())
    assert (out / "maps" / "img_002" / "scores.json").is_file()


# ------------------------------------------------------------------ item 5: the lock, stale temporaries
def test_second_launch_exits_at_once_and_shards_lock_separately(tmp_path, data):
    out = tmp_path / "run"
    out.mkdir()
    held = RunLock(out / ".lock", ConfigError).acquire()  # another launch of the unsharded folder
    aligner = PixelAligner()
    with pytest.raises(
        ConfigError, match=rf"{out} is in use by pid {os.getpid()} on {socket.gethostname()} since "
    ):
        run(fixture_config(data, out), aligner=aligner)
    assert aligner.calls == [] and not (out / "config.yaml").exists()
    held.release()

    shard0 = RunLock(out / ".lock.shard0-of-2", ConfigError).acquire()  # shard 0 runs elsewhere
    run(fixture_config(data, out, shard="1/2"), aligner=aligner)
    assert sorted(p.name for p in (out / "maps").iterdir()) == ["img_001", "img_003"]
    with pytest.raises(
        ConfigError, match=rf"in use by pid {os.getpid()} .*\(lock {out / '.lock.shard0-of-2'}\)"
    ):
        run(fixture_config(data, out), aligner=aligner)  # an unsharded launch would redo shard 0's images
    shard0.release()
    assert not any(out.glob(".lock*"))


def test_stale_lock_and_temporaries_of_a_killed_launch_are_cleared(tmp_path, data, caplog):
    reference = run(fixture_config(data, tmp_path / "ref"), aligner=PixelAligner())
    out = tmp_path / "run"
    run(fixture_config(data, out, num_images=2), aligner=PixelAligner())
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    pid = int(dead.stdout)  # a process that has exited
    (out / ".lock").write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "then"}))
    (out / "maps" / ".tmp-img_002").mkdir()
    (out / "maps" / ".tmp-img_002" / "elbo_001.png").write_bytes(b"half")
    (out / f".run.json.{pid}.tmp").write_text("{")
    caplog.set_level("INFO", logger="elbo_t2ialign")
    run(fixture_config(data, out), aligner=PixelAligner())
    assert (
        f"taking over the stale lock {out / '.lock'} of pid {pid} on {socket.gethostname()} (started then), "
        "which is no longer running" in caplog.text
    )
    assert "removed 2 temporary file(s) of an interrupted launch" in caplog.text
    assert sorted(p.name for p in out.rglob(".*")) == []  # no lock, no temporary left
    assert _maps(out) == _maps(reference)


# ------------------------------------------------------------------ item 6: verify on resume
def test_damaged_images_are_named_by_evaluate_and_recomputed_on_resume(tmp_path, data):
    reference = run(fixture_config(data, tmp_path / "ref"), aligner=PixelAligner())
    out = run(fixture_config(data, tmp_path / "run"), aligner=PixelAligner())
    (out / "maps" / "img_000" / "scores.json").write_text("{")
    victim = sorted((out / "maps" / "img_001").glob("elbo_*.png"))[0]
    victim.unlink()
    truncated = sorted((out / "maps" / "img_003").glob("baseline_*.png"))[0]
    truncated.write_bytes(truncated.read_bytes()[:40])

    with pytest.raises(DamagedFileError) as err:
        evaluate(out, progress=False)
    text = str(err.value)
    assert text.startswith("3 file(s) missing or unreadable: ")
    assert f"img_000: {out / 'maps' / 'img_000' / 'scores.json'} unreadable (JSONDecodeError" in text
    assert f"img_001: {victim} missing" in text and f"img_003: {truncated} unreadable (" in text

    aligner = PixelAligner()
    run(fixture_config(data, out), aligner=aligner)
    assert [c["seed"] for c in aligner.calls] == [0, 1, 3]  # only the damaged images
    assert _maps(out) == _maps(reference)
    assert sorted(p.name for p in (out / "damaged").iterdir()) == ["img_000", "img_001", "img_003"]
    assert evaluate(out, progress=False)["num_images"] == 4


# ------------------------------------------------------------------ item 10
def test_run_whose_every_image_is_skipped_fails(tmp_path, data):
    for name in ("img_000", "img_001"):
        (data / "images" / f"{name}.png").unlink()
    with pytest.raises(
        InputError, match=r"every image of this run \(2\) was skipped; the reasons are in .*skipped"
    ):
        run(fixture_config(data, tmp_path / "run", num_images=2), aligner=PixelAligner())
    assert sorted(p.name for p in (tmp_path / "run" / "skipped").iterdir()) == [
        "img_000.json",
        "img_001.json",
    ]


def test_evaluator_finds_relative_data_from_another_directory(tmp_path, data, monkeypatch):
    monkeypatch.chdir(data.parent)
    cfg = fixture_config(Path("data"), tmp_path / "run")  # paths relative to the launch directory
    out = run(cfg, aligner=PixelAligner())
    monkeypatch.chdir(tmp_path / "run")
    assert not Path("data").exists()
    assert evaluate(out, progress=False, overlays=0)["num_images"] == 4


def test_explain_checks_the_device_before_loading(tmp_path, monkeypatch, capsys):
    from PIL import Image

    from elbo_t2ialign import explain

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    assert (
        explain.main([str(tmp_path / "a.png"), "square", "device=cuda", f"output_dir={tmp_path / 'out'}"])
        == 2
    )
    assert capsys.readouterr().err == (
        "error: device=cuda but torch sees no CUDA device here; use device=auto or device=cpu\n"
    )
    assert not (tmp_path / "out").exists()


def test_a_new_run_that_stops_after_finished_images_keeps_its_records(tmp_path, data):
    (data / "images" / "img_002.png").unlink()
    out = tmp_path / "run"
    with pytest.raises(InputError, match="image img_002: file not found"):
        run(fixture_config(data, out, on_error="stop"), aligner=PixelAligner())
    assert sorted(p.name for p in out.iterdir()) == [
        "config.yaml",
        "identity.json",
        "launches.jsonl",
        "maps",
        "run.json",
        "segment.log",
        "variants.json",
    ]
    assert sorted(p.name for p in (out / "maps").iterdir()) == ["img_000", "img_001"]


def test_discard_temp_dir_removes_only_staging_folders(tmp_path):
    from elbo_t2ialign.runfolder import discard_temp_dir

    staged = tmp_path / "maps" / ".tmp-img_1"
    (staged / "sub").mkdir(parents=True)
    (staged / "elbo_001.png").write_bytes(b"x")
    (staged / "sub" / "a.json").write_text("{}")
    result = tmp_path / "maps" / "img_1"
    result.mkdir()
    (result / "elbo_001.png").write_bytes(b"y")
    discard_temp_dir(staged)
    assert not staged.exists()
    with pytest.raises(ValueError, match="not a staging folder"):
        discard_temp_dir(result)
    assert (result / "elbo_001.png").read_bytes() == b"y"  # a result folder is never touched
