"""The cross-run tables: runs (`results.Run`) laid out by chosen axes, and written as Markdown, LaTeX
(booktabs), CSV and a grouped-bar plot.

A table has one row per value of the `rows` fields (default: model, and every setting that differs
between the runs), one column group per value of the `columns` fields (default: dataset for
segmentation, prompts for generation), and in each group the sub-columns baseline, ELBO and delta
(each variant at its own threshold, as metrics.json holds it); optionally the dense-CRF figures and
the mIoU of small / medium / large objects. With `variant` among the rows, each calibration variant
of a run is a row (its mIoU and the difference to the run's baseline).

Cells that are not finished say so (`partial n/N`, `not evaluated`, `missing`, or `k runs` when
several runs fall into one cell), never left out. In each column, a run that differs from the
others on something that makes numbers incomparable (split, seed, number of images, how the
threshold was chosen, size-bucket rule, CRF unary; CLIP model, steps) is marked with a dagger and named in the notes; the best finished, comparable value of
each sub-column is bold.
"""

from __future__ import annotations

import csv
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from elbo_t2ialign.results import SIZES, ReportError, Run

DEFAULT_COLUMNS = {"segment": ["dataset"], "generate": ["prompts"]}
# settings that get their own rows when they differ between runs (besides model)
SETTINGS = {"segment": ["prompt", "strength"], "generate": ["strength", "elbo_steps", "after_elbo_steps"]}
# fields that make two runs in one column incomparable unless they are an axis of the table
COMPARE = {
    "segment": ["split", "seed", "threshold", "images", "buckets", "crf_unary"],
    "generate": ["seed", "steps", "clip", "images"],
}
TITLES = {"segment": "Segmentation: mIoU (%)", "generate": "Generation: CLIP score"}
STATES = ("done", "unevaluated", "partial", "missing")


@dataclass(frozen=True)
class Sub:
    key: str  # value key of a cell: baseline, method, delta, *_crf, small, medium, large
    header: str  # Markdown / CSV header
    latex: str
    signed: bool = False


@dataclass
class Entry:
    """One run (or one variant of a run) placed in the table."""

    run: Run
    variant: str  # the run's variant shown as "method" (elbo unless variant is an axis)
    key: dict[str, Any]


@dataclass
class Cell:
    entries: list[Entry]
    state: str  # done | unevaluated | partial | missing | ambiguous
    values: dict[str, float | None] = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)  # "split=val_100": differs from its column
    best: set[str] = field(default_factory=set)

    def text(self) -> str:
        """What a cell that shows no numbers says instead."""
        if self.state == "missing":
            return "missing"
        if self.state == "ambiguous":
            return f"{len(self.entries)} runs"
        run = self.entries[0].run
        of = f"{run.done}/{run.expected if run.expected is not None else '?'}"
        return f"partial {of}" if self.state == "partial" else f"not evaluated {of}"


@dataclass
class Table:
    task: str
    rows: list[str]
    columns: list[str]
    row_keys: list[tuple]
    col_keys: list[tuple]
    subs: list[Sub]
    cells: dict[tuple[tuple, tuple], Cell]
    labels: dict[tuple[str, Any], str]  # (field, value) -> how it is printed
    notes: list[str]
    digits: int = 1

    @property
    def title(self) -> str:
        return TITLES[self.task]

    def label(self, fields: list[str], key: tuple) -> list[str]:
        return [self.labels.get((f, v), fmt_field(v)) for f, v in zip(fields, key, strict=True)]

    def col_label(self, key: tuple) -> str:
        return " / ".join(self.label(self.columns, key))


# ------------------------------------------------------------------ building
def known_fields(runs: list[Run]) -> set[str]:
    return {"variant", *(f for run in runs for f in run.fields if f != "dir")}


def default_rows(runs: list[Run], task: str, columns: list[str]) -> list[str]:
    """model, then every setting (and elbo option) that differs between the runs."""
    candidates = SETTINGS[task] + sorted(
        {f for r in runs for f in r.fields if f.startswith("elbo.") and f != "elbo.strength"}
    )
    varying = [f for f in candidates if len({fmt_field(r.fields.get(f)) for r in runs}) > 1]
    return [f for f in ["model", *varying] if f not in columns]


