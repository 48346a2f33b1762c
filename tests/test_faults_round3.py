"""Reliability, round three (issue 33): what a command prints besides its work, a misspelt setting,
Ctrl-C while the libraries import, file systems that refuse, damaged models, non-finite numbers,
unusual images and several processes at once. Each fault is made real (a real process, a real
read-only mount, a real damaged file), and the test checks the one line, the exit status and what is
kept (docs/reliability.md, the fault table)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from elbo_t2ialign.cli import EXIT_BAD_INPUT, EXIT_INTERRUPTED, OverrideError, compose_config
from elbo_t2ialign.core.compat import TORCHVISION_FALLBACK, _TorchvisionFallbackFilter
from elbo_t2ialign.testbed import train, world

REPO = Path(__file__).resolve().parents[1]
TESTBED = pytest.mark.skipif(
    not (train.DEFAULT_MODEL_DIR / "model_index.json").is_file(), reason="no committed testbed model"
)


def _env() -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    return env


def _cli(*args: str, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout
    )


def _segment_args(datasets: Path, out: Path, images: int = 1) -> list[str]:
    return [
        "elbo_t2ialign.segment",
        "model=shapes",
        "dataset=shapes",
        "elbo=shapes",
        f"datasets_dir={datasets}",
        "device=cpu",
        "progress=false",
        "elbo.elbo_timesteps=[1,501]",
        "elbo.collect_timesteps=[20,100]",
        f"num_images={images}",
        f"output_dir={out}",
    ]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """The shapes world's datasets folder (seconds to write)."""
    root = tmp_path_factory.mktemp("round3")
    world.ensure_dataset(root / "datasets" / "shapes")
    return root / "datasets"


@pytest.fixture(scope="module")
def segmented(shapes) -> tuple[Path, subprocess.CompletedProcess]:
    """A real `segment` command of one shapes image with the bundled testbed model."""
    if not (train.DEFAULT_MODEL_DIR / "model_index.json").is_file():
        pytest.skip("no committed testbed model")
    out = shapes.parent / "segmented"
    done = _cli(*_segment_args(shapes, out), cwd=shapes.parent)
    assert done.returncode == 0, done.stderr
    return out, done


