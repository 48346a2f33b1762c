"""Hydra configs of the segmentation experiment, its command lines, and the data preparation check."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from elbo_t2ialign.cli import config_dir, to_container
from elbo_t2ialign.devtools.fixtures import PixelAligner, random_samples, write_dataset
from elbo_t2ialign.segment import shard_flag_to_override
from elbo_t2ialign.segmentation import prepare, run
from elbo_t2ialign.segmentation.config import ConfigError, parse_shard, resolve_rank_device, validate
from elbo_t2ialign.segmentation.datasets import SegDataset

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = str(config_dir())
DATASETS = {"voc": 20, "context": 59, "coco": 80, "ade20k": 150, "aep": 38}


def _compose(overrides):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose(config_name="segment", overrides=overrides)


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_every_dataset_config_composes_and_validates(name):
    cfg = _compose([f"dataset={name}", "elbo.strength=2"])
    conf = to_container(cfg)
    assert validate(conf).strength == 2.0
    dataset = SegDataset(conf["dataset"])
    assert len(dataset.class_names) == DATASETS[name]
    assert str(dataset.data_root).startswith("datasets/")
    assert conf["output_dir"] == f"runs/segment/{conf['model']['name']}/{name}-val/strength-2"


def test_conventions_are_in_the_dataset_configs():
    voc, coco, ade = (to_container(_compose([f"dataset={n}"]))["dataset"] for n in ("voc", "coco", "ade20k"))
    assert (voc["ignore_index"], voc["id_shift"], voc["max_id"]) == (255, 0, None)
    assert (coco["ignore_index"], coco["id_shift"], coco["max_id"]) == (None, 1, 80)
    assert (ade["ignore_index"], ade["id_shift"], ade["max_id"]) == (None, 0, None)


def test_split_override_and_folder_dataset(tmp_path):
    conf = to_container(_compose(["dataset=voc", "dataset.split=val_100"]))
    assert len(SegDataset(conf["dataset"]).images) == 100
    conf = to_container(_compose(["dataset=folder", f"dataset.root={tmp_path}"]))
    assert conf["dataset"]["metadata"] == conf["dataset"]["data_root"] == str(tmp_path)


@pytest.mark.parametrize("override", ["bogus=1", "dataset.bogus=1", "elbo.bogus=1"])
def test_unknown_command_line_key_is_named(override):
    with pytest.raises(ConfigCompositionException) as err:
        _compose([override])
    assert "bogus" in str(err.value) + str(err.value.__cause__)


def test_shard_flag_and_environment():
    assert shard_flag_to_override(["x", "--shard", "1/4", "a=b"]) == ["x", "shard=1/4", "a=b"]
    assert shard_flag_to_override(["--shard=0/2"]) == ["shard=0/2"]
    assert parse_shard("1/4").index == 1 and parse_shard("1/4").count == 4
    assert parse_shard(None, {"WORLD_SIZE": "2", "RANK": "1"}) == parse_shard("1/2")
    assert parse_shard(None, {}) == parse_shard("0/1")


def test_rank_device_is_this_process_gpu_or_the_given_name(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert [resolve_rank_device(x, {"LOCAL_RANK": "1"}) for x in (None, "", "auto", "cpu")] == ["cpu"] * 4
    with pytest.raises(ConfigError, match="no CUDA device"):
        resolve_rank_device("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_rank_device("auto", {"LOCAL_RANK": "3"}) == "cuda:1"  # rank 3 of 2 GPUs
    assert resolve_rank_device("", {}) == "cuda:0" and resolve_rank_device("cuda:1", {}) == "cuda:1"


def _cli(*args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "elbo_t2ialign.segment", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_command_line_resume_and_multirun(tmp_path):
    data = write_dataset(tmp_path / "data", ["cat", "dog"], random_samples(["cat", "dog"], 3))
    common = ["dataset=folder", f"dataset.root={data}", "model.name=pixel", "model.id=none", "progress=false"]
    # finish a run in-process (no real model yet), then resume it from the command line: nothing to compute
    cfg = to_container(_compose([*common, f"output_dir={tmp_path / 'run'}"]))
    run(cfg, aligner=PixelAligner())
    done = _cli(*common, f"output_dir={tmp_path / 'run'}", "--shard", "1/2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "1 images in this shard, 1 finished, 0 to do" in done.stdout + done.stderr
    assert json.loads((tmp_path / "run" / "launches.jsonl").read_text().splitlines()[-1])["shard"] == "1/2"
    # a sweep: one folder per strength, each with its resolved config
    sweep = _cli(
        "-m",
        *common,
        "num_images=0",
        "elbo.strength=1,2",
        f"output_dir={tmp_path}/sweep/s${{elbo.strength}}",
        cwd=tmp_path,
    )
    assert sweep.returncode == 0, sweep.stderr
    for s in (1, 2):
        assert OmegaConf.load(tmp_path / "sweep" / f"s{s}" / "config.yaml").elbo.strength == s
    bad = _cli(*common, f"output_dir={tmp_path / 'run'}", "elbo.strength=5", cwd=tmp_path)
    assert bad.returncode != 0 and "another config (elbo.strength: 3.0 -> 5)" in bad.stderr


def test_prepare_names_missing_files_and_where_they_go(tmp_path, capsys, monkeypatch):
    (tmp_path / "aep" / "images").mkdir(parents=True)
    (tmp_path / "aep" / "images" / "generate_0.png").write_bytes(b"")
    calls = []

    def offline(self, repo_id, **kwargs):
        calls.append({"repo_id": repo_id, **kwargs})
        raise OSError("no network")

    monkeypatch.setattr("huggingface_hub.HfApi.list_repo_tree", offline)
    assert prepare.main(["--datasets", "aep", "--dir", str(tmp_path)]) == 1
    assert calls[0]["repo_id"] == "Matrix53/elbo-t2ialign" and calls[0]["repo_type"] == "dataset"
    out = capsys.readouterr()
    assert "failed: OSError: no network" in out.err
    # the zero-byte image counts as unusable, not as present
    assert "MISSING aep: 741 image(s) and 741 mask(s) of 741 not usable (1 empty, 1481 missing" in out.out
    assert f"{tmp_path}/aep/annotations/<image id>_gt.png" in out.out
    listed = (tmp_path / "missing_aep.txt").read_text().splitlines()
    assert len(listed) == 1482 and f"{tmp_path}/aep/annotations/generate_0_gt.png\tmissing" in listed
    assert f"{tmp_path}/aep/images/generate_0.png\tempty" in listed