def build(
    runs: list[Run],
    task: str,
    rows: list[str] | None = None,
    columns: list[str] | None = None,
    crf: bool = False,
    sizes: bool = False,
    digits: int = 1,
) -> Table:
    """The table of the runs of one task (segment or generate)."""
    runs = [r for r in runs if r.task == task]
    if not runs:
        raise ReportError(f"no {task} runs found")
    columns = list(columns or DEFAULT_COLUMNS[task])
    rows = list(rows or default_rows(runs, task, columns))
    known = known_fields(runs)
    for name in [*rows, *columns]:
        if name not in known:
            raise ReportError(
                f"no run records {name!r}; fields the runs record: "
                + ", ".join(sorted(k for k in known if "." not in k))
                + " and every config key by its dotted name (e.g. elbo.gaussian_sigma)"
            )
    overlap = set(rows) & set(columns)
    if overlap:
        raise ReportError(f"{sorted(overlap)} cannot be both a row and a column field")
    by_variant = "variant" in rows or "variant" in columns
    if by_variant and task != "segment":
        raise ReportError("variant is an axis of segmentation tables only")
    entries = [
        Entry(run, v, {**run.fields, "variant": v})
        for run in sorted(runs, key=lambda r: r.order)
        for v in (_variants_of(run) if by_variant else ["elbo"])
    ]
    labels: dict[tuple[str, Any], str] = {}
    for e in entries:
        if by_variant:
            setting = e.run.labels.get(e.variant)
            labels[("variant", e.variant)] = f"{e.variant} ({setting})" if setting else e.variant

    def key(e: Entry, names: list[str]) -> tuple:
        return tuple(_hashable(e.key.get(n)) for n in names)

    row_keys = list(dict.fromkeys(key(e, rows) for e in entries))
    col_keys = list(dict.fromkeys(key(e, columns) for e in entries))
    subs = _subs(task, by_variant, crf, sizes)
    cells: dict[tuple[tuple, tuple], Cell] = {}
    for r in row_keys:
        for c in col_keys:
            found = [e for e in entries if key(e, rows) == r and key(e, columns) == c]
            cells[(r, c)] = _cell(found, task)
    table = Table(task, rows, columns, row_keys, col_keys, subs, cells, labels, [], digits)
    table.notes = _flag(table) + _mark_best(table) + _cell_notes(table, crf)
    return table


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _variants_of(run: Run) -> list[str]:
    """Evaluated variants (metrics.json), else the ones the run records or plans, in their order."""
    names = list(run.labels) if run.labels else ["baseline", "elbo"]
    return list(dict.fromkeys([*names, *run.variants])) if run.variants else names


def _subs(task: str, by_variant: bool, crf: bool, sizes: bool) -> list[Sub]:
    if task == "generate":
        return [
            Sub("baseline", "base", "base"),
            Sub("method", "ELBO", "ELBO"),
            Sub("delta", "Δ", r"$\Delta$", True),
        ]
    if by_variant:
        subs = [Sub("method", "mIoU", "mIoU"), Sub("delta", "Δ base", r"$\Delta$", True)]
        if crf:
            subs += [
                Sub("method_crf", "+CRF", "+CRF"),
                Sub("delta_crf", "Δ CRF", r"$\Delta_\mathrm{CRF}$", True),
            ]
    else:
        subs = [
            Sub("baseline", "base", "base"),
            Sub("method", "ELBO", "ELBO"),
            Sub("delta", "Δ", r"$\Delta$", True),
        ]
        if crf:
            subs += [
                Sub("baseline_crf", "base+CRF", "base+CRF"),
                Sub("method_crf", "ELBO+CRF", "ELBO+CRF"),
                Sub("delta_crf", "Δ CRF", r"$\Delta_\mathrm{CRF}$", True),
            ]
    return subs + ([Sub(s, s, s) for s in SIZES] if sizes else [])


