"""The cross-run report (issue 25) on run folders written here with known metrics: every cell of the
Markdown, LaTeX and CSV tables is compared with the folder's own metrics.json (read directly, the
delta computed here), unfinished and missing cells say so, incomparable runs are flagged, and the
LaTeX compiles where pdflatex exists (else its structure is checked)."""

import csv
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from omegaconf import OmegaConf

from elbo_t2ialign import report, results, tables
from elbo_t2ialign.results import ReportError

MODELS = ["sd15", "sdxl"]
DATASETS = ["voc", "coco"]


def seg_run(
    folder,
    model,
    dataset,
    *,
    done=10,
    expected=10,
    evaluated=True,
    split="val",
    seed=0,
    fixed=None,
    search="sweep",
    variants=("baseline", "elbo"),
    prompt="template",
    strength=3.0,
    crf=False,
    rng=None,
):
    """A segmentation run folder as the runner and evaluator leave it, with random figures."""
    rng = rng or np.random.default_rng(abs(hash((model, dataset, split, seed))) % 2**32)
    conf = {
        "model": {"name": model, "id": f"hub/{model}"},
        "dataset": {"name": dataset, "split": split, "prompt": prompt, "phrase_path": None},
        "elbo": {"strength": strength},
        "seed": seed,
        "num_images": expected,
        "variants": list(variants),
        "output_dir": str(folder),
    }
    folder.mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(conf), folder / "config.yaml")
    (folder / "identity.json").write_text(json.dumps({"dataset": {"num_images": 500}}))
    for i in range(done):
        (folder / "maps" / f"img_{i:03d}").mkdir(parents=True)
        (folder / "maps" / f"img_{i:03d}" / "scores.json").write_text("{}")
    if not evaluated:
        return None
    labels = {"baseline": "strength 1", "elbo": f"strength {strength:g}", "s5": "strength 5"}
    figures = {}
    for v in variants:
        figures[v] = {
            "mIoU": float(rng.uniform(20, 60)),
            "threshold": float(fixed if fixed is not None else rng.integers(30, 80) / 100),
            "setting": {"label": labels[v]},
        }
        if crf:
            figures[v]["crf"] = {"mIoU": float(rng.uniform(20, 60))}
    metrics = {
        "num_images": done,
        "num_expected": expected,
        "threshold_mode": "sweep" if fixed is None else "fixed",
        "threshold_search": search,
        "bucket_rule": "equal",
        "skipped": {},
        "variants": figures,
        "ablation": [
            {"variant": v, **{s: float(rng.uniform(0, 70)) for s in ("small", "medium", "large")}}
            for v in variants
        ],
    }
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return metrics


def grid_of_runs(root, missing=("sdxl", "coco"), partial=("sdxl", "voc")):
    """2 models x 2 datasets: one cell partial (3 of 10 images, no metrics), one without a folder."""
    made = {}
    for m in MODELS:
        for d in DATASETS:
            if (m, d) == missing:
                continue
            part = (m, d) == partial
            made[(m, d)] = seg_run(root / m / d, m, d, done=3 if part else 10, evaluated=not part)
    return made


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def md_table(path):
    """The first Markdown table of a report as {row label: {column header: text}}."""
    lines = [line for line in path.read_text().splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) != len(header):
            break  # the next table
        rows[" / ".join(cells[: header.index(next(h for h in header if ":" in h))])] = dict(
            zip(header, cells, strict=True)
        )
    return header, rows