# ------------------------------------------------------------------ item 8: noise
def test_torchvision_fallback_notice_is_dropped_and_nothing_else():
    keep = _TorchvisionFallbackFilter()

    def record(message):
        return logging.LogRecord("transformers.utils.import_utils", logging.WARNING, "", 0, message, (), None)

    notice = (
        "`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil` "
        "for backward compatibility. Install torchvision to use the default backend, or import "
        "`CLIPImageProcessorPil` directly to silence this warning."
    )
    assert TORCHVISION_FALLBACK.search(notice) and not keep.filter(record(notice))
    assert keep.filter(
        record("Could not import module 'X'. Are this object's requirements defined correctly?")
    )
    # in a real process: the filter is installed by importing the package, another warning still prints
    other = subprocess.run(
        [
            sys.executable,
            "-c",
            "import elbo_t2ialign, logging, transformers; "
            f"logging.getLogger('transformers.utils.import_utils').warning({notice!r}); "
            "logging.getLogger('transformers.utils.import_utils').warning('a real warning')",
        ],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert other.returncode == 0 and "a real warning" in other.stderr
    assert "falling back" not in other.stderr


@TESTBED
def test_a_real_command_prints_no_torchvision_notice(segmented, shapes):
    _, done = segmented
    assert "torchvision" not in done.stderr, done.stderr
    # the notice is real here: the same import without this package prints it (skip where it does not)
    bare = subprocess.run(
        [sys.executable, "-c", "import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    if "requires torchvision (not installed)" not in bare.stderr:
        pytest.skip("this transformers (or an installed torchvision) prints no torchvision fallback notice")


# ------------------------------------------------------------------ item 7: a misspelt setting
@pytest.mark.parametrize(
    ("config", "overrides", "message"),
    [
        (
            "segment",
            ["elbo.strenght=2"],
            "elbo.strenght is not a setting of segment.yaml (did you mean elbo.strength?); "
            "to add a new key anyway, give +elbo.strenght=2",
        ),
        (
            "segment",
            ["model=sd3", "model.idd=x"],
            "model.idd is not a setting of segment.yaml (did you mean model.id?); "
            "to add a new key anyway, give +model.idd=x",
        ),
        ("segment", ["modle=sd15"], "modle is not a setting of segment.yaml (did you mean model?); "),
        (
            "generate",
            ["prompts.fle=a"],
            "prompts.fle is not a setting of generate.yaml (did you mean prompts.file?)",
        ),
        (
            "explain",
            ["elbo.strenght=2"],
            "elbo.strenght is not a setting of explain.yaml (did you mean elbo.strength?)",
        ),
        (
            "segment",
            ["model=sd155"],
            "model=sd155: there is no configs/model/sd155.yaml (did you mean model=sd15?)",
        ),
        (
            "segment",
            ["zzzzzz=1"],
            "zzzzzz is not a setting of segment.yaml; to add a new key anyway, give +zzzzzz=1",
        ),
    ],
)
def test_misspelt_setting_names_the_nearest_key(config, overrides, message):
    with pytest.raises(OverrideError) as err:
        compose_config(config, overrides)
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (
            ["elbo_t2ialign.segment", "elbo.strenght=2"],
            "error: elbo.strenght is not a setting of segment.yaml (did you mean elbo.strength?); "
            "to add a new key anyway, give +elbo.strenght=2",
        ),
        (
            ["elbo_t2ialign.generate", "steps=4", "prompts.fle=a"],
            "error: prompts.fle is not a setting of generate.yaml (did you mean prompts.file?); "
            "to add a new key anyway, give +prompts.fle=a",
        ),
        (
            ["elbo_t2ialign.explain", "img.png", "cat", "elbo.strenght=2"],
            "error: elbo.strenght is not a setting of explain.yaml (did you mean elbo.strength?); "
            "to add a new key anyway, give +elbo.strenght=2",
        ),
        (
            ["elbo_t2ialign.grid", "--plan", str(REPO / "configs/grid/demo.yaml"), "elbo.strenght=2"],
            "error: cell 1: elbo.strenght is not a setting of segment.yaml (did you mean elbo.strength?); "
            "to add a new key anyway, give +elbo.strenght=2",
        ),
        (
            ["elbo_t2ialign.demo", "--images", "1", "elbo.strenght=2"],
            "error: elbo.strenght is not a setting of segment.yaml (did you mean elbo.strength?); "
            "to add a new key anyway, give +elbo.strenght=2",
        ),
    ],
    ids=["segment", "generate", "explain", "grid", "demo"],
)
def test_misspelt_setting_on_every_hydra_command(tmp_path, args, line):
    (tmp_path / "img.png").write_bytes(b"")  # explain composes its config before it reads the image
    done = _cli(*args, cwd=tmp_path, timeout=120)
    assert (done.returncode, done.stderr.strip().splitlines()[-1:]) == (EXIT_BAD_INPUT, [line]), done.stderr
    assert "Traceback" not in done.stderr and "HYDRA_FULL_ERROR" not in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.png"]  # nothing written


# ------------------------------------------------------------------ item 6: Ctrl-C while importing
def _has_loaded(pid: int, library: str) -> bool:
    try:
        return library in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc to see the import under way")
@pytest.mark.parametrize("command", ["elbo_t2ialign.segment", "elbo_t2ialign.evaluate"])
def test_ctrl_c_while_the_libraries_import_prints_one_line(tmp_path, command):
    proc = subprocess.Popen(
        [sys.executable, "-m", command, f"output_dir={tmp_path / 'run'}"],
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 60
    # torch's shared library is mapped: the process is inside `import torch` (the package imports it)
    while not _has_loaded(proc.pid, "libtorch") and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    assert proc.poll() is None, "the command ended before torch was imported"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_INTERRUPTED, err
    assert err.splitlines() == ["error: interrupted while starting; nothing was run: start the command again"]
    assert out == "" and list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ item 1: file systems that refuse
def _can(*command: str) -> bool:
    try:
        return subprocess.run(list(command), capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _last_lines(stderr: str) -> list[str]:
    """The command's own error lines (not the libraries' loading bars and notes)."""
    return [line for line in stderr.splitlines() if line.startswith("error:") or "Traceback" in line]


# each command of the script writes its status and its stderr's `error:` lines to stdout
IN_NAMESPACE = """
set -u
step() { name=$1; shift; "$PY" -m "$@" > /dev/null 2> "$TMP/err"; echo "$name=$?"; grep -E '^error:|Traceback' "$TMP/err" | sed "s/^/$name: /"; }
"""

READ_ONLY = (
    IN_NAMESPACE
    + """
mount -t tmpfs -o size=1m,ro tmpfs "$DISK"
step segment_new elbo_t2ialign.segment "$@" output_dir="$DISK/run"
mount --bind -o ro "$RUN" "$RUN"
step segment_resume elbo_t2ialign.segment "$@" output_dir="$RUN"
step evaluate elbo_t2ialign.evaluate "$RUN"
step report elbo_t2ialign.report "$RUN" --out "$DISK/report" --no-plot
"""
)


@TESTBED
def test_read_only_disk_one_line_for_every_command_and_nothing_changed(segmented, shapes, tmp_path):
    """A real read-only file system (a read-only tmpfs, and the finished run bind-mounted read-only,
    in a user and mount namespace): a new run, a resumed one, an evaluation and a report each end
    with one line and status 5, and the run's files are the same bytes."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if not _can("unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o ro tmpfs {disk}"):
        pytest.skip("no read-only mount here (unshare -rm or mount refused)")
    run = tmp_path / "run"
    subprocess.run(["cp", "-a", str(segmented[0]), str(run)], check=True)
    before = _tree(run)
    args = [a for a in _segment_args(shapes, tmp_path / "x")[1:] if not a.startswith("output_dir=")]
    env = _env() | {"PY": sys.executable, "DISK": str(disk), "RUN": str(run), "TMP": str(tmp_path)}
    done = subprocess.run(
        ["unshare", "-rm", "sh", "-c", READ_ONLY, "sh", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    tail = "choose a folder on a writable disk (or remount it) and rerun the same command: finished outputs are kept"
    assert done.stdout.splitlines() == [
        "segment_new=5",
        f"segment_new: error: read-only file system: cannot write {disk / 'run'}; {tail}",
        "segment_resume=5",
        f"segment_resume: error: read-only file system: cannot write {run / '.lock'}; {tail}",
        "evaluate=5",
        f"evaluate: error: read-only file system: cannot write {run / 'metrics.json'}; {tail}",
        "report=5",
        f"report: error: read-only file system: cannot write {disk / 'report'}; {tail}",
    ], done.stderr
    assert _tree(run) == before


PERMISSION = (
    IN_NAMESPACE
    + """
chmod -R a-w "$RUN"
step evaluate elbo_t2ialign.evaluate "$RUN"
step segment_resume elbo_t2ialign.segment "$@" output_dir="$RUN"
chmod a+w "$RUN"
chmod a-r "$RUN/maps"
step evaluate_unreadable elbo_t2ialign.evaluate "$RUN"
chmod -R u+rw "$RUN"
"""
)


@TESTBED
def test_permission_denied_one_line_and_nothing_changed(segmented, shapes, tmp_path):
    """Permission denied, made real although the tests run as root: the commands run as a non-root
    user of a user namespace (`unshare --map-user=1000`), which owns the files but has no
    capabilities, so that mode bits bind it."""
    if not _can("unshare", "--user", "--map-user=1000", "--map-group=1000", "true"):
        pytest.skip("no user namespace with a non-root user here (unshare --map-user refused)")
    run = tmp_path / "run"
    subprocess.run(["cp", "-a", str(segmented[0]), str(run)], check=True)
    before = _tree(run)
    args = [a for a in _segment_args(shapes, tmp_path / "x")[1:] if not a.startswith("output_dir=")]
    env = _env() | {"PY": sys.executable, "RUN": str(run), "TMP": str(tmp_path)}
    done = subprocess.run(
        ["unshare", "--user", "--map-user=1000", "--map-group=1000", "sh", "-c", PERMISSION, "sh", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    tail = "give this user access to it (or choose another folder) and rerun the same command: finished outputs are kept"
    assert done.stdout.splitlines() == [
        "evaluate=5",
        f"evaluate: error: permission denied: {run / 'metrics.json'}; {tail}",
        "segment_resume=5",
        f"segment_resume: error: permission denied: {run / '.lock'}; {tail}",
        "evaluate_unreadable=5",
        f"evaluate_unreadable: error: permission denied: {run / 'maps'}; {tail}",
    ], done.stderr
    assert _tree(run) == before


@TESTBED
def test_output_below_a_regular_file(segmented, shapes, tmp_path):
    """An output folder whose path runs through a regular file, or is one: one line, status 5."""
    (tmp_path / "afile").write_text("mine\n")
    tail = "and rerun the same command: finished outputs are kept"
    below = f"{tmp_path / 'afile' / 'run'}: a part of this path is a regular file, not a folder; choose another folder"
    cases = [
        (
            [
                *_segment_args(shapes, tmp_path / "afile" / "run"),
            ],
            below,
        ),
        (
            [
                "elbo_t2ialign.generate",
                "model.id=tiny:sd",
                "model.name=t",
                "prompts=demo",
                "steps=2",
                f"output_dir={tmp_path / 'afile' / 'run'}",
            ],
            below,
        ),
        (["elbo_t2ialign.report", str(segmented[0]), "--out", str(tmp_path / "afile" / "run")], below),
        (
            [
                "elbo_t2ialign.generate",
                "model.id=tiny:sd",
                "model.name=t",
                "prompts=demo",
                "steps=2",
                f"output_dir={tmp_path / 'afile'}",
            ],
            f"{tmp_path / 'afile'} is a regular file, not a folder; choose another folder (or move the file away)",
        ),
    ]
    for args, line in cases:
        done = _cli(*args, cwd=tmp_path)
        assert (done.returncode, _last_lines(done.stderr)) == (5, [f"error: {line} {tail}"]), (
            args,
            done.stderr,
        )
    assert (
        sorted(p.name for p in tmp_path.iterdir()) == ["afile"]
        and (tmp_path / "afile").read_text() == "mine\n"
    )


FULL = (
    IN_NAMESPACE
    + """
mount -t tmpfs -o size=4m tmpfs "$DISK"
cp -a "$RUN" "$DISK/run"
cp -a "$REPORT" "$DISK/report"
dd if=/dev/zero of="$DISK/filler" bs=4k 2> /dev/null
step evaluate elbo_t2ialign.evaluate "$DISK/run"
step rep elbo_t2ialign.report "$DISK/run" --out "$DISK/report"
cd "$DISK" && find . -mindepth 1 -name '.*' | sed 's/^/left=/'
find run report -type f | sort | xargs sha256sum | sed 's/^/sha=/'
rm "$DISK/filler"
step evaluate_freed elbo_t2ialign.evaluate "$DISK/run"
step rep_freed elbo_t2ialign.report "$DISK/run" --out "$DISK/report"
ls report | sed 's/^/report=/'
"""
)


@TESTBED
def test_full_disk_while_evaluating_and_writing_the_report(segmented, shapes, tmp_path):
    """A real full disk (a tmpfs filled to the last block, in a user and mount namespace) under a
    finished run and its earlier report: `evaluate` and `report` end with one line and status 4, no
    temporary is left and every file is the same bytes; once space is freed both finish."""
    import hashlib

    disk = tmp_path / "disk"
    disk.mkdir()
    if not _can("unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {disk}"):
        pytest.skip("no tmpfs mount here (unshare -rm or mount refused)")
    run, report = tmp_path / "run", tmp_path / "report"
    subprocess.run(["cp", "-a", str(segmented[0]), str(run)], check=True)
    first = _cli("elbo_t2ialign.report", str(run), "--out", str(report), "--no-plot", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    before = {f"run/{k}": v for k, v in _tree(run).items()} | {
        f"report/{k}": v for k, v in _tree(report).items()
    }
    env = _env() | {"PY": sys.executable, "DISK": str(disk), "RUN": str(run), "REPORT": str(report)}
    env["TMP"] = str(tmp_path)
    done = subprocess.run(
        ["unshare", "-rm", "sh", "-c", FULL],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    lines = done.stdout.splitlines()
    tail = "(or choose a folder on another disk) and rerun the same command: finished outputs are kept, nothing half-written is left"
    assert [line for line in lines if not line.startswith(("sha=", "report="))] == [
        "evaluate=4",
        f"evaluate: error: no space left on device writing {disk / 'run' / 'metrics.json'}; free space there {tail}",
        "rep=4",
        f"rep: error: no space left on device writing {disk / 'report' / 'segmentation.tex'}; free space there {tail}",
        "evaluate_freed=0",
        "rep_freed=0",
    ], (done.stdout, done.stderr)
    hashes = dict(reversed(line[4:].split("  ", 1)) for line in lines if line.startswith("sha="))
    assert hashes == {k: hashlib.sha256(v).hexdigest() for k, v in before.items()}
    assert {"report=report.md", "report=segmentation.csv"} <= set(lines)


# ------------------------------------------------------------------ item 2: damaged models
def _damage(kind: str, folder: Path) -> Path:
    """A copy of the bundled testbed pipeline in `folder`, damaged one way; returns the file at fault."""
    import shutil

    shutil.copytree(train.DEFAULT_MODEL_DIR, folder)
    unet = folder / "unet" / "diffusion_pytorch_model.safetensors"
    if kind == "truncated":
        with open(unet, "r+b") as f:
            f.truncate(unet.stat().st_size // 2)
        return unet
    if kind == "garbage header":
        data = bytearray(unet.read_bytes())
        data[8:40] = b"\xff" * 32
        unet.write_bytes(bytes(data))
        return unet
    if kind == "empty":
        unet.write_bytes(b"")
        return unet
    if kind == "no model_index.json":
        (folder / "model_index.json").unlink()
        return folder
    if kind == "component missing":
        shutil.rmtree(folder / "text_encoder")
        return folder / "text_encoder"
    if kind == "no weights":
        (folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()
        return folder / "vae"
    if kind == "config mismatch":
        config = folder / "unet" / "config.json"
        config.write_text(
            config.read_text().replace('"cross_attention_dim": 64', '"cross_attention_dim": 48')
        )
        return config
    raise AssertionError(kind)


DAMAGE = {
    "truncated": "is damaged (truncated: 2171500 bytes, its header describes 4343000)",
    "garbage header": "is damaged (its header is not valid safetensors JSON: UnicodeDecodeError)",
    "empty": "is damaged (0 bytes: not a safetensors file (empty or cut off))",
    "no model_index.json": "has no model_index.json: it is not a complete diffusers pipeline folder; check the path, or",
    "component missing": "is missing (model_index.json lists text_encoder: transformers CLIPTextModel)",
    "no weights": "holds no weights file (*.safetensors or *.bin)",
    "config mismatch": "does not match the weights beside it (Cannot load because down_blocks.0.attentions.0."
    "transformer_blocks.0.attn2.to_k.weight expected shape torch.Size([32, 48]), but got torch.Size([32, 64])); "
    "the config and the weights come from different models",
}


@TESTBED
@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_model_folder_names_the_file(tmp_path, kind):
    import torch

    from elbo_t2ialign.cli import DamagedFileError
    from elbo_t2ialign.core.adapters import load_pipeline

    folder = tmp_path / "model"
    culprit = _damage(kind, folder)
    if kind == "truncated":
        assert culprit.stat().st_size == 2171500  # the half kept, as the message says
    with pytest.raises(DamagedFileError) as err:
        load_pipeline(str(folder), torch.device("cpu"), torch.float32)
    message = str(err.value)
    assert message.startswith(f"{culprit} {DAMAGE[kind]}"), message
    assert message.endswith(
        f"download the model again into a new folder (`hf download <repo id> --local-dir <folder>`) or "
        f"restore {folder} from a copy"
    )
    assert "\n" not in message


@TESTBED
def test_damaged_model_on_the_command_line_one_line_status_3(shapes, tmp_path):
    """`segment` and `explain` with a truncated weights file: one line naming it, status 3, no run
    folder left behind."""
    culprit = _damage("truncated", tmp_path / "model")
    line = f"error: {culprit} {DAMAGE['truncated']}; download the model again"
    out = tmp_path / "run"
    seg = _cli(*_segment_args(shapes, out), f"model.id={tmp_path / 'model'}", cwd=tmp_path)
    assert seg.returncode == 3 and len(_last_lines(seg.stderr)) == 1, seg.stderr
    assert _last_lines(seg.stderr)[0].startswith(line)
    assert not out.exists()
    image = tmp_path / "image.png"
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 30, 30)).save(image)
    exp = _cli(
        "elbo_t2ialign.explain",
        str(image),
        "square",
        "model=shapes",
        f"model.id={tmp_path / 'model'}",
        "device=cpu",
        f"output_dir={tmp_path / 'explained'}",
        cwd=tmp_path,
    )
    assert exp.returncode == 3 and [ln for ln in _last_lines(exp.stderr) if ln.startswith(line)], exp.stderr
    assert not (tmp_path / "explained").exists() or not any((tmp_path / "explained").iterdir())


# ------------------------------------------------------------------ item 3: non-finite numbers
def _edited_testbed(folder: Path, edit) -> Path:
    """A copy of the testbed pipeline whose UNet weights `edit(weights)` changed in place."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(train.DEFAULT_MODEL_DIR, folder)
    path = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights = load_file(path)
    edit(weights)
    save_file(weights, path)
    return folder


def _nan_in_cross_attention(weights):
    weights["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"][0, 0] = float("nan")


def _overflows_in_float16(weights):
    weights["conv_in.weight"] *= 3e4  # activations beyond float16's 65504; float32 holds them


CHECKED = {"elbo_timesteps": [1, 501], "collect_timesteps": [20, 100]}


@TESTBED
def test_nan_weights_are_refused_where_they_arise(tmp_path):
    """A NaN in one cross-attention weight: the ELBO losses are NaN (two classes), the cross-attention
    maps are NaN (one class, no ELBO forwards). Each is refused naming it; no maps are returned."""
    import numpy as np
    from PIL import Image

    from elbo_t2ialign import Aligner
    from elbo_t2ialign.core.finite import NonFiniteError

    aligner = Aligner.from_pretrained(
        str(_edited_testbed(tmp_path / "m", _nan_in_cross_attention)), device="cpu"
    )
    image = Image.fromarray(np.full((32, 32, 3), 180, np.uint8))
    damaged_weights = (
        "with float32 this points to damaged weights: check the model's files (download it again)"
    )
    with pytest.raises(NonFiniteError) as err:
        aligner.heatmaps(image, ["square", "circle"], **CHECKED)
    assert (
        str(err.value)
        == f"non-finite numbers in the ELBO losses (denoiser) (2 NaN, 0 infinite of 2 values); {damaged_weights}"
    )
    with pytest.raises(NonFiniteError) as err:
        aligner.heatmaps(image, ["square"], **CHECKED)
    assert str(err.value).startswith("non-finite numbers in the cross-attention maps (denoiser) (")
    assert err.value.what == "the cross-attention maps (denoiser)"
    # given losses skip the ELBO forwards: the attention check still refuses
    with pytest.raises(NonFiniteError, match="cross-attention maps"):
        aligner.heatmaps(image, ["square", "circle"], elbo_losses={"square": 1.0, "circle": 2.0}, **CHECKED)


@TESTBED
def test_float16_overflow_is_refused_and_float32_gives_the_maps(tmp_path):
    """A real float16 overflow: the first convolution's weights scaled by 3e4 give activations beyond
    float16's range; in float16 the image is refused with the setting that avoids it, in float32 the
    same model gives finite maps."""
    import numpy as np
    from PIL import Image

    from elbo_t2ialign import Aligner
    from elbo_t2ialign.core.finite import NonFiniteError

    folder = _edited_testbed(tmp_path / "m", _overflows_in_float16)
    image = Image.fromarray(np.full((32, 32, 3), 180, np.uint8))
    half = Aligner.from_pretrained(str(folder), device="cpu", dtype="float16")
    with pytest.raises(NonFiniteError) as err:
        half.heatmaps(image, ["square", "circle"], **CHECKED)
    assert str(err.value).endswith(
        "float16 overflows on some models and images: run in float32 or bfloat16 (model.dtype=float32 or "
        "model.dtype=bfloat16 on the command line, dtype= in the API)"
    )
    full = Aligner.from_pretrained(str(folder), device="cpu", dtype="float32")
    result = full.heatmaps(image, ["square", "circle"], **CHECKED)
    assert all(np.isfinite(m).all() for m in result.heatmaps.values())
    assert all(np.isfinite(v) for v in result.losses.values()) and len(set(result.losses.values())) == 2


@TESTBED
@pytest.mark.parametrize("on_error", ["skip", "stop"])
def test_segment_with_nan_weights_records_or_stops_and_writes_no_maps(shapes, tmp_path, on_error):
    """`segment` on a model with a NaN weight: on_error=skip records each image and, as the first
    images all fail the same way, stops the run (the model is at fault); on_error=stop stops at the
    first image naming it. No map is written."""
    model = _edited_testbed(tmp_path / "m", _nan_in_cross_attention)
    out = tmp_path / "run"
    done = _cli(
        *_segment_args(shapes, out, images=2), f"model.id={model}", f"on_error={on_error}", cwd=tmp_path
    )
    lines = _last_lines(done.stderr)
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    if on_error == "skip":
        assert lines[0].startswith(
            "error: the first 2 image(s) of this launch all gave non-finite numbers (in the "
        ), lines
        assert lines[0].endswith(
            "so the model or its dtype is at fault, not the images; with float32 this points to damaged "
            "weights: check the model's files (download it again); finished images are kept"
        )
        assert sorted(p.name for p in (out / "skipped").iterdir()) == ["val_00000.json", "val_00001.json"]
    else:
        assert lines[0].startswith("error: val_00000: non-finite numbers in the "), lines
        assert lines[0].endswith("(on_error=stop: finished images are kept; a rerun resumes)")
    assert not list((out / "maps").glob("*/*.png")) if (out / "maps").exists() else True


def test_one_image_with_non_finite_numbers_is_skipped_and_the_run_goes_on(tmp_path):
    """With on_error=skip, an image that fails with non-finite numbers among images that do not is
    recorded and the run goes on (the run stops only when the first images all fail)."""
    from elbo_t2ialign.core.finite import NonFiniteError
    from elbo_t2ialign.devtools.fixtures import PixelAligner, fixture_config, random_samples, write_dataset
    from elbo_t2ialign.segmentation import run

    class SecondImageOverflows(PixelAligner):
        def observe(self, image, *args, **kwargs):
            if len(self.calls) == 1:
                self.calls.append({})
                raise NonFiniteError(
                    "non-finite numbers in the ELBO losses (denoiser) (...)", "the ELBO losses"
                )
            return super().observe(image, *args, **kwargs)

    data = write_dataset(tmp_path / "data", ["cat", "dog"], random_samples(["cat", "dog"], 4))
    out = run(fixture_config(data, tmp_path / "run", num_images=4), aligner=SecondImageOverflows())
    finished = sorted(p.name for p in (out / "maps").iterdir() if (p / "scores.json").is_file())
    skipped = sorted(p.stem for p in (out / "skipped").iterdir())
    assert len(finished) == 3 and len(skipped) == 1 and skipped[0] not in finished


# ------------------------------------------------------------------ item 4: unusual images
@pytest.fixture(scope="module")
def testbed_aligner():
    if not (train.DEFAULT_MODEL_DIR / "model_index.json").is_file():
        pytest.skip("no committed testbed model")
    from elbo_t2ialign import Aligner

    return Aligner.from_pretrained(str(train.DEFAULT_MODEL_DIR), device="cpu", **CHECKED)


def _unusual_dataset(root: Path) -> tuple[Path, dict]:
    """One image per unusual case (mask: the top rows class 1), each stored as the case needs; the
    file is named .png whatever its format (PIL reads the content)."""
    import numpy as np
    from PIL import Image

    from elbo_t2ialign.devtools.fixtures import write_dataset

    rng = np.random.default_rng(0)
    sizes = {"tiny2x2": (2, 2), "tiny3x5": (3, 5), "one_pixel": (1, 1)}
    names = [
        "tiny2x2",
        "tiny3x5",
        "one_pixel",
        "cmyk",
        "i16",
        "p_transparent",
        "la",
        "exif_rotated",
        "mask_10x10",
    ]
    samples = {}
    for name in names:
        h, w = sizes.get(name, (24, 32))
        mask = np.zeros((h, w), np.uint8)
        mask[: h // 2 + 1] = 1
        samples[name] = (rng.integers(0, 256, (h, w, 3), dtype=np.uint8), mask)
    data = write_dataset(root, ["cat"], samples)
    images = data / "images"
    Image.fromarray(samples["cmyk"][0]).convert("CMYK").save(images / "cmyk.png", format="JPEG", quality=95)
    wide = rng.integers(0, 65536, (24, 32)).astype(np.uint16)
    wide[0, 0], wide[0, 1] = 0, 65535  # the range is known: 0..65535
    Image.fromarray(wide).save(images / "i16.png")
    Image.fromarray(samples["p_transparent"][0]).convert("P").save(
        images / "p_transparent.png", transparency=0
    )
    Image.fromarray(samples["la"][0]).convert("LA").save(images / "la.png")
    exif = Image.Image().getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(samples["exif_rotated"][0]).save(
        images / "exif_rotated.png", format="JPEG", exif=exif, quality=95
    )
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(data / "masks" / "mask_10x10.png")
    return data, {"i16": wide}


def test_unusual_images_through_a_segmentation_run(tmp_path, testbed_aligner):
    """Every PIL mode a dataset may hold, EXIF orientation, tiny images and a mask of another size,
    with the testbed model: each image gets its maps at its stored size, or is skipped with one line."""
    import json

    import numpy as np
    from PIL import Image

    from elbo_t2ialign.devtools.fixtures import fixture_config
    from elbo_t2ialign.segmentation import run
    from elbo_t2ialign.segmentation.datasets import SegDataset

    data, raw = _unusual_dataset(tmp_path / "data")
    conf = fixture_config(data, tmp_path / "run")
    dataset = SegDataset(conf["dataset"])
    loaded = {n: np.asarray(dataset.load_image(n)) for n in dataset.images}
    # as the reference reads a dataset image: Image.open(path).convert("RGB") (the library's result)
    for name in ("cmyk", "p_transparent", "la", "exif_rotated", "tiny3x5"):
        with Image.open(data / "images" / f"{name}.png") as img:
            assert np.array_equal(loaded[name], np.asarray(img.convert("RGB"))), name
    # EXIF orientation is not applied: the stored 32x24 pixels, not the displayed 24x32
    assert loaded["exif_rotated"].shape == (24, 32, 3)
    # 16-bit: rescaled by its range (0..65535) by hand, where convert("RGB") would clip at 255
    expected = np.round(raw["i16"].astype(np.float64) / 65535 * 255).astype(np.uint8)
    assert np.array_equal(loaded["i16"], np.repeat(expected[..., None], 3, axis=2))

    out = run(conf, aligner=testbed_aligner)
    sizes = {}
    for folder in sorted((out / "maps").iterdir()):
        with Image.open(folder / "elbo_001.png") as m:
            sizes[folder.name] = m.size
    assert sizes == {
        "cmyk": (32, 24),
        "exif_rotated": (32, 24),
        "i16": (32, 24),
        "la": (32, 24),
        "p_transparent": (32, 24),
        "tiny2x2": (2, 2),
        "tiny3x5": (5, 3),
    }
    skipped = {p.stem: json.loads(p.read_text())["error"] for p in (out / "skipped").iterdir()}
    assert skipped == {
        "one_pixel": "image one_pixel is 1x1; heatmaps need at least 2x2 pixels",
        "mask_10x10": "mask of mask_10x10 is 10x10 but the image is 32x24",
    }


def test_api_images_of_every_mode():
    """The API and `explain` (`as_image`, then `to_rgb`): transparency over white, 16-bit rescaled,
    CMYK and palette through PIL's conversion, EXIF orientation not applied, 1x1 refused."""
    import numpy as np
    from PIL import Image

    from elbo_t2ialign.core.adapters.base import to_rgb
    from elbo_t2ialign.core.images import as_image

    palette = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), mode="P")
    palette.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    palette.info["transparency"] = 0
    assert np.asarray(to_rgb(palette)).tolist() == [
        [[255, 255, 255], [200, 100, 50]],
        [[200, 100, 50], [255, 255, 255]],
    ]
    la = Image.fromarray(np.array([[[40, 0], [40, 255]]], np.uint8), mode="LA")
    assert np.asarray(to_rgb(la)).tolist() == [[[255, 255, 255], [40, 40, 40]]]
    wide = Image.fromarray(np.array([[1000, 3000], [2000, 5000]], np.uint16))
    expected = np.round((np.array([[1000, 3000], [2000, 5000]]) - 1000) / 4000 * 255)
    assert np.asarray(to_rgb(wide))[..., 0].tolist() == expected.tolist()
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))  # pure red in CMYK
    assert np.asarray(to_rgb(as_image(cmyk))).tolist() == [[[255, 0, 0]] * 2] * 2
    with pytest.raises(ValueError, match="the image is 1x1; heatmaps need at least 2x2 pixels"):
        as_image(Image.new("RGB", (1, 1)))


