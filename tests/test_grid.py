"""The grid in one command (issue 25) with the pixel stand-in aligner on a fixture dataset: the plan
names every cell's images, estimates follow the first images, cells resume and are evaluated when
all their shards are done, the report's cells equal each cell's metrics.json; and the SLURM array
template, rendered for every array index, submits exactly the shards 0..n-1 of the grid."""

import csv
import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from elbo_t2ialign import grid as grid_mod
from elbo_t2ialign.devtools.fixtures import PixelAligner, random_samples, write_dataset
from elbo_t2ialign.segmentation.config import Shard

CLASSES = ["cat", "dog", "car"]
IMAGES = 6
REPO = Path(__file__).resolve().parents[1]


def make_grid(tmp_path, axes=None):
    data = write_dataset(tmp_path / "data", CLASSES, random_samples(CLASSES, IMAGES, seed=3))
    spec = {
        "output_dir": str(tmp_path / "grid"),
        "overrides": [
            "model=shapes",
            "dataset=folder",
            f"dataset.root={data}",
            "device=cpu",
            "progress=false",
            f"dataset.label_cache={tmp_path / 'labels.json'}",
        ],
        "axes": axes or {"elbo.strength": [2, 3], "seed": [0, 1]},
        "evaluate": {"overlays": 1},
        "report": {"group_by": ["model", "strength"], "columns": ["seed"]},
    }
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(spec))
    return grid_mod.load_grid(str(path))


class Factory:
    """Hands the grid a pixel stand-in aligner per cell and counts the cells that asked."""

    def __init__(self):
        self.calls = 0

    def __call__(self, conf, models):
        self.calls += 1
        return PixelAligner()


def csv_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_grid_plans_runs_estimates_evaluates_and_reports(tmp_path, capsys):
    grid = make_grid(tmp_path)
    factory = Factory()
    cells = grid_mod.run_grid(grid, aligner_factory=factory)
    out = capsys.readouterr().out
    assert factory.calls == 4 and len(cells) == 4
    # the plan: every cell with its images, before anything runs
    plan = out[: out.index("== cell 1/4")]
    assert "grid g: 4 cells" in plan
    for label in ("2 / 0", "2 / 1", "3 / 0", "3 / 1"):
        assert re.search(rf"\d+\s+{re.escape(label)}\s+{IMAGES}\s+0\s+{IMAGES}\b", plan), label
    # estimates after the first images: a rate per cell, the first time one per later cell
    assert len(re.findall(r"s per image \(images 2-4\); about \d+ s left for this cell", out)) == 4
    assert re.search(r"cell 2 \d+ s, cell 3 \d+ s, cell 4 \d+ s; the grid about", out)
    # every cell evaluated, the report equal to each cell's metrics
    rows = {
        (r["strength"], r["seed"]): r for r in csv_rows(tmp_path / "grid" / "report" / "segmentation.csv")
    }
    assert set(rows) == {(s, d) for s in ("2", "3") for d in ("0", "1")}
    for cell in cells:
        metrics = json.loads((cell.folder / "metrics.json").read_text())
        row = rows[(str(cell.values["elbo.strength"]), str(cell.values["seed"]))]
        assert row["state"] == "done" and int(row["done"]) == IMAGES
        assert float(row["method"]) == metrics["elbo"]["mIoU"]
        assert float(row["baseline"]) == metrics["baseline"]["mIoU"]
        assert metrics["strength"] == cell.values["elbo.strength"]
    plan_file = json.loads((tmp_path / "grid" / "grid.json").read_text())
    assert [c["dir"] for c in plan_file["cells"]] == ["2/0", "2/1", "3/0", "3/1"]
    assert all(c["expected"] == IMAGES for c in plan_file["cells"])

    # a second launch resumes: nothing to do, no model asked for
    grid_mod.run_grid(grid, aligner_factory=factory)
    assert factory.calls == 4
    assert re.search(rf"all\s+{4 * IMAGES}\s+{4 * IMAGES}\s+0", capsys.readouterr().out)