def entry_values(entry: Entry, task: str) -> dict[str, float | None]:
    """Every number of an entry: baseline, method, delta (+ thresholds, CRF, sizes), from its run's files."""
    v = entry.run.variants
    if task == "generate":
        base, method = (v.get("baseline") or {}).get("clip"), (v.get("elbo") or {}).get("clip")
        return {"baseline": base, "method": method, "delta": _minus(method, base)}
    base, method = v.get("baseline") or {}, v.get(entry.variant) or {}
    out = {
        "baseline": base.get("mIoU"),
        "method": method.get("mIoU"),
        "delta": _minus(method.get("mIoU"), base.get("mIoU")),
        "baseline_threshold": base.get("threshold"),
        "method_threshold": method.get("threshold"),
        "baseline_crf": base.get("crf"),
        "method_crf": method.get("crf"),
        "delta_crf": _minus(method.get("crf"), base.get("crf")),
    }
    return out | {s: method.get(s) for s in SIZES} | {f"baseline_{s}": base.get(s) for s in SIZES}


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _cell(found: list[Entry], task: str) -> Cell:
    if not found:
        return Cell([], "missing")
    if len(found) > 1:
        return Cell(found, "ambiguous")
    entry = found[0]
    state = entry.run.state
    if state == "done" and entry.variant not in entry.run.variants:
        state = "unevaluated"  # a variant the run asks for but metrics.json does not hold yet
    return Cell(found, state, entry_values(entry, task) if entry.run.variants else {})


def _flag(table: Table) -> list[str]:
    """Mark cells that differ from the rest of their column on a comparability field; notes."""
    fields = [f for f in COMPARE[table.task] if f not in table.rows + table.columns]
    notes = []
    for c in table.col_keys:
        cells = [(r, table.cells[(r, c)]) for r in table.row_keys if table.cells[(r, c)].entries]
        for f in fields:
            values = [(r, cell, fmt_field(e.run.fields.get(f))) for r, cell in cells for e in cell.entries]
            values = [(r, cell, v) for r, cell, v in values if v != "-"]
            counts = Counter(v for _, _, v in values)
            if len(counts) < 2:
                continue
            common = max(counts, key=lambda v: (counts[v], -[x for _, _, x in values].index(v)))
            odd = [(r, cell, v) for r, cell, v in values if v != common]
            for _, cell, v in odd:
                if f"{f}={v}" not in cell.flags:
                    cell.flags.append(f"{f}={v}")
            listed = ", ".join(f"{' / '.join(table.label(table.rows, r))}: {v}" for r, _, v in odd)
            notes.append(
                f"† {table.col_label(c)}: {f} differs within the column ({common} in {counts[common]} "
                f"cell(s); {listed}); these numbers are not comparable with the rest of the column."
            )
    return notes


def _mark_best(table: Table) -> list[str]:
    for c in table.col_keys:
        for sub in table.subs:
            scored = []
            for r in table.row_keys:
                cell = table.cells[(r, c)]
                value = cell.values.get(sub.key)
                if sub.signed and cell.entries and cell.entries[0].variant == "baseline":
                    continue  # the baseline's difference to itself
                if cell.state == "done" and not cell.flags and value is not None and math.isfinite(value):
                    scored.append((round(value, table.digits), cell))
            if len(scored) < 2:
                continue  # best of one is no mark
            top = max(v for v, _ in scored)
            for v, cell in scored:
                if v == top:
                    cell.best.add(sub.key)
    return []


def _cell_notes(table: Table, crf: bool) -> list[str]:
    notes, no_crf = [], []
    for (r, c), cell in table.cells.items():
        where = f"{' / '.join(table.label(table.rows, r))} on {table.col_label(c)}"
        if cell.state == "ambiguous":
            folders = "; ".join(e.run.name for e in cell.entries)
            differ = _differing([e.run.fields for e in cell.entries])
            notes.append(
                f"{where}: {len(cell.entries)} runs fall into this cell ({folders}); they differ in "
                f"{', '.join(differ[:6]) or 'nothing recorded'}: add one of those to --group-by or --columns."
            )
        elif cell.state == "unevaluated" and cell.entries[0].run.folder is not None:
            notes.append(
                f"{where}: finished, not evaluated: python -m elbo_t2ialign.evaluate {cell.entries[0].run.folder} "
                "(or give the report --evaluate)."
            )
        elif cell.state == "done" and cell.entries[0].run.skipped:
            notes.append(
                f"{where}: {cell.entries[0].run.skipped} image(s) skipped as unreadable (see skipped/)."
            )
        if crf and cell.state == "done" and cell.values.get("method_crf") is None:
            no_crf.append(str(cell.entries[0].run.folder))
    if no_crf:
        notes.append(
            "no dense-CRF figures (python -m elbo_t2ialign.evaluate <run> --crf): "
            + ", ".join(dict.fromkeys(no_crf))
        )
    return notes