def test_every_cell_matches_the_run_folders_metrics(tmp_path):
    made = grid_of_runs(tmp_path / "runs")
    out = tmp_path / "report"
    report.write([tmp_path / "runs"], out, quiet=True)
    assert {p.name for p in out.iterdir()} >= {"report.md", "segmentation.tex", "segmentation.csv"}
    assert (out / "segmentation.png").stat().st_size > 5000

    rows = {(r["model"], r["dataset"]): r for r in read_csv(out / "segmentation.csv")}
    assert set(rows) == {(m, d) for m in MODELS for d in DATASETS}  # the missing cell is a line too
    header, md = md_table(out / "report.md")
    # columns and rows in the order the folders sort in (coco before voc)
    assert header == ["model"] + [f"{d}: {s}" for d in sorted(DATASETS) for s in ("base", "ELBO", "Δ")]
    for (m, d), metrics in made.items():
        line, cells = rows[(m, d)], md[m]
        if metrics is None:
            assert (line["state"], line["done"], line["expected"]) == ("partial", "3", "10")
            assert cells[f"{d}: base"] == "partial 3/10" and cells[f"{d}: ELBO"] == ""
            continue
        base = metrics["variants"]["baseline"]["mIoU"]
        elbo = metrics["variants"]["elbo"]["mIoU"]
        assert line["state"] == "done"
        assert float(line["baseline"]) == base and float(line["method"]) == elbo
        assert float(line["delta"]) == pytest.approx(elbo - base, abs=1e-12)
        assert float(line["method_threshold"]) == metrics["variants"]["elbo"]["threshold"]
        assert float(line["baseline_threshold"]) == metrics["variants"]["baseline"]["threshold"]
        assert line["folder"] == str(tmp_path / "runs" / m / d)
        assert cells[f"{d}: base"].strip("*") == f"{base:.1f}"
        assert cells[f"{d}: ELBO"].strip("*") == f"{elbo:.1f}"
        assert cells[f"{d}: Δ"].strip("*") == f"{elbo - base:+.1f}"
    missing = rows[("sdxl", "coco")]
    assert missing["state"] == "missing" and missing["folder"] == "" and md["sdxl"]["coco: base"] == "missing"

    # bold: the best finished value of each column (voc has one finished cell: no mark)
    voc_done = [m for m in MODELS if made.get((m, "voc"))]
    assert len(voc_done) == 1 and "**" not in md[voc_done[0]]["voc: ELBO"]
    coco = {m: made[(m, "coco")]["variants"] for m in MODELS if made.get((m, "coco"))}
    assert len(coco) == 1


def test_best_of_each_column_is_bold(tmp_path):
    made = {}
    for m in ("a", "b", "c"):
        made[m] = seg_run(tmp_path / m, m, "voc")
    report.write([tmp_path], tmp_path / "out", quiet=True, digits=2)
    _, md = md_table(tmp_path / "out" / "report.md")
    for key, header in (("baseline", "voc: base"), ("elbo", "voc: ELBO")):
        best = max(made, key=lambda m: made[m]["variants"][key]["mIoU"])
        assert [m for m in made if md[m][header].startswith("**")] == [best]
    deltas = {m: made[m]["variants"]["elbo"]["mIoU"] - made[m]["variants"]["baseline"]["mIoU"] for m in made}
    assert [m for m in made if md[m]["voc: Δ"].startswith("**")] == [max(deltas, key=deltas.get)]
    tex = (tmp_path / "out" / "segmentation.tex").read_text()
    best = max(made, key=lambda m: made[m]["variants"]["elbo"]["mIoU"])
    assert f"\\textbf{{{made[best]['variants']['elbo']['mIoU']:.2f}}}" in tex


def test_incomparable_runs_in_one_column_are_flagged(tmp_path):
    seg_run(tmp_path / "a", "a", "voc")
    seg_run(tmp_path / "b", "b", "voc")
    seg_run(tmp_path / "c", "c", "voc", split="val_100")
    seg_run(tmp_path / "d", "d", "voc", seed=7)
    seg_run(tmp_path / "e", "e", "voc", fixed=0.4)
    seg_run(tmp_path / "f", "f", "voc", search="binary")  # the reference's threshold search
    made = report.write([tmp_path], tmp_path / "out", quiet=True)
    table = made["segment"]
    flags = {r[0]: table.cells[(r, ("voc",))].flags for r in table.row_keys}
    assert flags == {
        "a": [],
        "b": [],
        "c": ["split=val_100"],
        "d": ["seed=7"],
        "e": ["threshold=fixed 0.40"],
        "f": ["threshold=binary"],
    }
    text = (tmp_path / "out" / "report.md").read_text()
    for field in ("split", "seed", "threshold"):
        assert f"† voc: {field} differs within the column" in text
    _, md = md_table(tmp_path / "out" / "report.md")
    assert md["c"]["voc: ELBO"].endswith("†") and not md["a"]["voc: ELBO"].endswith("†")
    assert not any(md[m]["voc: ELBO"].startswith("**") for m in "cdef")  # flagged cells are never best
    assert "\\textsuperscript{\\dag}" in (tmp_path / "out" / "segmentation.tex").read_text()
    # the same runs with split as a column: nothing to flag for split
    table = report.write([tmp_path], tmp_path / "out2", columns=["dataset", "split"], quiet=True)["segment"]
    assert not any("split=" in f for cell in table.cells.values() for f in cell.flags)