def test_sharded_grid_reports_partial_cells_until_the_last_shard(tmp_path, capsys):
    grid = make_grid(tmp_path, axes={"elbo.strength": [2, 3]})
    grid_mod.run_grid(grid, shard_spec="0/2", aligner_factory=Factory())
    report = tmp_path / "grid" / "report"
    rows = csv_rows(report / "segmentation.csv")
    assert [(r["state"], r["done"], r["expected"]) for r in rows] == [("partial", "3", "6")] * 2
    assert "partial 3/6" in (report / "report.md").read_text()
    assert not list((tmp_path / "grid").glob("*/metrics.json"))
    assert "to do (this shard)" in capsys.readouterr().out
    grid_mod.run_grid(grid, shard_spec="1/2", aligner_factory=Factory())
    rows = csv_rows(report / "segmentation.csv")
    assert [r["state"] for r in rows] == ["done", "done"]
    assert len(list((tmp_path / "grid").glob("*/metrics.json"))) == 2
    # the shards together equal one unsharded run (the seed of image i is seed + i either way)
    whole = make_grid(tmp_path / "whole", axes={"elbo.strength": [2, 3]})
    grid_mod.run_grid(whole, aligner_factory=Factory())
    for a, b in zip(
        csv_rows(report / "segmentation.csv"),
        csv_rows(tmp_path / "whole" / "grid" / "report" / "segmentation.csv"),
        strict=True,
    ):
        assert (a["baseline"], a["method"]) == (b["baseline"], b["method"])


def test_grid_with_an_unfinished_and_a_missing_cell(tmp_path):
    grid = make_grid(tmp_path)
    cells = grid_mod.plan(grid, [], None)
    grid_mod.write_plan(grid, cells)
    from elbo_t2ialign.segmentation.runner import run

    run({**cells[0].conf}, aligner=PixelAligner())  # cell 1 complete
    run({**cells[1].conf, "num_images": 2}, aligner=PixelAligner())  # cell 2: 2 of 6 images
    run({**cells[2].conf}, aligner=PixelAligner())  # cell 3 complete; cell 4 never started
    grid_mod.run_grid(grid, report_only=True)
    rows = {
        (r["strength"], r["seed"]): r for r in csv_rows(tmp_path / "grid" / "report" / "segmentation.csv")
    }
    assert {k: (r["state"], r["done"]) for k, r in rows.items()} == {
        ("2", "0"): ("done", "6"),
        ("2", "1"): ("partial", "2"),
        ("3", "0"): ("done", "6"),
        ("3", "1"): ("missing", "0"),  # planned in grid.json, no folder yet
    }
    for cell, key in ((cells[0], ("2", "0")), (cells[2], ("3", "0"))):
        metrics = json.loads((cell.folder / "metrics.json").read_text())
        assert float(rows[key]["method"]) == metrics["elbo"]["mIoU"]
    text = (tmp_path / "grid" / "report" / "report.md").read_text()
    assert "partial 2/6" in text and "missing" in text
    tex = (tmp_path / "grid" / "report" / "segmentation.tex").read_text()
    assert "\\emph{partial 2/6}" in tex and "\\emph{missing}" in tex


def test_bad_grid_files_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"output_dir": "x", "axes": {"seed": [0, 0]}}))
    with pytest.raises(grid_mod.GridError, match="distinct values"):
        grid_mod.load_grid(str(bad))
    bad.write_text(yaml.safe_dump({"output_dir": "x", "axes": {"seed": [0]}, "colour": 1}))
    with pytest.raises(grid_mod.GridError, match=r"unknown key\(s\).*colour"):
        grid_mod.load_grid(str(bad))
    with pytest.raises(grid_mod.GridError, match="no grid 'nope'.*demo.*paper"):
        grid_mod.load_grid("nope")
    grid = make_grid(tmp_path, axes={"elbo.strenght": [2]})
    with pytest.raises(grid_mod.GridError, match="cell 1"):
        grid_mod.plan(grid, [], None)


def test_shipped_grids_plan(tmp_path):
    """demo and paper compose for every cell (the paper's images from the built-in split lists)."""
    cells = grid_mod.plan(grid_mod.load_grid("paper"), ["datasets_dir=" + str(tmp_path)], None)
    assert len(cells) == 16
    assert {c.values["dataset"]: len(c.images) for c in cells} == {
        "voc": 1449,
        "context": 5104,
        "coco": 5000,
        "ade20k": 2000,
    }


