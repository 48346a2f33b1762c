"""Fault injection (issue 12): a segmentation launch of the bundled testbed model on the shapes world
is killed with SIGKILL at random points (several seeds), a concurrent launch meets the running one,
and every rerun ends with the same bytes as an uninterrupted run."""

import os
import random
import signal
import subprocess
import sys
import time

import pytest
from hydra import compose, initialize_config_dir

from elbo_t2ialign.cli import config_dir
from elbo_t2ialign.segmentation import run
from elbo_t2ialign.segmentation.config import ConfigError, validate
from elbo_t2ialign.segmentation.runner import build_aligner, to_container
from elbo_t2ialign.testbed import train, world

CONFIGS = str(config_dir())
IMAGES = 4
pytestmark = pytest.mark.skipif(
    not (train.DEFAULT_MODEL_DIR / "model_index.json").is_file(), reason="no committed testbed model"
)


def _overrides(datasets, out):
    return [
        "model=shapes",
        "dataset=shapes",
        "elbo=shapes",
        f"datasets_dir={datasets}",
        "device=cpu",
        "progress=false",
        "elbo.elbo_timesteps=[1,501]",
        "elbo.collect_timesteps=[20,100]",
        f"num_images={IMAGES}",
        f"output_dir={out}",
    ]


def _config(datasets, out):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return to_container(compose("segment", overrides=_overrides(datasets, out)))


def _files(out):
    """Every file of the finished images (bytes), and anything temporary or locked left behind."""
    maps = {str(p.relative_to(out)): p.read_bytes() for p in sorted((out / "maps").rglob("*")) if p.is_file()}
    leftovers = sorted(str(p.relative_to(out)) for p in out.rglob(".*"))
    return maps, leftovers


def _finished(out):
    maps = out / "maps"
    return sum((p / "scores.json").is_file() for p in maps.iterdir()) if maps.is_dir() else 0


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("fault")
    world.ensure_dataset(root / "datasets" / "shapes")
    conf = _config(root / "datasets", root / "reference")
    aligner = build_aligner(conf, validate(conf))
    reference = _files(run(conf, aligner=aligner))
    assert len({k.split("/")[1] for k in reference[0]}) == IMAGES and reference[1] == []
    return root, aligner, reference


# The launch under test, with every PNG write slowed by 40 ms so that "during the writes of an image"
# is a window a kill can aim at (the bytes written are unchanged).
SLOW_WRITES = """
import runpy, sys, time
from PIL import Image
save = Image.Image.save
def slow_save(self, *args, **kwargs):
    time.sleep(0.04)
    return save(self, *args, **kwargs)
Image.Image.save = slow_save
runpy.run_module("elbo_t2ialign.segment", run_name="__main__", alter_sys=True)
"""
# (seed, where the kill lands): after the lock is taken (model loading), between two images (a random
# delay after the k-th finished), or while an image's files are being written into maps/.tmp-<image>/
SCENARIOS = [(0, "writing"), (1, "between"), (2, "startup")]


def _wait(condition, proc, seconds=90):
    deadline = time.time() + seconds
    while not condition() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)


@pytest.mark.parametrize(("seed", "moment"), SCENARIOS)
def test_kill_anywhere_then_rerun_gives_the_uninterrupted_bytes(setup, seed, moment):
    root, aligner, reference = setup
    rng = random.Random(seed)
    out = root / f"killed-{seed}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_WRITES, *_overrides(root / "datasets", out)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait(lambda: (out / ".lock").exists(), proc)
    if seed == 0 and proc.poll() is None:  # a second launch meanwhile exits at once, naming the holder
        with pytest.raises(ConfigError, match=rf"{out} is in use by pid {proc.pid} on "):
            run(_config(root / "datasets", out), aligner=aligner)
    if moment == "between":
        target = rng.randrange(1, IMAGES - 1)
        _wait(lambda: _finished(out) >= target, proc)
        time.sleep(rng.uniform(0.0, 0.3))
    elif moment == "writing":
        target = rng.randrange(IMAGES - 1)
        _wait(lambda: _finished(out) >= target and any((out / "maps").glob(".tmp-*")), proc)
        time.sleep(rng.uniform(0.0, 0.05))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()  # it was still running when killed
    assert _finished(out) < IMAGES
    if moment == "writing":
        assert any((out / "maps").glob(".tmp-*"))  # killed half way through an image's files

    run(_config(root / "datasets", out), aligner=aligner)
    assert _files(out) == reference  # same bytes, no lock or temporary left
