"""The experiment grid in one command: every cell a resumable segmentation run, then the report.

    python -m elbo_t2ialign.grid demo                  # configs/grid/demo.yaml: the offline shapes grid
    python -m elbo_t2ialign.grid paper --plan          # the paper's grid: cells and images, nothing run
    python -m elbo_t2ialign.grid paper                 # run it (resumes; finished cells are skipped)
    accelerate launch -m elbo_t2ialign.grid paper      # data-parallel: each process a shard of every cell
    python -m elbo_t2ialign.grid paper --shard 1/4     # one of four processes (SLURM array:
                                                       #   scripts/template_slurm_grid.sh)
    python -m elbo_t2ialign.grid paper --report        # evaluate finished cells, write the report only

A grid file (configs/grid/<name>.yaml, or any path) names the overrides of every cell and the axes
whose combinations are the cells:

    output_dir: runs/grid/demo          # cell folders <output_dir>/<axis value>/<axis value>/...
    overrides: [model=shapes, ...]      # Hydra overrides of configs/segment.yaml for every cell
    axes:                               # one cell per combination, in this order
      dataset.split: [val, val_rare]
      dataset.prompt: [template, caption]
    evaluate: {threshold: null, crf: false}   # evaluator options of every cell (also search, buckets,
                                              # crf_unary, overlays)
    report: {group_by: [model, prompt], columns: [split], crf: false, sizes: false, digits: 1}

More overrides on the command line go to every cell (before the axis values). The grid writes
<output_dir>/grid.json (the cells, their folders, images and fields; the report shows the cells not
started as missing), prints each cell's images before it starts and, after the first images of each
cell, the time per image and an estimate per cell; a cell is evaluated as soon as all its images are
finished (by any process); every process ends by writing the report into <output_dir>/report under
a lock, so the last one to finish writes the complete table.
"""

from __future__ import annotations

import argparse
import fcntl
import itertools
import json
import logging
import re
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from elbo_t2ialign.cli import (
    cli_errors,
    config_dir,
    debug_requested,
    hydra_config_dir,
    one_line,
    override_message,
    to_container,
)

log = logging.getLogger(__name__)

GRID_KEYS = {"name", "output_dir", "overrides", "axes", "evaluate", "report"}
EVALUATE_KEYS = {"threshold", "crf", "overlays", "search", "buckets", "crf_unary"}  # evaluate()'s
REPORT_KEYS = {"group_by", "columns", "crf", "sizes", "digits"}
WARMUP = 1  # images before the timing starts (model warm-up, caches)
TIMED = 3  # images timed before the first estimate


class GridError(Exception):
    """A grid file, override or folder that cannot be used; printed as one line."""


# ------------------------------------------------------------------ the grid file
def load_grid(name: str) -> dict[str, Any]:
    """A grid by path, or by name: configs/grid/<name>.yaml of the working directory, else the shipped one."""
    import yaml

    path = Path(name).expanduser()
    folders = [Path.cwd() / "configs" / "grid", config_dir() / "grid"]
    for folder in folders:
        if not path.is_file():
            path = folder / f"{name}.yaml"
    if not path.is_file():
        known = sorted({p.stem for folder in folders for p in folder.glob("*.yaml")})
        raise GridError(f"no grid {name!r}: give a YAML file or one of {known} (configs/grid/)")
    try:
        grid = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise GridError(f"{path} is not readable YAML: {one_line(err)}") from None
    if not isinstance(grid, dict):
        raise GridError(f"{path} must hold a mapping with output_dir, overrides and axes")
    _known(f"{path}", grid, GRID_KEYS)
    _known(f"{path}: evaluate", grid.get("evaluate") or {}, EVALUATE_KEYS)
    _known(f"{path}: report", grid.get("report") or {}, REPORT_KEYS)
    axes = grid.get("axes")
    if not isinstance(axes, dict) or not axes:
        raise GridError(f"{path}: axes must map Hydra keys to lists of values, e.g. dataset: [voc, coco]")
    for key, values in axes.items():
        if not isinstance(values, list) or not values or len({_value(v) for v in values}) < len(values):
            raise GridError(f"{path}: axis {key!r} needs a list of distinct values, got {values!r}")
    if not isinstance(grid.get("output_dir"), str) or not grid["output_dir"].strip():
        raise GridError(f"{path}: output_dir must be a folder path")
    if not isinstance(grid.get("overrides") or [], list):
        raise GridError(f"{path}: overrides must be a list of key=value strings")
    return {"name": grid.get("name") or path.stem, "path": str(path), **grid}