def test_an_image_above_pils_size_limit_is_skipped_with_one_line(tmp_path, monkeypatch):
    """PIL's decompression-bomb refusal (2 x Image.MAX_IMAGE_PIXELS, lowered here so that a 100x100
    image meets it) is an image error, not a traceback."""
    import numpy as np
    from PIL import Image

    from elbo_t2ialign.devtools.fixtures import fixture_config, write_dataset
    from elbo_t2ialign.segmentation.config import InputError
    from elbo_t2ialign.segmentation.datasets import SegDataset

    data = write_dataset(
        tmp_path / "d", ["cat"], {"big": (np.zeros((100, 100, 3), np.uint8), np.ones((100, 100)))}
    )
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4000)
    with pytest.raises(
        InputError, match=r"^image big: .*big.png is too large for PIL \(Image size \(10000 pixels\)"
    ):
        SegDataset(fixture_config(data, tmp_path / "run")["dataset"]).load_image("big")


# ------------------------------------------------------------------ item 5: several processes at once
def _to_do(cell: Path) -> int:
    """Images the launches of a cell set out to compute, summed over its segment.log."""
    import re

    return sum(int(m) for m in re.findall(r"(\d+) to do ->", (cell / "segment.log").read_text()))


@TESTBED
def test_two_grid_processes_on_one_grid_compute_every_cell_once(shapes, tmp_path):
    """Two `grid` processes started together on the same 3-cell grid: both end with status 0, every
    image is set out to be computed once in all (a cell in use by the other process is left to it,
    not counted as stopped), and the last report is complete."""
    import yaml

    out = tmp_path / "grid"
    overrides = [a for a in _segment_args(shapes, out, images=2)[1:] if not a.startswith("output_dir=")]
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        yaml.safe_dump({"output_dir": str(out), "overrides": overrides, "axes": {"seed": [0, 1, 2]}})
    )
    command = [sys.executable, "-m", "elbo_t2ialign.grid", str(grid)]
    procs = [
        subprocess.Popen(
            command, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    cells = [out / str(seed) for seed in (0, 1, 2)]
    assert [_to_do(c) for c in cells] == [2, 2, 2], outputs
    assert all(len(list((c / "maps").glob("*/scores.json"))) == 2 for c in cells)
    report = (out / "report" / "report.md").read_text()
    assert "3 run(s): 3 done." in report and "Still running" not in report


@TESTBED
def test_report_and_evaluate_while_a_launch_holds_the_run(segmented, shapes, tmp_path):
    """A run whose lock a live launch holds (taken here: a real flock of another open file) and
    whose split has an image left: `report` lists it as still running and `evaluate` says so in
    metrics.md; both end with status 0 and change nothing of the run's images."""
    from elbo_t2ialign.runfolder import RunLock, lock_held
    from elbo_t2ialign.segmentation.config import ConfigError

    run = tmp_path / "run"
    subprocess.run(["cp", "-a", str(segmented[0]), str(run)], check=True)
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("num_images: 1", "num_images: 2"))
    before = _tree(run / "maps")
    assert not lock_held(run)
    lock = RunLock(run / ".lock", ConfigError).acquire()
    try:
        assert lock_held(run)
        rep = _cli(
            "elbo_t2ialign.report", str(run), "--out", str(tmp_path / "report"), "--no-plot", cwd=tmp_path
        )
        ev = _cli("elbo_t2ialign.evaluate", str(run), cwd=tmp_path)
    finally:
        lock.release()
    assert rep.returncode == 0 and ev.returncode == 0, (rep.stderr, ev.stderr)
    assert (
        f"Still running (1; write the report again when they end): {run} (1/2 images)."
        in (tmp_path / "report" / "report.md").read_text()
    )
    assert (
        "- 1 image(s) of the split are not finished yet: the run is incomplete. The segmentation is still "
        "running: evaluate again when it ends." in (run / "metrics.md").read_text()
    )
    assert _tree(run / "maps") == before and not lock_held(run)


def test_a_launch_refused_by_another_leaves_that_launchs_new_folder_alone(tmp_path, monkeypatch):
    """Two launches that both find no folder: the second takes the lock first and writes its
    config; the first, refused, must not remove the folder it did not make its own (it used to:
    the other launch then failed writing into a vanished folder)."""
    from elbo_t2ialign.devtools.fixtures import PixelAligner, fixture_config, random_samples, write_dataset
    from elbo_t2ialign.runfolder import RunLock
    from elbo_t2ialign.segmentation import run
    from elbo_t2ialign.segmentation.config import ConfigError

    data = write_dataset(tmp_path / "data", ["cat"], random_samples(["cat"], 2))
    out = tmp_path / "run"
    acquire, other = RunLock.acquire, []

    def the_other_launch_first(self):
        if not other:  # the other launch (another open file: a real conflicting flock) wins the race
            other.append(acquire(RunLock(self.path, ConfigError)))
            (out / "config.yaml").write_text("the other launch's config\n")
        return acquire(self)

    monkeypatch.setattr(RunLock, "acquire", the_other_launch_first)
    with pytest.raises(ConfigError, match=r"is in use by pid \d+"):
        run(fixture_config(data, out), aligner=PixelAligner())
    assert (out / "config.yaml").read_text() == "the other launch's config\n"
    other[0].release()
