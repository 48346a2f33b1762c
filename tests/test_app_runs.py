"""The explorer's readers, without a browser or Gradio: the run-folder table against a brute-force
per-pixel count, the runs= fence, and the upload limits. A run of the pixel stand-in aligner on a
small synthetic dataset (no model)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from elbo_t2ialign.app.inputs import Limits, check_upload, split_words
from elbo_t2ialign.app.runs import PathRefused, RunsRoot, read_run_view, table
from elbo_t2ialign.devtools.fixtures import PixelAligner, fixture_config, random_samples, write_dataset
from elbo_t2ialign.segmentation import evaluate, run
from elbo_t2ialign.segmentation.datasets import IGNORE

CLASSES = ["cat", "dog", "bird"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    data = write_dataset(tmp / "data", CLASSES, random_samples(CLASSES, 6, convention="voc"))
    root = tmp / "runs"
    run(fixture_config(data, root / "done", "voc"), aligner=PixelAligner())
    evaluate(root / "done", overlays=0, progress=False)
    return root


def brute_miou(gt: np.ndarray, maps: dict[int, np.ndarray], threshold: float) -> float:
    """One image's mIoU (%) by a loop over pixels: label = the class of the highest map (first on
    ties), background below the threshold; 255 = ignored; classes in the ground truth or prediction."""
    inter, union = {}, {}
    for y in range(gt.shape[0]):
        for x in range(gt.shape[1]):
            if gt[y, x] == 255:
                continue
            best, label = -1.0, 0
            for c, m in maps.items():
                if m[y, x] / 255.0 > best:
                    best, label = m[y, x] / 255.0, c
            if best < threshold:
                label = 0
            truth = int(gt[y, x])
            for c in {label, truth}:
                union[c] = union.get(c, 0) + 1
            if label == truth:
                inter[label] = inter.get(label, 0) + 1
    return float(np.mean([100.0 * inter.get(c, 0) / union[c] for c in union]))


def test_image_table_matches_a_pixel_count(runs):
    view = read_run_view(runs / "done")
    metrics = json.loads((runs / "done" / "metrics.json").read_text())
    assert view.evaluated and view.state == "done" and view.done == 6 and len(view.rows) == 6
    for row in view.rows:
        gt = np.asarray(Image.open(runs.parent / "data" / "masks" / f"{row.name}.png"))
        scores = json.loads((runs / "done" / "maps" / row.name / "scores.json").read_text())
        for variant in ("elbo", "baseline"):
            maps = {
                c: np.asarray(Image.open(runs / "done" / "maps" / row.name / f"{variant}_{c:03d}.png"))
                for c in scores["class_ids"]
            }
            want = brute_miou(gt, maps, metrics[variant]["threshold"])
            assert row.iou[variant] == pytest.approx(want, abs=1e-9), (row.name, variant)

    rows = table(view, "IoU change, most helped first")
    change = [r[-1] for r in rows]
    assert change == sorted(change, reverse=True)
    assert all(r[-1] == pytest.approx(r[5] - r[4], abs=0.011) for r in rows)
    assert [r[-1] for r in table(view, "IoU change, most hurt first")] == sorted(change)
    # filters: a class the image holds, and the size terciles (2 images each of 6)
    assert {r[0] for r in table(view, "image name", cls="dog")} == {
        r.name for r in view.rows if "dog" in r.classes
    }
    sizes = [len(table(view, "image name", size=s)) for s in ("small", "medium", "large")]
    assert sizes == [2, 2, 2]
    small = max(r[2] for r in table(view, "image name", size="small"))
    assert small <= min(r[2] for r in table(view, "image name", size="medium"))


def test_a_run_in_progress_shows_what_is_finished(runs, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(runs / "done", partial)
    (partial / "metrics.json").unlink()
    (partial / "metrics.md").unlink()
    shutil.rmtree(partial / "maps" / sorted(p.name for p in (partial / "maps").iterdir())[0])
    view = read_run_view(partial)
    assert (view.state, view.done, view.expected, len(view.rows)) == ("partial", 5, 6, 5)
    assert not view.evaluated and set(view.thresholds.values()) == {0.5}
    assert "5 of 6 images finished" in view.summary() and "not evaluated yet" in view.summary()


def test_paths_outside_the_runs_folder_are_refused(runs, tmp_path):
    root = RunsRoot(runs)
    assert root.resolve("done") == (runs / "done").resolve()
    assert root.resolve(str(runs / "done")) == (runs / "done").resolve()
    assert [rel for rel, _ in root.segmentation_runs()] == ["done"]
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (runs / "link").symlink_to(outside)
    try:
        for given in ("..", "../data", "done/../..", str(outside), "/", "link"):
            with pytest.raises(PathRefused, match="outside the runs folder"):
                root.resolve(given)
    finally:
        (runs / "link").unlink()
    with pytest.raises(PathRefused, match="not a folder"):
        root.resolve("nothing-here")
    with pytest.raises(PathRefused, match="not a segmentation run"):
        read_run_view(runs)


def test_upload_limits(tmp_path):
    path = tmp_path / "wide.png"
    Image.new("RGB", (300, 200), (10, 20, 30)).save(path)
    assert check_upload(str(path), Limits(max_pixels=60_000)).size == (300, 200)
    with pytest.raises(ValueError, match=r"300x200 = 0.1 megapixels, above the limit of 0.05"):
        check_upload(str(path), Limits(max_pixels=50_000))
    size = path.stat().st_size
    with pytest.raises(ValueError, match="above the upload limit"):
        check_upload(str(path), Limits(max_upload_mb=(size - 1) / 2**20))
    assert split_words(" circle, a red square ,, ") == ["circle", "a red square"]


def test_command_line_refuses_bad_arguments(tmp_path, capsys):
    pytest.importorskip("gradio", reason="the app needs Gradio: the [app] extra (not installed at the floor)")
    from elbo_t2ialign.app.__main__ import main

    assert main([f"runs={tmp_path / 'missing'}"]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert main(["model=no-such-model"]) == 2
    assert "no-such-model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["circle"])  # not key=value


def test_label_and_heat_colours():
    from matplotlib import colormaps

    from elbo_t2ialign.app import views

    labels = np.array([[0, 1], [2, IGNORE]])
    out = np.asarray(views.labels_over(None, labels))  # 2x2 enlarged to 256x256, pixels kept
    assert out.shape == (256, 256, 3)
    tab10 = np.round(colormaps["tab10"](np.arange(10))[:, :3] * 255)
    assert out[0, 0].tolist() == [0, 0, 0]  # background
    assert out[0, 200].tolist() == tab10[0].tolist() and views.colour_name(1) == "blue"
    assert out[200, 0].tolist() == tab10[1].tolist() and views.colour_name(2) == "orange"
    assert out[200, 200].tolist() == [255, 255, 255]  # ignored
    black = Image.new("RGB", (2, 2))
    heat = np.array([[0.0, 1.0], [0.5, 0.25]], np.float32)
    over = np.asarray(views.heat_over(black, heat, alpha=0.5))
    jet = colormaps["jet"]
    for (y, x), value in np.ndenumerate(heat):
        want = np.round(np.asarray(jet(float(value))[:3]) * 255 * 0.5)
        assert np.abs(over[y * 128, x * 128] - want).max() <= 1, (y, x)