def _known(where: str, got: dict[str, Any], known: set[str]) -> None:
    if not isinstance(got, dict):
        raise GridError(f"{where} must be a mapping")
    extra = sorted(set(got) - known)
    if extra:
        raise GridError(f"unknown key(s) in {where}: {extra}; known keys: {sorted(known)}")


def _value(v: Any) -> str:
    """An axis value as Hydra override syntax."""
    if isinstance(v, list):
        return "[" + ",".join(_value(x) for x in v) + "]"
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    return str(v)


def _folder_name(v: Any) -> str:
    return re.sub(r"[^\w.=+-]+", "_", _value(v)).strip("_") or "_"


# ------------------------------------------------------------------ cells
@dataclass
class Cell:
    index: int
    values: dict[str, Any]  # axis -> value
    overrides: list[str]
    folder: Path
    conf: dict[str, Any] = field(default_factory=dict)
    images: list[str] = field(default_factory=list)  # the run's images, split order

    @property
    def label(self) -> str:
        return " / ".join(_value(v) for v in self.values.values())


def plan(grid: dict[str, Any], extra: list[str], shard: str | None) -> list[Cell]:
    """Every cell with its composed, checked config and its images (the data need not be there)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from elbo_t2ialign.segmentation.config import ConfigError, validate
    from elbo_t2ialign.segmentation.datasets import SegDataset

    root = Path(grid["output_dir"])
    keys = list(grid["axes"])
    cells = []
    with initialize_config_dir(config_dir=hydra_config_dir(), version_base="1.3"):
        for i, combo in enumerate(itertools.product(*grid["axes"].values())):
            values = dict(zip(keys, combo, strict=True))
            folder = root.joinpath(*(_folder_name(v) for v in combo))
            overrides = [
                *(grid.get("overrides") or []),
                *extra,
                *(f"{k}={_value(v)}" for k, v in values.items()),
                f"output_dir={folder}",
                *([f"shard={shard}"] if shard else []),
            ]
            try:
                conf = to_container(compose("segment", overrides=overrides), ConfigError)
                validate(conf)
                dataset = SegDataset(conf["dataset"])
            except (HydraException, OmegaConfBaseException) as err:
                raise GridError(f"cell {i + 1}: {override_message(err, 'segment', overrides)}") from None
            except ConfigError as err:
                raise GridError(f"cell {i + 1} ({' '.join(values_text(values))}): {err}") from None
            limit = conf.get("num_images")
            images = dataset.images if limit in (None, "") else dataset.images[: int(limit)]
            cells.append(Cell(i, values, overrides, folder, conf, images))
    return cells


def values_text(values: dict[str, Any]) -> list[str]:
    return [f"{k}={_value(v)}" for k, v in values.items()]


def write_plan(grid: dict[str, Any], cells: list[Cell]) -> Path:
    """<output_dir>/grid.json: what the report needs to show cells that have no folder yet."""
    from elbo_t2ialign.results import GRID_FILE, planned_labels, segmentation_fields
    from elbo_t2ialign.runfolder import write_json_atomic

    root = Path(grid["output_dir"])
    data = {
        "name": grid["name"],
        "task": "segment",
        "grid_file": grid["path"],
        "axes": grid["axes"],
        "overrides": grid.get("overrides") or [],
        "report": grid.get("report") or {},
        "cells": [
            {
                "dir": str(c.folder.relative_to(root)),
                "values": c.values,
                "overrides": [o for o in c.overrides if not o.startswith(("output_dir=", "shard="))],
                "expected": len(c.images),
                "fields": json.loads(json.dumps(segmentation_fields(c.conf, len(c.images)), default=str)),
                "labels": planned_labels(c.conf),
            }
            for c in cells
        ],
    }
    write_json_atomic(root / GRID_FILE, data)
    return root / GRID_FILE


# ------------------------------------------------------------------ progress of a cell
def cell_status(cell: Cell, shard: Any) -> dict[str, int]:
    """Images of the cell: all, finished, skipped, and this shard's left to do."""
    from elbo_t2ialign.segmentation.layout import SegmentationFolder

    folder = SegmentationFolder(cell.folder)
    done = set(folder.finished_images()) if folder.maps.is_dir() else set()
    skipped = set(folder.skipped_images()) - done
    mine = [n for i, n in enumerate(cell.images) if shard.owns(i)]
    return {
        "images": len(cell.images),
        "finished": sum(n in done for n in cell.images),
        "skipped": sum(n in skipped for n in cell.images),
        "mine": len(mine),
        "todo": sum(n not in done for n in mine),
    }


