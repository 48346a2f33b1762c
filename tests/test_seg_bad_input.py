"""Bad input: each case gives a clear message naming the problem and loses no finished output."""

import json
import re

import numpy as np
import pytest
from PIL import Image

from elbo_t2ialign.devtools.fixtures import PixelAligner, fixture_config, random_samples, write_dataset
from elbo_t2ialign.segmentation import run
from elbo_t2ialign.segmentation.config import ConfigError, InputError

CLASSES = ["cat", "dog", "boat"]


@pytest.fixture
def setup(tmp_path):
    """A dataset of 5 images and a run folder where the first 2 are already finished."""
    data = write_dataset(tmp_path / "data", CLASSES, random_samples(CLASSES, 5, convention="plain"))
    out = tmp_path / "run"
    run(fixture_config(data, out, num_images=2), aligner=PixelAligner())
    return data, out, _snapshot(out)


def _snapshot(out):
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted((out / "maps").rglob("*")) if p.is_file()}


def _kept(out, before):
    """Every finished file is still there, unchanged."""
    now = _snapshot(out)
    return all(now.get(k) == v for k, v in before.items())


def _break(data, case):
    if case == "missing image":
        (data / "images" / "img_003.png").unlink()
        return r"image img_003: file not found: .*img_003\.png"
    if case == "truncated image":
        path = data / "images" / "img_003.png"
        data_bytes = path.read_bytes()
        path.write_bytes(data_bytes[: len(data_bytes) // 2])  # a download cut off half way
        return r"image img_003: cannot decode .*img_003\.png"
    if case == "mask of the wrong size":
        Image.fromarray(np.zeros((10, 10), np.uint8)).save(data / "masks" / "img_003.png")
        return r"mask of img_003 is 10x10 but the image is 32x24"
    if case == "class absent from classes.json":
        Image.fromarray(np.full((24, 32), 7, np.uint8)).save(data / "masks" / "img_003.png")
        return r"mask of img_003 .*raw id\(s\) \[7\] map to no class: classes.json has ids 1..3"
    raise AssertionError(case)


CASES = ["missing image", "truncated image", "mask of the wrong size", "class absent from classes.json"]


@pytest.mark.parametrize("case", CASES)
def test_stop_names_the_image_and_keeps_finished_output(setup, case):
    data, out, before = setup
    message = _break(data, case)
    aligner = PixelAligner()
    with pytest.raises(InputError, match=message):
        run(fixture_config(data, out, on_error="stop"), aligner=aligner)
    assert [c["seed"] for c in aligner.calls] == [2]  # img_002 done before img_003 stopped the run
    assert _kept(out, before) and not (out / "maps" / "img_003").exists()


@pytest.mark.parametrize("case", CASES)
def test_skip_records_the_image_and_goes_on(setup, case):
    data, out, before = setup
    message = _break(data, case)
    run(fixture_config(data, out, on_error="skip"), aligner=PixelAligner())
    record = json.loads((out / "skipped" / "img_003.json").read_text())
    assert record["index"] == 3
    assert re.search(message, record["error"])
    assert sorted(p.name for p in (out / "maps").iterdir()) == ["img_000", "img_001", "img_002", "img_004"]
    assert _kept(out, before)
    assert "skipping img_003" in (out / "segment.log").read_text()


def test_a_fixed_image_is_retried_and_its_skip_record_removed(setup):
    data, out, _ = setup
    original = (data / "images" / "img_003.png").read_bytes()
    _break(data, "missing image")
    run(fixture_config(data, out), aligner=PixelAligner())
    assert (out / "skipped" / "img_003.json").is_file()
    (data / "images" / "img_003.png").write_bytes(original)
    aligner = PixelAligner()
    run(fixture_config(data, out), aligner=aligner)
    assert [c["seed"] for c in aligner.calls] == [3]
    assert (
        not (out / "skipped" / "img_003.json").exists()
        and (out / "maps" / "img_003" / "scores.json").is_file()
    )


@pytest.mark.parametrize(
    ("where", "pattern"),
    [
        ("top", r"unknown key\(s\) in the segmentation config: \['bogus'\]"),
        ("dataset", r"unknown key\(s\) in dataset: \['bogus'\]"),
        ("elbo", r"in elbo: unknown option\(s\) \['bogus'\]"),
    ],
)
def test_unknown_config_key_is_named_and_nothing_is_touched(setup, where, pattern):
    data, out, before = setup
    cfg = fixture_config(data, out)
    (cfg if where == "top" else cfg[where])["bogus"] = 1
    aligner = PixelAligner()
    with pytest.raises(ConfigError, match=pattern):
        run(cfg, aligner=aligner)
    assert aligner.calls == [] and _snapshot(out) == before


def test_bad_shard_and_on_error_values(setup):
    data, out, _ = setup
    with pytest.raises(ConfigError, match="shard must look like 'i/n'"):
        run(fixture_config(data, out, shard="first"), aligner=PixelAligner())
    with pytest.raises(ConfigError, match="need 0 <= i < n"):
        run(fixture_config(data, out, shard="2/2"), aligner=PixelAligner())
    with pytest.raises(ConfigError, match="on_error must be 'skip' or 'stop'"):
        run(fixture_config(data, out, on_error="ignore"), aligner=PixelAligner())
