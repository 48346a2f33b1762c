"""From many runs to the paper's tables: `python -m elbo_t2ialign.report RUN_OR_FOLDER... [options]`.

    python -m elbo_t2ialign.report runs/segment                      # every run under runs/segment
    python -m elbo_t2ialign.report runs/grid/demo --group-by model,prompt,variant --columns split
    python -m elbo_t2ialign.report runs/segment runs/generate --crf --sizes --out paper/tables

Folders are searched for segmentation and generation run folders (and grid.json plans, whose cells
without a folder are shown as missing). Writes into --out: report.md (every table and its notes),
segmentation.tex / .csv / .png and generation.tex / .csv / .png, and prints the Markdown. Reads
only, except --evaluate, which first evaluates the segmentation runs that are finished but not
evaluated. Layout and meaning of the cells: elbo_t2ialign/tables.py.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from elbo_t2ialign import results, tables
from elbo_t2ialign.cli import cli_errors, debug_requested
from elbo_t2ialign.results import ReportError
from elbo_t2ialign.runfolder import atomic_path, write_text_atomic

FILES = {"segment": "segmentation", "generate": "generation"}
log = logging.getLogger(__name__)


def _names(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ReportError(f"give field names separated by commas, got {text!r}")
    return names


def write(
    paths: list[str | Path],
    out: str | Path,
    group_by: list[str] | None = None,
    columns: list[str] | None = None,
    crf: bool = False,
    sizes: bool = False,
    digits: int = 1,
    evaluate: bool = False,
    plot: bool = True,
    quiet: bool = False,
) -> dict[str, tables.Table]:
    """Collect the runs under `paths`, write the report into `out`; returns the tables by task."""
    if digits < 0 or digits > 6:
        raise ReportError(f"--digits must lie in 0..6, got {digits}")
    runs = results.collect(paths)
    if not runs:
        raise ReportError(
            f"no run folders under {', '.join(map(str, paths))} (a run folder holds config.yaml)"
        )
    if evaluate:
        results.evaluate_pending(runs)
    defaults = results.grid_defaults(paths)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    made: dict[str, tables.Table] = {}
    lines = ["# Report", "", f"Runs: {len(runs)} under {', '.join(map(str, paths))}.", ""]
    for task, stem in FILES.items():
        if not any(r.task == task for r in runs):
            continue
        rows = group_by or (defaults.get("group_by") if task == "segment" else None)
        cols = columns or (defaults.get("columns") if task == "segment" else None)
        try:
            table = tables.build(runs, task, rows=rows, columns=cols, crf=crf, sizes=sizes, digits=digits)
        except ReportError as err:
            if len({r.task for r in runs}) < 2 or not (rows or cols):
                raise
            # axes chosen for the other task's runs: this task's table keeps its default axes
            log.warning("%s table: %s; its default axes are used", stem, err)
            table = tables.build(runs, task, crf=crf, sizes=sizes, digits=digits)
        made[task] = table
        lines += tables.markdown(table)
        # every file through a temporary name: a full disk or Ctrl-C leaves the last report's file whole
        write_text_atomic(out / f"{stem}.tex", tables.latex(table))
        with atomic_path(out / f"{stem}.csv", ".csv") as tmp:
            tables.write_csv(table, tmp)
        if plot:
            with atomic_path(out / f"{stem}.png", ".png") as tmp:
                tables.plot(table, tmp)
    lines += _state_summary(runs)
    write_text_atomic(out / "report.md", "\n".join(lines))
    if not quiet:
        print("\n".join(lines))
        written = sorted(p.name for p in out.iterdir() if p.suffix in (".md", ".tex", ".csv", ".png"))
        print(f"wrote {out}/: {', '.join(written)}")
    return made


def _state_summary(runs: list[results.Run]) -> list[str]:
    counts: dict[str, int] = {}
    for run in runs:
        counts[run.state] = counts.get(run.state, 0) + 1
    parts = [f"{counts[s]} {s}" for s in tables.STATES if s in counts]
    lines = ["## Runs", "", f"{len(runs)} run(s): " + ", ".join(parts) + ".", ""]
    running = [r for r in runs if r.running]
    if running:  # another launch still computes these: their rows will change
        lines += [
            f"Still running ({len(running)}; write the report again when they end): "
            + "; ".join(
                f"{r.name} ({r.done}/{r.expected if r.expected is not None else '?'} images)" for r in running
            )
            + ".",
            "",
        ]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m elbo_t2ialign.report", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("paths", nargs="+", metavar="RUN_OR_FOLDER")
    parser.add_argument("--out", default="runs/report", help="where the report goes (default runs/report)")
    parser.add_argument(
        "--group-by",
        help="row fields, comma-separated (default: model and the settings that differ between runs; "
        "e.g. model,prompt,variant)",
    )
    parser.add_argument("--columns", help="column fields (default: dataset; prompts for generation)")
    parser.add_argument("--crf", action="store_true", help="also the dense-CRF figures (evaluate --crf)")
    parser.add_argument("--sizes", action="store_true", help="also mIoU of small / medium / large objects")
    parser.add_argument("--digits", type=int, default=1, help="decimals in Markdown and LaTeX (default 1)")
    parser.add_argument("--evaluate", action="store_true", help="first evaluate finished, unevaluated runs")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an expected error too")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    debug = debug_requested(["--debug"] if args.debug else [])[0]
    from elbo_t2ialign.segmentation.config import SegmentationError

    def go() -> Any:
        return write(
            args.paths,
            args.out,
            _names(args.group_by),
            _names(args.columns),
            crf=args.crf,
            sizes=args.sizes,
            digits=args.digits,
            evaluate=args.evaluate,
            plot=not args.no_plot,
        )

    cli_errors(go, (ReportError, SegmentationError), debug)
    return 0


if __name__ == "__main__":
    sys.exit(main())