def needs_run(cell: Cell, status: dict[str, int]) -> bool:
    """Images of this shard to do, or variants the folder has never been asked for."""
    from elbo_t2ialign.runfolder import read_json

    if status["todo"]:
        return True
    recorded = cell.folder / "variants.json"
    if not recorded.is_file():
        return status["mine"] > 0
    have = {e["name"] for e in read_json(recorded)}
    return any(str(v) not in have for v in cell.conf.get("variants") or ["baseline", "elbo"])


def fmt_time(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 90:
        return f"{seconds} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class Estimator:
    """Times the images of each cell (after the first, which warms up) and prints, once per cell,
    the seconds per image and the time left for this cell; the first time also for every cell."""

    def __init__(self, todo: dict[int, int]) -> None:
        self.todo = todo  # cell index -> this shard's images to do
        self.rates: dict[int, float] = {}
        self.cell: Cell | None = None
        self.start = 0.0
        self.said = False

    def begin(self, cell: Cell) -> None:
        self.cell, self.start, self.said = cell, 0.0, False

    def __call__(self, done: int, todo: int) -> None:
        now = time.monotonic()
        if done == WARMUP:
            self.start = now
            return
        timed = done - WARMUP
        if self.said or done < WARMUP or (timed < TIMED and done < todo) or timed < 1:
            return
        rate = (now - self.start) / timed
        assert self.cell is not None
        self.rates[self.cell.index] = rate
        self.said = True
        say(
            f"  {self.cell.label}: {rate:.2f} s per image (images {WARMUP + 1}-{done}); "
            f"about {fmt_time(rate * (todo - done))} left for this cell"
        )
        if len(self.rates) == 1:  # the first estimate: every cell at this rate
            later = {i: n for i, n in self.todo.items() if i > self.cell.index and n}
            if later:
                parts = ", ".join(f"cell {i + 1} {fmt_time(rate * n)}" for i, n in later.items())
                total = rate * (todo - done + sum(later.values()))
                say(
                    f"  estimate at this rate (other models or image sizes differ): {parts}; "
                    f"the grid about {fmt_time(total)} more"
                )


def say(text: str) -> None:
    tqdm.write(text)


# ------------------------------------------------------------------ running
@contextmanager
def grid_lock(root: Path):
    """Held while evaluating cells and writing the report: processes take turns, the last one sees all."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".grid.lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def evaluate_finished(grid: dict[str, Any], cells: list[Cell]) -> None:
    """Evaluate every cell whose images are all finished (by any process) and whose metrics.json is
    missing or counts fewer images."""
    from elbo_t2ialign.runfolder import read_json
    from elbo_t2ialign.segmentation.config import Shard
    from elbo_t2ialign.segmentation.evaluate import evaluate

    options = {k: v for k, v in (grid.get("evaluate") or {}).items() if v is not None}
    with grid_lock(Path(grid["output_dir"])):
        for cell in cells:
            status = cell_status(cell, Shard(0, 1))
            if not status["finished"] or status["finished"] + status["skipped"] < status["images"]:
                continue
            metrics = cell.folder / "metrics.json"
            try:
                evaluated = read_json(metrics).get("num_images", 0) if metrics.is_file() else -1
            except (OSError, ValueError):
                evaluated = -1
            if evaluated < status["finished"]:
                say(f"evaluating cell {cell.index + 1} ({cell.label})")
                evaluate(cell.folder, progress=False, **options)


def run_grid(
    grid: dict[str, Any],
    extra: list[str] = (),
    shard_spec: str | None = None,
    dry: bool = False,
    report_only: bool = False,
    aligner_factory: Any = None,
) -> list[Cell]:
    """Plan, run every cell (this shard's images), evaluate finished cells, write the report."""
    from elbo_t2ialign.segmentation.config import SegmentationError, parse_shard
    from elbo_t2ialign.segmentation.runner import run

    shard = parse_shard(shard_spec)
    spec = f"{shard.index}/{shard.count}" if shard.count > 1 else None
    cells = plan(grid, list(extra), spec)
    statuses = {c.index: cell_status(c, shard) for c in cells}
    print_plan(grid, cells, statuses, shard)
    if dry:
        return cells
    write_plan(grid, cells)
    failed = []
    if not report_only:
        estimator = Estimator({i: s["todo"] for i, s in statuses.items()})
        models: dict[str, Any] = {}
        for cell in cells:
            if not needs_run(cell, statuses[cell.index]):
                continue
            say(f"== cell {cell.index + 1}/{len(cells)}: {cell.label} -> {cell.folder}")
            estimator.begin(cell)
            start = time.monotonic()
            try:
                aligner = (aligner_factory or shared_aligner)(cell.conf, models)
                run(cell.conf, aligner=aligner, on_image=estimator)
            except SegmentationError as err:  # this cell only: the others still run, its images are kept
                if getattr(err, "lock_holder", None) is not None:  # another grid process computes it
                    say(
                        f"   cell {cell.index + 1} is being computed by another launch ({one_line(err)}); left to it"
                    )
                    continue
                say(f"   cell {cell.index + 1} stopped: {one_line(err)}")
                failed.append(f"cell {cell.index + 1} ({cell.label}): {one_line(err)}")
                continue
            say(f"   cell {cell.index + 1} done in {fmt_time(time.monotonic() - start)}")
            status = cell_status(cell, shard)
            if status["finished"] + status["skipped"] >= status["images"]:
                evaluate_finished(grid, [cell])
    evaluate_finished(grid, cells)
    write_report(grid)
    if failed:
        raise GridError(f"{len(failed)} cell(s) stopped, the rest are reported: " + "; ".join(failed))
    return cells


def shared_aligner(conf: dict[str, Any], models: dict[str, Any]) -> Any:
    """An aligner for the cell's options on the model of the cell: loaded once for consecutive cells
    with the same model config and device (the grid's cells run model by model), the previous one
    released first."""
    from elbo_t2ialign import Aligner
    from elbo_t2ialign.segmentation.config import resolve_rank_device, validate
    from elbo_t2ialign.segmentation.runner import build_aligner

    options = validate(conf)
    key = json.dumps([conf["model"], resolve_rank_device(conf.get("device"))], sort_keys=True, default=str)
    if key not in models:
        models.clear()  # one model in memory at a time
        _free_memory()
        models[key] = build_aligner(conf, options).adapter
    return Aligner(models[key], options)


def _free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def write_report(grid: dict[str, Any]) -> None:
    from elbo_t2ialign import report

    root = Path(grid["output_dir"])
    options = grid.get("report") or {}
    with grid_lock(root):
        report.write(
            [root],
            root / "report",
            group_by=options.get("group_by"),
            columns=options.get("columns"),
            crf=bool(options.get("crf")),
            sizes=bool(options.get("sizes")),
            digits=int(options.get("digits", 1)),
        )


def print_plan(
    grid: dict[str, Any], cells: list[Cell], statuses: dict[int, dict[str, int]], shard: Any
) -> None:
    part = f", this process: shard {shard.index}/{shard.count}" if shard.count > 1 else ""
    print(f"grid {grid['name']}: {len(cells)} cells -> {grid['output_dir']}{part}")
    width = max([len(c.label) for c in cells] + [4])
    mine = "to do (this shard)" if shard.count > 1 else "to do"
    print(f"  {'#':>3}  {'cell':<{width}}  {'images':>7}  {'finished':>8}  {mine:>8}")
    for c in cells:
        s = statuses[c.index]
        print(f"  {c.index + 1:>3}  {c.label:<{width}}  {s['images']:>7}  {s['finished']:>8}  {s['todo']:>8}")
    total = {k: sum(s[k] for s in statuses.values()) for k in ("images", "finished", "todo")}
    print(f"  {'':>3}  {'all':<{width}}  {total['images']:>7}  {total['finished']:>8}  {total['todo']:>8}")
    sys.stdout.flush()


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m elbo_t2ialign.grid", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("grid", help="a grid in configs/grid (demo, paper) or a grid YAML file")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every cell, e.g. num_images=10")
    parser.add_argument("--shard", help="i/n: this process takes image i, i+n, ... of every cell")
    parser.add_argument("--plan", action="store_true", help="print the cells and their images; run nothing")
    parser.add_argument(
        "--report", action="store_true", help="only evaluate finished cells and write the report"
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of an expected error too")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    debug = debug_requested(["--debug"] if args.debug else [])[0]
    from elbo_t2ialign.results import ReportError
    from elbo_t2ialign.segmentation.config import SegmentationError

    cli_errors(
        lambda: run_grid(load_grid(args.grid), args.overrides, args.shard, args.plan, args.report),
        (GridError, SegmentationError, ReportError),
        debug,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