def _differing(fields: list[dict[str, Any]]) -> list[str]:
    keys = sorted({k for f in fields for k in f} - {"dir", "output_dir"})
    return [k for k in keys if len({fmt_field(f.get(k)) for f in fields}) > 1]


# ------------------------------------------------------------------ formatting
def fmt_field(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ",".join(fmt_field(v) for v in value)
    return str(value)


def fmt_number(value: float | None, digits: int, signed: bool = False) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _legend(table: Table) -> str:
    what = (
        "mIoU (%) of each run's calibrated (ELBO) and strength-1 (base) maps, each at its own threshold"
        if table.task == "segment"
        else "CLIP score (100 x cos) of the ELBO-weighted and the unweighted images, over the prompts with both"
    )
    return (
        f"{what}. Bold: the best finished, comparable value of the column. "
        "partial n/N: n of N images finished; not evaluated: finished, no metrics yet; missing: no run."
    )


def markdown(table: Table) -> list[str]:
    header = [*table.rows] + [f"{table.col_label(c)}: {s.header}" for c in table.col_keys for s in table.subs]
    lines = [f"## {table.title}", "", "| " + " | ".join(header) + " |"]
    lines.append(
        "| " + " | ".join(["---"] * len(table.rows) + ["---:"] * (len(header) - len(table.rows))) + " |"
    )
    for r in table.row_keys:
        cells = [x.replace("|", "\\|") for x in table.label(table.rows, r)]
        for c in table.col_keys:
            cell = table.cells[(r, c)]
            if cell.state != "done":
                cells += [cell.text()] + [""] * (len(table.subs) - 1)
                continue
            for s in table.subs:
                text = fmt_number(cell.values.get(s.key), table.digits, s.signed)
                text = f"**{text}**" if s.key in cell.best else text
                cells.append(text + ("†" if cell.flags else ""))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", _legend(table)]
    if table.notes:
        lines += ["", *[f"- {n}" for n in table.notes]]
    return lines + [""]


LATEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "Δ": r"$\Delta$",
    "†": r"\textsuperscript{\dag}",
}


