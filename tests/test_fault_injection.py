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


def _launch_slow(root, out) -> subprocess.Popen:
    """A segment process on the fixture data whose writes are slowed down, so it can be caught mid-run."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", SLOW_WRITES, *_overrides(root / "datasets", out)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize(("seed", "moment"), SCENARIOS)
def test_kill_anywhere_then_rerun_gives_the_uninterrupted_bytes(setup, seed, moment):
    root, aligner, reference = setup
    rng = random.Random(seed)
    out = root / f"killed-{seed}"
    proc = _launch_slow(root, out)
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


# ------------------------------------------------------------------ issue 24: what the user sees
def _errors(stderr):
    """The lines a command printed that are not the model loader's (progress bars, library notes)."""
    return [
        line
        for line in stderr.splitlines()
        if line.strip() and not line.startswith(("[transformers]", "Loading")) and "it/s]" not in line
    ]


@pytest.mark.parametrize(
    ("sig", "status", "what"),
    [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated (SIGTERM)")],
)
def test_ctrl_c_or_sigterm_prints_one_line_then_the_rerun_resumes(setup, sig, status, what):
    root, aligner, reference = setup
    out = root / f"signal-{sig.name}"
    proc = _launch_slow(root, out)
    _wait(lambda: _finished(out) >= 1, proc)
    assert proc.poll() is None, proc.stderr.read()  # still running
    proc.send_signal(sig)
    stderr = proc.communicate(timeout=60)[1]
    assert proc.returncode == status, stderr
    assert "Traceback" not in stderr
    assert _errors(stderr) == [f"error: {what}; rerun the same command to resume: finished outputs are kept"]
    assert not any(out.rglob(".*"))  # lock released, the image in flight discarded
    run(_config(root / "datasets", out), aligner=aligner)
    assert _files(out) == reference


def test_damaged_config_yaml_prints_one_line_and_debug_the_traceback(setup):
    root, aligner, reference = setup
    out = root / "damaged-config"
    run(_config(root / "datasets", out), aligner=aligner)
    (out / "config.yaml").write_bytes(b"output_dir: runs/x\n\x00\x01\x02 garbage \xff\xfe")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    cmd = [sys.executable, "-m", "elbo_t2ialign.segment", *_overrides(root / "datasets", out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 3
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"error: {out / 'config.yaml'} is damaged (")
    assert line.endswith("); restore it from a copy, or start a new run with output_dir=<new folder>")
    debug = subprocess.run([*cmd, "--debug"], env=env, capture_output=True, text=True, timeout=120)
    assert debug.returncode == 3 and "Traceback (most recent call last)" in debug.stderr
    assert debug.stderr.strip().splitlines()[-1] == line
    assert _files(out) == reference


def _can_mount_tmpfs(folder):
    try:
        probe = subprocess.run(
            ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {folder}"],
            capture_output=True,
            timeout=20,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return probe.returncode == 0


FULL_TMPFS = """
set -u
mount -t tmpfs -o size=48k tmpfs "$DISK"
"$PY" -m elbo_t2ialign.segment "$@" output_dir="$DISK/run" > /dev/null 2> "$LOG"
echo "first=$?"
cd "$DISK/run" && find . -mindepth 1 -name '.*' | sed 's/^/left=/'
mount -o remount,size=16m "$DISK"
"$PY" -m elbo_t2ialign.segment "$@" output_dir="$DISK/run" > /dev/null 2>&1
echo "second=$?"
cd "$DISK/run" && find maps -type f | sort | xargs sha256sum | sed 's/^/sha=/'
"""


def test_full_tmpfs_during_segment_then_space_is_freed(setup, tmp_path):
    """The issue's case on a real full disk: a 48 KB tmpfs as the output folder (in a user and
    mount namespace, where the machine allows one), then 16 MB: the rerun finishes the run."""
    import hashlib

    root, aligner, reference = setup
    disk = tmp_path / "disk"
    disk.mkdir()
    if not _can_mount_tmpfs(disk):
        pytest.skip("no tmpfs mount here (unshare -rm or mount refused)")
    log = tmp_path / "stderr.txt"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "DISK": str(disk)}
    env |= {"PY": sys.executable, "LOG": str(log)}
    overrides = [o for o in _overrides(root / "datasets", root / "x") if not o.startswith("output_dir=")]
    done = subprocess.run(
        ["unshare", "-rm", "sh", "-c", FULL_TMPFS, "sh", *overrides],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = done.stdout.splitlines()
    assert "first=4" in lines and "second=0" in lines, (done.stdout, done.stderr, log.read_text())
    assert not [line for line in lines if line.startswith("left=")]  # no temporary, no lock left
    errors = _errors(log.read_text())
    assert len(errors) == 1 and "Traceback" not in log.read_text()
    assert errors[0].startswith(f"error: no space left on device writing {disk / 'run'}")
    hashes = {}
    for line in lines:
        if line.startswith("sha="):  # "sha=<sha256>  maps/<image>/<file>"
            digest, path = line[4:].split("  ", 1)
            hashes[path] = digest
    assert hashes == {k: hashlib.sha256(v).hexdigest() for k, v in reference[0].items()}


def test_sigterm_during_generate_prints_one_line(tmp_path):
    from elbo_t2ialign.devtools.faults import whole_files

    out = tmp_path / "gen"
    overrides = ["model.id=tiny:sd", "model.name=tiny_sd", "prompts=demo", "steps=2", "num_prompts=20"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "elbo_t2ialign.generate", *overrides, f"output_dir={out}", "progress=false"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait(lambda: any((out / "images" / "elbo").glob("*.png")), proc, seconds=180)
    assert proc.poll() is None, proc.stderr.read()
    proc.send_signal(signal.SIGTERM)
    stderr = proc.communicate(timeout=60)[1]
    assert proc.returncode == 143 and "Traceback" not in stderr, stderr
    assert _errors(stderr)[-1] == (
        "error: terminated (SIGTERM); rerun the same command to resume: finished outputs are kept"
    )
    assert whole_files(out) == [] and not (out / ".lock").exists()