def test_several_runs_in_one_cell_are_shown_not_chosen(tmp_path):
    seg_run(tmp_path / "s0", "sd15", "voc", seed=0)
    seg_run(tmp_path / "s1", "sd15", "voc", seed=1)
    table = report.write([tmp_path], tmp_path / "out", quiet=True)["segment"]
    (cell,) = table.cells.values()
    assert cell.state == "ambiguous" and cell.text() == "2 runs"
    text = (tmp_path / "out" / "report.md").read_text()
    assert "2 runs fall into this cell" in text and "seed" in text
    assert len(read_csv(tmp_path / "out" / "segmentation.csv")) == 2  # one line per run
    table = report.write([tmp_path], tmp_path / "out", group_by=["model", "seed"], quiet=True)["segment"]
    assert [c.state for c in table.cells.values()] == ["done", "done"]


def test_variant_rows_crf_and_sizes(tmp_path):
    metrics = seg_run(tmp_path / "r", "sd15", "voc", variants=("baseline", "elbo", "s5"), crf=True)
    out = tmp_path / "out"
    table = report.write([tmp_path], out, group_by=["model", "variant"], crf=True, sizes=True, quiet=True)[
        "segment"
    ]
    assert [s.key for s in table.subs] == [
        "method",
        "delta",
        "method_crf",
        "delta_crf",
        "small",
        "medium",
        "large",
    ]
    rows = {r["variant"]: r for r in read_csv(out / "segmentation.csv")}
    sizes = {row["variant"]: row for row in metrics["ablation"]}
    base = metrics["variants"]["baseline"]
    for v in ("baseline", "elbo", "s5"):
        fig = metrics["variants"][v]
        assert float(rows[v]["method"]) == fig["mIoU"]
        assert float(rows[v]["delta"]) == pytest.approx(fig["mIoU"] - base["mIoU"], abs=1e-12)
        assert float(rows[v]["method_crf"]) == fig["crf"]["mIoU"]
        assert float(rows[v]["delta_crf"]) == pytest.approx(
            fig["crf"]["mIoU"] - base["crf"]["mIoU"], abs=1e-12
        )
        for s in ("small", "medium", "large"):
            assert float(rows[v][s]) == sizes[v][s]
    _, md = md_table(out / "report.md")
    assert set(md) == {"sd15 / baseline (strength 1)", "sd15 / elbo (strength 3)", "sd15 / s5 (strength 5)"}
    assert md["sd15 / s5 (strength 5)"]["voc: small"].strip("*") == f"{sizes['s5']['small']:.1f}"


def test_grid_plan_cells_without_folder_are_missing_and_unevaluated_runs_say_so(tmp_path):
    root = tmp_path / "grid"
    seg_run(root / "a" / "voc", "a", "voc")
    seg_run(root / "a" / "coco", "a", "coco", done=10, evaluated=False)  # finished, not evaluated
    fields = {
        "model": "b",
        "dataset": "voc",
        "split": "val",
        "prompt": "template",
        "strength": 3.0,
        "seed": 0,
    }
    plan = {
        "name": "t",
        "task": "segment",
        "report": {"group_by": ["model"], "columns": ["dataset"]},
        "cells": [
            {"dir": "a/voc", "fields": {**fields, "model": "a"}, "expected": 10},
            {"dir": "a/coco", "fields": {**fields, "model": "a", "dataset": "coco"}, "expected": 10},
            {"dir": "b/voc", "fields": fields, "expected": 10},
        ],
    }
    (root / "grid.json").write_text(json.dumps(plan))
    table = report.write([root], tmp_path / "out", quiet=True)["segment"]
    states = {(r[0], c[0]): table.cells[(r, c)].state for r in table.row_keys for c in table.col_keys}
    assert states == {
        ("a", "voc"): "done",
        ("a", "coco"): "unevaluated",
        ("b", "voc"): "missing",
        ("b", "coco"): "missing",
    }
    text = (tmp_path / "out" / "report.md").read_text()
    assert "not evaluated 10/10" in text and "python -m elbo_t2ialign.evaluate" in text