def tex(text: str) -> str:
    return "".join(LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def latex(table: Table, label: str | None = None) -> str:
    """A booktabs `table` environment, ready to paste (needs \\usepackage{booktabs})."""
    n_rows, n_subs = len(table.rows), len(table.subs)
    spec = "l" * n_rows + "".join("r" * n_subs for _ in table.col_keys)
    out = [
        "% made by python -m elbo_t2ialign.report; needs \\usepackage{booktabs}",
        "\\begin{table}[t]",
        "\\centering",
        f"\\caption{{{tex(_legend(table))}}}",
        f"\\label{{{label or 'tab:' + table.task}}}",
        f"\\begin{{tabular}}{{{spec}}}",
        "\\toprule",
    ]
    if n_subs > 1:
        groups = [f"\\multicolumn{{{n_subs}}}{{c}}{{{tex(table.col_label(c))}}}" for c in table.col_keys]
        out.append(" & ".join([""] * n_rows + groups) + " \\\\")
        rules = [
            f"\\cmidrule(lr){{{n_rows + 1 + i * n_subs}-{n_rows + (i + 1) * n_subs}}}"
            for i in range(len(table.col_keys))
        ]
        out.append(" ".join(rules))
        heads = [tex(f) for f in table.rows] + [s.latex for _ in table.col_keys for s in table.subs]
    else:
        heads = [tex(f) for f in table.rows] + [tex(table.col_label(c)) for c in table.col_keys]
    out += [" & ".join(heads) + " \\\\", "\\midrule"]
    for r in table.row_keys:
        cells = [tex(x) for x in table.label(table.rows, r)]
        for c in table.col_keys:
            cell = table.cells[(r, c)]
            if cell.state != "done":
                cells.append(f"\\multicolumn{{{n_subs}}}{{c}}{{\\emph{{{tex(cell.text())}}}}}")
                continue
            for s in table.subs:
                text = tex(fmt_number(cell.values.get(s.key), table.digits, s.signed))
                text = f"\\textbf{{{text}}}" if s.key in cell.best else text
                cells.append(text + ("\\textsuperscript{\\dag}" if cell.flags else ""))
        out.append(" & ".join(cells) + " \\\\")
    out += ["\\bottomrule", "\\end{tabular}"]
    flags = [n for n in table.notes if n.startswith("†")]
    if flags:
        out += ["", "\\par\\smallskip\\footnotesize " + " ".join(tex(n) for n in flags)]
    out += ["\\end{table}", ""]
    return "\n".join(out)


CSV_VALUES = (
    "baseline",
    "method",
    "delta",
    "baseline_threshold",
    "method_threshold",
    "baseline_crf",
    "method_crf",
    "delta_crf",
    *SIZES,
    *(f"baseline_{s}" for s in SIZES),
)


def write_csv(table: Table, path: Path) -> None:
    """One line per cell (per run when several runs share one), every number at full precision."""
    values = CSV_VALUES if table.task == "segment" else CSV_VALUES[:3]
    variant = [] if "variant" in table.rows + table.columns else ["variant"]
    header = [*table.rows, *table.columns, *variant, "state", "done", "expected", "skipped", *values]
    header += ["best", "flags", "folder"]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for (r, c), cell in table.cells.items():
            for entry in cell.entries or [None]:
                run = entry.run if entry else None
                vals = entry_values(entry, table.task) if entry and run.variants else {}
                row = [*map(fmt_field, r), *map(fmt_field, c)]
                row += ([entry.variant if entry else ""] if variant else []) + [cell.state]
                row += [
                    run.done if run else "",
                    _blank(run.expected if run else None),
                    run.skipped if run else "",
                ]
                row += [_blank(vals.get(k)) for k in values]
                row += [
                    " ".join(sorted(cell.best)),
                    " ".join(cell.flags),
                    str(run.folder or "") if run else "",
                ]
                writer.writerow(row)


def _blank(value: Any) -> Any:
    return "" if value is None else value


def plot(table: Table, path: Path) -> None:
    """Grouped bars: one group per column, one bar per row (the method's value; a black tick marks
    the baseline of the same run); cells without numbers are named under their slot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n_rows, n_cols = len(table.row_keys), len(table.col_keys)
    width = 0.8 / max(n_rows, 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 + n_cols * (0.5 + 0.35 * n_rows)), 4.2))
    x = np.arange(n_cols)
    top = 0.0
    for i, r in enumerate(table.row_keys):
        pos = x - 0.4 + (i + 0.5) * width
        heights, bases = [], []
        for c in table.col_keys:
            cell = table.cells[(r, c)]
            done = cell.state == "done"
            heights.append(cell.values.get("method") if done else None)
            bases.append(cell.values.get("baseline") if done else None)
        h = np.array([np.nan if v is None else v for v in heights], dtype=float)
        bars = ax.bar(pos, np.nan_to_num(h), width * 0.9, label=" / ".join(table.label(table.rows, r)))
        for p, b, v, c in zip(pos, bases, heights, table.col_keys, strict=True):
            if b is not None and "variant" not in table.rows:
                ax.plot([p - width * 0.45, p + width * 0.45], [b, b], color="black", linewidth=1.5)
            if v is None:
                ax.text(p, 0.5, table.cells[(r, c)].text(), rotation=90, ha="center", va="bottom", fontsize=7)
        top = max([top, *[v for v in heights if v is not None], *[v for v in bases if v is not None]])
        for bar in bars:
            bar.set_alpha(0.9)
    ax.set_xticks(x, [table.col_label(c) for c in table.col_keys])
    ylabel = "mIoU (%)" if table.task == "segment" else "CLIP score"
    note = "; black ticks: baseline" if "variant" not in table.rows else ""
    ax.set(ylabel=ylabel, ylim=(0, top * 1.15 + 1), title=f"{table.title}{note}")
    ax.legend(fontsize=7, ncol=max(1, min(3, n_rows // 4 + 1)))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
