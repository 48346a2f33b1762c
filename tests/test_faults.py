"""The fault table of docs/reliability.md, a test per row: a full disk, a damaged record, Ctrl-C or
SIGTERM, a concurrent second launch and deleted or truncated outputs, for every entry point that
writes. In process, with the faults injected at the writes (`devtools.faults.WriteFault`: the
first write of every file in turn fails half-way) and the commands' own error handling
(`cli.cli_run`); the real signals, a real full tmpfs and the command lines themselves are in
test_fault_injection.py."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from elbo_t2ialign.cli import (
    EXIT_DAMAGED,
    EXIT_INTERRUPTED,
    EXIT_NO_SPACE,
    EXIT_TERMINATED,
    Terminated,
    cli_run,
)
from elbo_t2ialign.devtools.faults import WriteFault, whole_files
from elbo_t2ialign.devtools.fixtures import PixelAligner, fixture_config, random_samples, write_dataset
from elbo_t2ialign.runfolder import RunLock
from elbo_t2ialign.segmentation import run
from elbo_t2ialign.segmentation.config import ConfigError, SegmentationError
from elbo_t2ialign.segmentation.evaluate import main as evaluate_main

CLASSES = ["cat", "dog", "boat"]
GARBAGE = bytes(range(0x80, 0x100)) + b"\x00\x01: [\n"  # not UTF-8, not YAML, not JSON


def one_error(capsys) -> str:
    """The single `error:` line a command printed to stderr (and no traceback)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def maps(out: Path) -> dict[str, bytes]:
    return {k: v for k, v in snapshot(out).items() if k.startswith("maps/")}


# ------------------------------------------------------------------ segment
@pytest.fixture
def data(tmp_path):
    return write_dataset(tmp_path / "data", CLASSES, random_samples(CLASSES, 3))


def segment(cfg) -> int:
    """What `python -m elbo_t2ialign.segment` does with its config, on the stand-in aligner."""
    return cli_run(lambda: run(cfg, aligner=PixelAligner()), (SegmentationError,), False)[1]


def test_segment_disk_full_at_every_file_then_resumes(tmp_path, data, capsys):
    reference = maps(run(fixture_config(data, tmp_path / "ref"), aligner=PixelAligner()))
    with WriteFault(tmp_path / "probe") as probe:
        run(fixture_config(data, tmp_path / "probe"), aligner=PixelAligner())
    sites = probe.first_writes()
    assert len(sites) >= 10  # config, identity, run.json, launches, variants.json and each map
    for k in sites:
        out = tmp_path / f"run-{k}"
        with WriteFault(out, at_call=k):
            assert segment(fixture_config(data, out)) == EXIT_NO_SPACE
        line = one_error(capsys)
        assert line.startswith(f"error: no space left on device writing {out}")
        assert line.endswith(
            "and rerun the same command: finished outputs are kept, nothing half-written is left"
        )
        if out.exists():
            assert whole_files(out) == []
            kept = maps(out)
            assert {k: reference[k] for k in kept} == kept  # every finished image is whole and kept
        assert segment(fixture_config(data, out)) == 0
        assert maps(out) == reference