def test_generation_clip_table(tmp_path):
    from PIL import Image

    made = {}
    for model, strength in (("sd15", 1.2), ("sdxl", 1.2)):
        folder = tmp_path / model
        conf = {
            "model": {"name": model},
            "prompts": {"name": "ane"},
            "strength": strength,
            "seed": 4307,
            "steps": 50,
            "images_per_prompt": 1,
            "baseline": True,
        }
        folder.mkdir()
        OmegaConf.save(OmegaConf.create(conf), folder / "config.yaml")
        (folder / "prompts.json").write_text(
            json.dumps([{"index": i, "prompt": "p", "phrases": []} for i in range(2)])
        )
        for v in ("elbo", "baseline"):
            (folder / "images" / v).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (4, 4)).save(folder / "images" / v / f"{i:05d}_{4307}.png")
        scores = {
            "clip_model": "openai/clip-vit-base-patch32",
            "variants": {
                v: {"clip_score": 30.0 + k, "num_images": 2} for k, v in enumerate(("elbo", "baseline"))
            },
            "paired": {"elbo": 31.25 if model == "sd15" else 29.5, "baseline": 30.5, "num_prompts": 2},
        }
        (folder / "clip_scores.json").write_text(json.dumps(scores))
        made[model] = scores
    report.write([tmp_path], tmp_path / "out", quiet=True)
    rows = {r["model"]: r for r in read_csv(tmp_path / "out" / "generation.csv")}
    for model, scores in made.items():
        assert rows[model]["state"] == "done"
        assert float(rows[model]["method"]) == scores["paired"]["elbo"]
        assert float(rows[model]["baseline"]) == scores["paired"]["baseline"]
        assert float(rows[model]["delta"]) == scores["paired"]["elbo"] - scores["paired"]["baseline"]
    assert "## Generation: CLIP score" in (tmp_path / "out" / "report.md").read_text()