# ------------------------------------------------------------------ SLURM
def sbatch_array(script: str) -> range:
    (spec,) = re.findall(r"^#SBATCH --array=(\S+)", script, flags=re.M)
    first, last = (int(x) for x in spec.split("%")[0].split("-"))
    return range(first, last + 1)


def render(index: int, count: int, minimum: int = 0, **env) -> list[str]:
    """The command the template's array task `index` would run (DRY_RUN), split as the shell would."""
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / "template_slurm_grid.sh")],
        env={
            **os.environ,
            "DRY_RUN": "1",
            "SLURM_ARRAY_TASK_ID": str(index),
            "SLURM_ARRAY_TASK_COUNT": str(count),
            "SLURM_ARRAY_TASK_MIN": str(minimum),
            "SLURM_SUBMIT_DIR": str(REPO),
            "PYTHON": "python",
            **env,
        },
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    return shlex.split(done.stdout)


@pytest.mark.parametrize("array", [None, (1, 8)])
def test_slurm_template_maps_array_indices_to_shards(array):
    script = (REPO / "scripts" / "template_slurm_grid.sh").read_text()
    indices = sbatch_array(script) if array is None else range(array[0], array[1] + 1)
    assert all(
        re.match(r"#SBATCH --[a-z-]+=\S+$", line)
        for line in script.splitlines()
        if line.startswith("#SBATCH")
    )
    shards = []
    for i in indices:
        argv = render(i, len(indices), indices[0], GRID="paper", GRID_ARGS="dataset.split=val_100 seed=1")
        assert argv[:3] == ["python", "-m", "elbo_t2ialign.grid"]
        args = grid_mod.parser().parse_intermixed_args(argv[3:])  # what the grid itself would parse
        assert (args.grid, args.overrides, args.plan, args.report) == (
            "paper",
            ["dataset.split=val_100", "seed=1"],
            False,
            False,
        )
        index, count = (int(x) for x in args.shard.split("/"))
        shards.append(Shard(index, count))
    assert [s.index for s in shards] == list(range(len(indices))) and {s.count for s in shards} == {
        len(indices)
    }
    # together the tasks take every image of a cell exactly once
    for image in range(1449):
        assert sum(s.owns(image) for s in shards) == 1


def test_slurm_template_refuses_to_run_outside_an_array():
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / "template_slurm_grid.sh")],
        env={k: v for k, v in os.environ.items() if not k.startswith("SLURM_")} | {"DRY_RUN": "1"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode != 0 and "array job" in done.stderr


def test_a_failing_cell_stops_only_itself(tmp_path):
    from elbo_t2ialign.segmentation.config import ConfigError

    grid = make_grid(tmp_path, axes={"elbo.strength": [2, 3]})

    def factory(conf, models):
        if conf["elbo"]["strength"] == 2:
            raise ConfigError("cannot load model x")
        return PixelAligner()

    with pytest.raises(grid_mod.GridError, match=r"1 cell\(s\) stopped.*cell 1 \(2\): cannot load model x"):
        grid_mod.run_grid(grid, aligner_factory=factory)
    states = [r["state"] for r in csv_rows(tmp_path / "grid" / "report" / "segmentation.csv")]
    assert states == ["missing", "done"]


def test_report_evaluate_option_evaluates_finished_runs(tmp_path):
    from elbo_t2ialign import report
    from elbo_t2ialign.segmentation.runner import run

    grid = make_grid(tmp_path, axes={"elbo.strength": [2]})
    (cell,) = grid_mod.plan(grid, [], None)
    run(cell.conf, aligner=PixelAligner())
    table = report.write([cell.folder], tmp_path / "out", quiet=True)["segment"]
    assert [c.state for c in table.cells.values()] == ["unevaluated"]
    table = report.write([cell.folder], tmp_path / "out", evaluate=True, quiet=True)["segment"]
    metrics = json.loads((cell.folder / "metrics.json").read_text())
    (cell_out,) = table.cells.values()
    assert cell_out.state == "done" and cell_out.values["method"] == metrics["elbo"]["mIoU"]