@pytest.mark.parametrize(
    "error, code", [(KeyboardInterrupt, EXIT_INTERRUPTED), (Terminated, EXIT_TERMINATED)]
)
def test_segment_interrupted_at_a_write_then_resumes(tmp_path, data, capsys, error, code):
    reference = maps(run(fixture_config(data, tmp_path / "ref"), aligner=PixelAligner()))
    with WriteFault(tmp_path / "probe") as probe:
        run(fixture_config(data, tmp_path / "probe"), aligner=PixelAligner())
    sites = probe.first_writes()
    for k in (sites[1], sites[len(sites) // 2], sites[-1]):
        out = tmp_path / f"run-{k}"
        with WriteFault(out, at_call=k, error=error):
            assert segment(fixture_config(data, out)) == code
        what = "interrupted" if code == EXIT_INTERRUPTED else "terminated (SIGTERM)"
        assert one_error(capsys) == (
            f"error: {what}; rerun the same command to resume: finished outputs are kept"
        )
        assert not out.exists() or whole_files(out) == []
        assert segment(fixture_config(data, out)) == 0
        assert maps(out) == reference


@pytest.mark.parametrize(
    "name, content",
    [
        ("config.yaml", GARBAGE),
        ("config.yaml", b""),
        ("config.yaml", b"model: {name: pixel, id: none}\n"),  # half a config
        ("identity.json", GARBAGE),
        ("identity.json", b"[]"),
        ("variants.json", b'[{"name": "elbo", "str'),
    ],
)
def test_segment_damaged_record_names_the_file_and_changes_nothing(tmp_path, data, capsys, name, content):
    out = run(fixture_config(data, tmp_path / "run", num_images=2), aligner=PixelAligner())
    (out / name).write_bytes(content)
    before = snapshot(out)
    aligner = PixelAligner()
    code = cli_run(lambda: run(fixture_config(data, out), aligner=aligner), (SegmentationError,), False)[1]
    assert code == EXIT_DAMAGED
    line = one_error(capsys)
    assert line.startswith(f"error: {out / name} is damaged (")
    remedy = (
        "delete it: it is rebuilt from config.yaml and the images' scores.json"
        if name == "variants.json"
        else "restore it from a copy, or start a new run with output_dir=<new folder>"
    )
    assert line.endswith(remedy)
    after = snapshot(out)
    if name == "variants.json":  # read once the launch is recorded: launches.jsonl gained its line
        assert after.pop("launches.jsonl").startswith(before.pop("launches.jsonl"))
    assert after == before and aligner.calls == []
    if name == "variants.json":  # the remedy works: deleted, it is rebuilt and the run resumes
        (out / name).unlink()
        assert segment(fixture_config(data, out)) == 0
        assert [v["name"] for v in json.loads((out / name).read_text())] == ["baseline", "elbo"]


# ------------------------------------------------------------------ evaluate
@pytest.fixture
def segmented(tmp_path, data):
    return run(fixture_config(data, tmp_path / "run"), aligner=PixelAligner())


def evaluate_cli(out: Path, *args: str) -> int:
    """`python -m elbo_t2ialign.evaluate` in this process: its status (it exits on a fault)."""
    try:
        return evaluate_main([str(out), "--no-progress", "--overlays", "1", *args])
    except SystemExit as stop:
        return int(stop.code)


def test_evaluate_disk_full_at_every_file_keeps_the_old_report(tmp_path, segmented, capsys):
    assert evaluate_cli(segmented) == 0
    old = {k: v for k, v in snapshot(segmented).items() if not k.startswith("maps/")}
    with WriteFault(segmented) as probe:
        assert evaluate_cli(segmented) == 0
    sites = probe.first_writes()
    assert len(sites) >= 4  # metrics.json, metrics.md, the plots
    for k in sites:
        with WriteFault(segmented, at_call=k):
            assert evaluate_cli(segmented) == EXIT_NO_SPACE
        assert one_error(capsys).startswith(f"error: no space left on device writing {segmented}")
        assert whole_files(segmented) == []
        now = snapshot(segmented)
        assert json.loads(now["metrics.json"]) == json.loads(old["metrics.json"])  # whole, old or new
        assert set(old) <= set(now)  # nothing that was there is lost
    assert evaluate_cli(segmented) == 0


def test_evaluate_interrupted_leaves_whole_files(segmented, capsys):
    with WriteFault(segmented) as probe:
        assert evaluate_cli(segmented) == 0
    with WriteFault(segmented, at_call=probe.first_writes()[1], error=KeyboardInterrupt):
        assert evaluate_cli(segmented) == EXIT_INTERRUPTED
    assert one_error(capsys).startswith("error: interrupted; rerun the same command")
    assert whole_files(segmented) == []


@pytest.mark.parametrize(
    "name, content",
    [
        ("config.yaml", GARBAGE),
        ("config.yaml", b"seed: 0\n"),
        ("identity.json", b'{"dataset": '),
        ("variants.json", GARBAGE),
        ("maps/img_001/scores.json", b"{"),
    ],
)
def test_evaluate_damaged_record(segmented, capsys, name, content):
    (segmented / name).write_bytes(content)
    assert evaluate_cli(segmented) == EXIT_DAMAGED
    line = one_error(capsys)
    if name.startswith("maps/"):  # a finished output: named, and the segmentation recomputes it
        assert line.startswith("error: 1 file(s) missing or unreadable: img_001: ")
        assert line.endswith(
            "Rerun the segmentation command with the same config: it recomputes damaged images"
        )
    else:
        assert line.startswith(f"error: {segmented / name} is damaged (")
    assert not (segmented / "metrics.json").exists()


def test_evaluate_deleted_or_truncated_maps_then_segment_repairs(tmp_path, data, segmented, capsys):
    reference = maps(segmented)
    first = sorted((segmented / "maps" / "img_000").glob("elbo_*.png"))[0]
    first.unlink()
    second = sorted((segmented / "maps" / "img_002").glob("baseline_*.png"))[0]
    second.write_bytes(reference[str(second.relative_to(segmented))][:50])
    assert evaluate_cli(segmented) == EXIT_DAMAGED
    line = one_error(capsys)
    assert f"{first} missing" in line and f"{second} unreadable" in line
    assert segment(fixture_config(data, segmented)) == 0
    assert maps(segmented) == reference
    assert evaluate_cli(segmented) == 0


def test_evaluate_while_the_run_is_locked_and_two_at_once(tmp_path, segmented):
    """No lock: evaluating a folder that a segmentation holds reads its finished images; two
    evaluations at once each replace the report files whole."""
    with RunLock(segmented / ".lock", ConfigError):
        assert evaluate_cli(segmented) == 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "elbo_t2ialign.evaluate", str(segmented), "--no-progress"]
    procs = [subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0], [p.stderr.read() for p in procs]
    assert whole_files(segmented) == []
    assert json.loads((segmented / "metrics.json").read_text())["num_images"] == 3


# ------------------------------------------------------------------ generate
GEN = ["model.id=tiny:sd", "model.name=tiny_sd", "prompts=demo", "steps=2", "num_prompts=2", "progress=false"]


def gen_config(out: Path) -> dict:
    from hydra import compose, initialize_config_dir

    from elbo_t2ialign.cli import config_dir, to_container

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return to_container(compose("generate", overrides=[*GEN, f"output_dir={out}"]))


@pytest.fixture(scope="module")
def gen_model():
    """(sampler, phrase extractor) of the tiny generation config, built once."""
    from elbo_t2ialign.generation.phrases import PhraseExtractor
    from elbo_t2ialign.generation.runner import build_sampler

    conf = gen_config(Path("unused"))
    return build_sampler(conf), PhraseExtractor.from_config(**conf["phrases"])


def generate(out: Path, gen_model) -> int:
    """What `python -m elbo_t2ialign.generate` does with its config, on the tiny model built once."""
    from elbo_t2ialign.generation.config import GenerationError
    from elbo_t2ialign.generation.phrases import PhraseError
    from elbo_t2ialign.generation.runner import run as gen_run

    return cli_run(lambda: gen_run(gen_config(out), *gen_model), (GenerationError, PhraseError), False)[1]


def outputs(out: Path) -> dict[str, bytes]:
    return {k: v for k, v in snapshot(out).items() if k.startswith(("images/", "weights/"))}


def test_generate_disk_full_and_interrupted_at_every_file_then_resumes(tmp_path, gen_model, capsys):
    assert generate(tmp_path / "ref", gen_model) == 0
    reference = outputs(tmp_path / "ref")
    assert len(reference) == 6  # 2 prompts: 2 weighted, 2 baseline images, 2 weight records
    with WriteFault(tmp_path / "probe") as probe:
        assert generate(tmp_path / "probe", gen_model) == 0
    at = {}  # final file name (relative) -> the call number of the first write into it
    for k in probe.first_writes():
        path = Path(probe.calls[k - 1]).relative_to((tmp_path / "probe").resolve())
        temporary = re.match(r"^\.(.+)\.\d+\.tmp(\.\w+)?$", path.name)  # of the atomic writers
        at.setdefault((path.parent / (temporary.group(1) if temporary else path.name)).as_posix(), k)
    assert set(at) >= {"config.yaml", "prompts.json", "weights/00000_4307.json", "images/elbo/00000_4307.png"}
    # the launch records are written by the code segment shares (tested there at every file)
    sites = [at[n] for n in ("config.yaml", "prompts.json", "weights/00000_4307.json")]
    sites += [at[n] for n in ("images/elbo/00000_4307.png", "images/baseline/00001_4307.png")]
    faults = [(k, OSError) for k in sites] + [(sites[-2], KeyboardInterrupt), (sites[-1], Terminated)]
    for k, error in faults:
        out = tmp_path / f"run-{k}-{error.__name__}"
        with WriteFault(out, at_call=k, error=error):
            code = generate(out, gen_model)
        line = one_error(capsys)
        if error is OSError:
            assert code == EXIT_NO_SPACE and line.startswith(f"error: no space left on device writing {out}")
        else:
            assert code == (EXIT_INTERRUPTED if error is KeyboardInterrupt else EXIT_TERMINATED)
            assert line.endswith("; rerun the same command to resume: finished outputs are kept")
        if out.exists():
            assert whole_files(out) == []
            kept = outputs(out)
            assert {k: reference[k] for k in kept} == kept
        assert generate(out, gen_model) == 0
        assert outputs(out) == reference


@pytest.mark.parametrize(
    "name, content, remedy",
    [
        ("config.yaml", GARBAGE, "restore it from a copy, or start a new run with output_dir=<new folder>"),
        ("identity.json", b"{", "restore it from a copy, or start a new run with output_dir=<new folder>"),
        (
            "prompts.json",
            b'[{"index": 0}]',
            "delete it and rerun the generation command, which writes it again",
        ),
    ],
)
def test_generate_damaged_record(tmp_path, gen_model, capsys, name, content, remedy):
    out = tmp_path / "run"
    assert generate(out, gen_model) == 0
    (out / name).write_bytes(content)
    before = outputs(out)
    assert generate(out, gen_model) == EXIT_DAMAGED
    line = one_error(capsys)
    assert line.startswith(f"error: {out / name} is damaged (") and line.endswith(remedy)
    assert outputs(out) == before and (out / name).read_bytes() == content
    if name == "prompts.json":  # the remedy works: the prompt file is unchanged, so delete and rerun
        (out / name).unlink()
        assert generate(out, gen_model) == 0 and outputs(out) == before


def test_generate_second_launch_and_deleted_or_truncated_images(tmp_path, gen_model, capsys):
    from elbo_t2ialign.generation.config import GenerationError

    out = tmp_path / "run"
    assert generate(out, gen_model) == 0
    reference = outputs(out)
    with RunLock(out / ".lock", GenerationError):  # another launch of this folder is running
        assert generate(out, gen_model) == 2
        assert one_error(capsys).startswith(f"error: {out} is in use by pid {os.getpid()} on ")
    (out / "images/elbo/00000_4307.png").unlink()
    (out / "images/baseline/00001_4307.png").write_bytes(reference["images/baseline/00001_4307.png"][:80])
    assert generate(out, gen_model) == 0
    assert outputs(out) == reference  # both made again, the truncated one moved to damaged/
    assert (out / "damaged/images/baseline/00001_4307.png").stat().st_size == 80


# ------------------------------------------------------------------ generation.evaluate
@pytest.fixture
def generated(tmp_path, gen_model):
    out = tmp_path / "gen"
    assert generate(out, gen_model) == 0
    return out


def gen_evaluate(out: Path) -> int:
    from elbo_t2ialign.generation.evaluate import main

    return main([str(out), "--clip", "tiny", "--device", "cpu", "--grid", "2"])


def test_clip_evaluate_disk_full_interrupted_damaged_and_locked(generated, capsys):
    assert gen_evaluate(generated) == 0
    old = json.loads((generated / "clip_scores.json").read_text())
    with WriteFault(generated) as probe:
        assert gen_evaluate(generated) == 0
    sites = probe.first_writes()
    assert len(sites) == 3  # clip_scores.json, clip_scores.md, grid.png
    for k, error in [*((k, OSError) for k in sites), (sites[1], KeyboardInterrupt)]:
        with WriteFault(generated, at_call=k, error=error):
            code = gen_evaluate(generated)
        assert code == (EXIT_NO_SPACE if error is OSError else EXIT_INTERRUPTED)
        one_error(capsys)
        assert whole_files(generated) == []
        assert json.loads((generated / "clip_scores.json").read_text()) == old
    from elbo_t2ialign.generation.config import GenerationError

    with RunLock(generated / ".lock", GenerationError):  # a generation is adding images meanwhile
        assert gen_evaluate(generated) == 0
    capsys.readouterr()
    (generated / "images/baseline/00000_4307.png").unlink()  # deleted: scored without it
    assert gen_evaluate(generated) == 0
    scores = json.loads((generated / "clip_scores.json").read_text())["variants"]
    assert (scores["elbo"]["num_images"], scores["baseline"]["num_images"]) == (2, 1)
    image = generated / "images/elbo/00001_4307.png"
    image.write_bytes(image.read_bytes()[:60])
    assert gen_evaluate(generated) == EXIT_DAMAGED
    assert one_error(capsys).startswith(f"error: {image} is damaged (")
    (generated / "prompts.json").write_bytes(GARBAGE)
    assert gen_evaluate(generated) == EXIT_DAMAGED
    assert one_error(capsys).startswith(f"error: {generated / 'prompts.json'} is damaged (")


# ------------------------------------------------------------------ explain
@pytest.fixture(scope="module")
def explained(tmp_path_factory):
    """(config, aligner, image path) for explain on the bundled testbed model with few timesteps."""
    from elbo_t2ialign import explain
    from elbo_t2ialign.testbed import world

    fast = ["elbo.elbo_timesteps=[1,501]", "elbo.collect_timesteps=[20]"]
    conf = explain.compose(fast)
    path = tmp_path_factory.mktemp("img") / "scene.png"
    Image.fromarray(world.generate(3, "val").image).save(path)
    return conf, explain.load_aligner(conf, explain._options(conf)), path


def explain_cli(explained, out: Path, **kwargs) -> int:
    from elbo_t2ialign import explain

    conf, aligner, image = explained
    call = lambda: explain.run(  # noqa: E731
        {**conf, "output_dir": str(out)}, str(image), ["square", "triangle"], aligner=aligner, **kwargs
    )
    return cli_run(call, (explain.ExplainError,), False)[1]


def test_explain_disk_full_or_interrupted_leaves_no_folder(tmp_path, explained, capsys):
    out = tmp_path / "out"
    with WriteFault(out) as probe:
        assert explain_cli(explained, out) == 0
    first = snapshot(out)
    sites = probe.first_writes()
    for k, error in [(sites[0], OSError), (sites[len(sites) // 2], OSError), (sites[-1], OSError)] + [
        (sites[3], KeyboardInterrupt)
    ]:
        with WriteFault(out, at_call=k, error=error):
            code = explain_cli(explained, out)
        line = one_error(capsys)
        assert code == (EXIT_NO_SPACE if error is OSError else EXIT_INTERRUPTED), line
        if error is OSError:
            assert line.startswith(f"error: no space left on device writing {out}")
        assert sorted(p.name for p in out.iterdir()) == ["scene-1"]  # no staging folder, no scene-2
        assert snapshot(out) == first
    assert explain_cli(explained, out) == 0
    assert sorted(p.name for p in out.iterdir()) == ["scene-1", "scene-2"]


def test_explain_concurrent_calls_and_damaged_earlier_folders(tmp_path, explained, monkeypatch):
    """Two calls at once each get their own folder (renamed into place: the first free number);
    an earlier folder deleted or truncated does not matter (explain never reads its outputs)."""
    from elbo_t2ialign import explain

    out = tmp_path / "out"
    real_rename = os.rename

    def rename_after_another(src, dst):  # a concurrent call renames its folder to the same name first
        if Path(dst).name == "scene-1" and not Path(dst).exists():
            (Path(dst) / "by-another-call").mkdir(parents=True)
        return real_rename(src, dst)

    monkeypatch.setattr(explain.os, "rename", rename_after_another)
    assert explain_cli(explained, out) == 0
    assert sorted(p.name for p in out.iterdir()) == ["scene-1", "scene-2"]
    assert (out / "scene-2" / "result.json").is_file() and not (out / "scene-1" / "result.json").exists()
    monkeypatch.undo()
    (out / "scene-2" / "figure.png").write_bytes(b"\x89PNG")
    (out / "scene-2" / "result.json").unlink()
    assert explain_cli(explained, out) == 0
    assert json.loads((out / "scene-3" / "result.json").read_text())["words"] == ["square", "triangle"]


def test_explain_damaged_caption_cache(tmp_path, explained, capsys):
    from elbo_t2ialign import explain

    conf, aligner, image = explained
    cache = tmp_path / "captions.json"
    cache.write_bytes(GARBAGE)
    caption = {"backend": "blip", "model": "tiny", "max_new_tokens": 3, "cache": str(cache)}
    call = lambda: explain.run(  # noqa: E731
        {**conf, "output_dir": str(tmp_path / "out"), "caption": caption},
        str(image),
        ["square"],
        caption=True,
        aligner=aligner,
    )
    assert cli_run(call, (explain.ExplainError,), False)[1] == EXIT_DAMAGED
    line = one_error(capsys)
    assert line.startswith(f"error: the caption cache {cache} is not valid JSON (")
    assert line.endswith("move it away (or set caption.cache=<another file>)")
    assert cache.read_bytes() == GARBAGE and not (tmp_path / "out").exists()


# ------------------------------------------------------------------ prepare_data
@pytest.fixture
def archive_parts(tmp_path):
    from test_prepare_data import SPLIT, build_parts, voc_files

    from elbo_t2ialign.segmentation.datasets import SegDataset

    names = SegDataset({"name": "voc", "data_root": "/nonexistent", "split": SPLIT}).images
    parts = build_parts(tmp_path / "dl", voc_files(names), malicious=False)
    target = tmp_path / "datasets"
    argv = ["--datasets", "voc", "--split", SPLIT, "--dir", str(target), "--no-prompts", "--archive"]
    return target, [*argv, *map(str, parts)]


def test_prepare_data_disk_full_interrupted_damaged_and_locked(tmp_path, archive_parts, capsys):
    from elbo_t2ialign.segmentation import prepare
    from elbo_t2ialign.segmentation.config import SegmentationError

    target, argv = archive_parts

    def into(folder: Path) -> list[str]:
        return [str(folder) if a == str(target) else a for a in argv]

    def placed(folder: Path) -> dict[str, bytes]:
        return {k: v for k, v in snapshot(folder).items() if k.startswith("VOCdevkit")}

    with WriteFault(tmp_path / "probe") as probe:
        assert prepare.main(into(tmp_path / "probe")) == 0
    reference = placed(tmp_path / "probe")
    sites = probe.first_writes()
    assert len(sites) == 22  # the lock's holder record, 10 images, 10 masks, archive_sha256.json
    for k, error in [(sites[0], OSError), (sites[7], OSError), (sites[-1], OSError), (sites[4], Terminated)]:
        folder = tmp_path / f"ds-{k}"
        with WriteFault(folder, at_call=k, error=error):
            code = prepare.main(into(folder))
        line = one_error(capsys)
        assert code == (EXIT_NO_SPACE if error is OSError else EXIT_TERMINATED), line
        if error is OSError:
            assert line.startswith(f"error: no space left on device writing {folder}")
        # nothing half-written in place: extraction stages under .prepare-partial/, resumed by a rerun
        assert {k: reference[k] for k in placed(folder)} == placed(folder)
        assert not (folder / ".prepare.lock").exists()
        assert prepare.main(into(folder)) == 0
        assert placed(folder) == reference
    capsys.readouterr()
    target.mkdir()
    with RunLock(target / ".prepare.lock", SegmentationError):  # another prepare_data of this folder
        assert prepare.main(argv) == 2
        assert one_error(capsys).endswith(
            "wait for that prepare_data to finish, or give this one another --dir"
        )
    assert prepare.main(argv) == 0 and placed(target) == reference
    (target / "archive_sha256.json").write_bytes(b'{"dataset.tar.gz.00": ')
    (target / "VOCdevkit/VOC2012/JPEGImages").rename(target / "moved-away")  # a deleted folder
    capsys.readouterr()
    assert prepare.main(argv) == EXIT_DAMAGED
    assert one_error(capsys).startswith(f"error: {target / 'archive_sha256.json'} is damaged (")
    (target / "archive_sha256.json").unlink()  # the remedy: the digests are recorded again
    assert prepare.main(argv) == 0 and placed(target) == reference


# ------------------------------------------------------------------ demo
@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from elbo_t2ialign.testbed import world

    datasets = tmp_path_factory.mktemp("world")
    world.ensure_dataset(datasets / "shapes")
    return datasets


def demo_cli(shapes, out: Path) -> int:
    from elbo_t2ialign import demo

    argv = ["--images", "2", "--datasets-dir", str(shapes), "--out", str(out)]
    argv += ["elbo.elbo_timesteps=[1,501]", "elbo.collect_timesteps=[20]", "progress=false"]
    return cli_run(lambda: demo.main(argv), (SegmentationError,), False)[1]


def test_demo_faults(tmp_path, shapes, capsys):
    out = tmp_path / "demo"
    folder = out / "shapes-val"
    with WriteFault(out, at_call=12):  # inside the second image's maps
        assert demo_cli(shapes, out) == EXIT_NO_SPACE
    assert one_error(capsys).startswith(f"error: no space left on device writing {folder}")
    assert whole_files(out) == []
    with WriteFault(out, at_call=1, error=KeyboardInterrupt):
        assert demo_cli(shapes, out) == EXIT_INTERRUPTED
    one_error(capsys)
    with RunLock(folder / ".lock", ConfigError):
        assert demo_cli(shapes, out) == 2
    assert one_error(capsys).startswith(f"error: {folder} is in use by pid {os.getpid()}")
    assert demo_cli(shapes, out) == 0
    assert json.loads((folder / "metrics.json").read_text())["num_images"] == 2
    capsys.readouterr()
    (folder / "config.yaml").write_bytes(GARBAGE)
    assert demo_cli(shapes, out) == EXIT_DAMAGED
    assert one_error(capsys).startswith(f"error: {folder / 'config.yaml'} is damaged (")


def test_damaged_or_incomplete_world_is_written_again(tmp_path):
    from elbo_t2ialign.testbed import world

    folder = tmp_path / "shapes"
    folder.mkdir()
    (folder / "classes.json").write_bytes(b'{"world_version": ')
    assert not world.is_current(folder)  # ensure_dataset writes it again (classes.json last)


# ------------------------------------------------------------------ the shared pieces
def test_sigterm_becomes_one_line_and_its_own_status(capsys):
    def work():
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("not reached: the handler raises at once")

    before = signal.getsignal(signal.SIGTERM)
    assert cli_run(work, (), False) == (None, EXIT_TERMINATED)
    assert one_error(capsys) == (
        "error: terminated (SIGTERM); rerun the same command to resume: finished outputs are kept"
    )
    assert signal.getsignal(signal.SIGTERM) is before  # put back


def test_debug_shows_the_traceback_and_keeps_the_status(capsys):
    def work():
        raise OSError(28, "No space left on device", "/some/file")

    assert cli_run(work, (), True) == (None, EXIT_NO_SPACE)
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):")
    assert err.splitlines()[-1].startswith("error: no space left on device writing /some/file; free space")
    with pytest.raises(ValueError, match="a bug"):  # anything unexpected keeps its traceback
        cli_run(lambda: (_ for _ in ()).throw(ValueError("a bug")), (), False)


def test_quota_and_a_full_disk_without_a_file_name():
    from elbo_t2ialign.cli import fault

    assert fault(OSError(122, "Disk quota exceeded", "/q/x.png"))[0].startswith(
        "disk quota exceeded writing /q/x.png; free space there"
    )
    assert fault(OSError(28, "No space left on device"))[0].startswith(
        "no space left on device; free space ("
    )
    assert fault(OSError(13, "Permission denied", "/x"))[1] == 5  # a refusal (test_faults_round3.py)
    assert fault(OSError(22, "Invalid argument", "/x")) is None  # not one of these faults


def test_append_line_never_leaves_half_a_line(tmp_path):
    from elbo_t2ialign.runfolder import append_line

    path = tmp_path / "launches.jsonl"
    append_line(path, json.dumps({"a": 1}))
    with WriteFault(tmp_path, at_call=1), pytest.raises(OSError) as err:
        append_line(path, json.dumps({"b": "x" * 100}))
    assert err.value.filename == str(path)
    assert path.read_text() == '{"a": 1}\n'


def test_log_handler_drops_records_quietly_on_a_full_disk(tmp_path, capsys):
    import logging

    from elbo_t2ialign.runfolder import RunLogHandler

    handler = RunLogHandler(tmp_path / "run.log", encoding="utf-8")

    class Full:
        def write(self, text):
            raise OSError(28, "No space left on device")

        def flush(self):
            raise OSError(28, "No space left on device")

        def close(self):
            raise OSError(28, "No space left on device")

    handler.stream.close()
    handler.stream = Full()
    record = logging.LogRecord("elbo_t2ialign", logging.INFO, __file__, 1, "a line", None, None)
    handler.handle(record)
    handler.handle(record)
    handler.close()
    assert handler.dropped == 3  # two records and the flush on close
    assert capsys.readouterr().err == ""  # logging's own handler prints a traceback per record


def test_whole_files_finds_what_is_half_written(tmp_path):
    (tmp_path / "a.json").write_text('{"x": 1}')
    (tmp_path / "b.json").write_text('{"x": ')
    (tmp_path / ".c.json.123.tmp").write_text("{}")
    np.save(tmp_path / "d.npy", np.zeros(3))
    (tmp_path / "e.npy").write_bytes((tmp_path / "d.npy").read_bytes()[:40])
    (tmp_path / "f.jsonl").write_text('{"x": 1}\n{"y"')
    assert [line.split(":")[0] for line in whole_files(tmp_path)] == [
        ".c.json.123.tmp",
        "b.json",
        "e.npy",
        "f.jsonl",
    ]