def test_bad_axes_and_paths_are_one_line_errors(tmp_path, capsys):
    seg_run(tmp_path / "r", "sd15", "voc")
    with pytest.raises(ReportError, match="no run records 'colour'.*model"):
        report.write([tmp_path], tmp_path / "out", group_by=["colour"], quiet=True)
    with pytest.raises(ReportError, match="both a row and a column"):
        report.write([tmp_path], tmp_path / "out", group_by=["dataset"], quiet=True)
    with pytest.raises(SystemExit) as stop:
        report.main([str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "does not exist" in err and "\n" not in err
    # dotted config keys are fields too
    table = report.write([tmp_path], tmp_path / "out", group_by=["model", "elbo.strength"], quiet=True)[
        "segment"
    ]
    assert table.row_keys == [("sd15", 3.0)]


def test_report_never_walks_into_maps(tmp_path, monkeypatch):
    seg_run(tmp_path / "r", "sd15", "voc", done=5)
    (tmp_path / "r" / "maps" / "img_000" / "config.yaml").write_text("not: a run")  # would be a run
    runs = results.collect([tmp_path])
    assert [r.folder for r in runs] == [tmp_path / "r"]


# ------------------------------------------------------------------ LaTeX
def check_latex_structure(text: str) -> None:
    """booktabs table: environments nest, every row has as many cells as the column spec (counting
    \\multicolumn spans), rules in order, braces balance, no bare special characters in text."""
    body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("%"))
    envs = re.findall(r"\\(begin|end)\{(\w+)\}", body)
    stack = []
    for kind, name in envs:
        if kind == "begin":
            stack.append(name)
        else:
            assert stack.pop() == name
    assert not stack and [n for k, n in envs if k == "begin"] == ["table", "tabular"]
    depth = 0
    for ch in re.sub(r"\\[{}]", "", body):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        assert depth >= 0
    assert depth == 0
    spec = re.search(r"\\begin\{tabular\}\{([lrc]+)\}", body).group(1)
    tabular = body[body.index("\\begin{tabular}") : body.index("\\end{tabular}")]
    order = [m.group(0) for m in re.finditer(r"\\(toprule|midrule|bottomrule)", body)]
    assert order == ["\\toprule", "\\midrule", "\\bottomrule"]
    for row in tabular.split("\\\\")[:-1]:
        row = re.sub(
            r"\\(begin\{tabular\}\{\w+\}|toprule|midrule|cmidrule\(lr\)\{\d+-\d+\})", "", row
        ).strip()
        if not row:
            continue
        cells = re.split(r"(?<!\\)&", row)
        width = sum(int(m.group(1)) if (m := re.match(r"\s*\\multicolumn\{(\d+)\}", c)) else 1 for c in cells)
        assert width == len(spec), row
        for c in cells:  # specials only escaped or inside math
            plain = re.sub(r"\$[^$]*\$", "", c)
            assert not re.search(r"(?<!\\)[%#_&]", plain), c


def test_latex_compiles_or_is_well_formed(tmp_path):
    grid_of_runs(tmp_path / "runs")
    seg_run(tmp_path / "runs" / "odd_name" / "voc", "sd_1.5 & co", "voc", seed=3)
    report.write([tmp_path / "runs"], tmp_path / "out", quiet=True, sizes=True)
    text = (tmp_path / "out" / "segmentation.tex").read_text()
    check_latex_structure(text)
    assert "sd\\_1.5 \\& co" in text and "\\emph{missing}" in text and "\\emph{partial 3/10}" in text
    if shutil.which("pdflatex") is None:
        pytest.skip("no pdflatex here: checked structurally only")
    doc = tmp_path / "doc.tex"
    doc.write_text(
        "\\documentclass{article}\n\\usepackage{booktabs}\n\\usepackage[margin=1cm,landscape]{geometry}\n"
        f"\\begin{{document}}\n{text}\n\\end{{document}}\n"
    )
    done = subprocess.run(
        ["pdflatex", "-interaction=nonstopmode", "-halt-on-error", doc.name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-2000:]
    assert (tmp_path / "doc.pdf").stat().st_size > 1000


def test_structure_check_catches_a_broken_row(tmp_path):
    seg_run(tmp_path / "r", "sd15", "voc")
    report.write([tmp_path], tmp_path / "out", quiet=True)
    text = (tmp_path / "out" / "segmentation.tex").read_text()
    broken = text.replace(" \\\\\n\\bottomrule", " & 1.0 \\\\\n\\bottomrule")
    with pytest.raises(AssertionError):
        check_latex_structure(broken)
    with pytest.raises(AssertionError):
        check_latex_structure(text.replace("sd15", "sd_15"))


def test_tables_module_formats():
    assert tables.fmt_number(None, 1) == "-" and tables.fmt_number(float("nan"), 1) == "-"
    assert (
        tables.fmt_number(2.25, 1, signed=True) == "+2.2"
        and tables.fmt_number(-0.04, 1, signed=True) == "-0.0"
    )
    assert (
        tables.tex("a_b & 50% #1 {x} ~ ^") == r"a\_b \& 50\% \#1 \{x\} \textasciitilde{} \textasciicircum{}"
    )


def test_axes_of_one_task_leave_the_other_tasks_defaults(tmp_path):
    seg_run(tmp_path / "seg", "sd15", "voc")
    gen = tmp_path / "gen"
    gen.mkdir()
    conf = {"model": {"name": "sd15"}, "prompts": {"name": "ane"}, "strength": 1.2, "seed": 1, "steps": 50}
    OmegaConf.save(OmegaConf.create(conf), gen / "config.yaml")
    made = report.write([tmp_path], tmp_path / "out", columns=["split"], quiet=True)
    assert made["segment"].columns == ["split"] and made["generate"].columns == ["prompts"]
    assert [c.state for c in made["generate"].cells.values()] == ["partial"]  # no prompts.json yet
