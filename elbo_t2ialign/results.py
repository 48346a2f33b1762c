"""Run folders read back for the cross-run report: what each run is, how far it got, what it measured.

`collect(paths)` finds the segmentation and generation run folders under the given paths (a run folder
itself, or any folder searched for them; `maps/` and `images/` are never walked) and the cells a grid
planned (`grid.json`, written by `python -m elbo_t2ialign.grid`) that have no folder yet. Each becomes
a `Run`:

- `fields`: what the run records, by name: `model`, `dataset`, `split`, `prompt` (template, caption
  or phrases), `strength`, `seed`, `images` (how many the run is for), `threshold` (how the evaluator
  chose it: sweep, binary, or fixed and its value), `buckets` and `crf_unary` (evaluator options); generation runs `model`, `prompts`, `strength`, `seed`,
  `steps`, `images`, `clip`; and every key of its config.yaml by its dotted name (`elbo.gaussian_sigma`,
  `model.dtype`, `caption.model`, ...).
- `state`: done (every image finished and evaluated), unevaluated (every image finished, metrics
  missing or older than the images), partial (`done` of `expected` images), missing (planned, no folder).
- `variants`: per calibration variant its figures from metrics.json (mIoU, threshold, CRF, sizes), or
  the CLIP scores of clip_scores.json.

Reads only; `evaluate_pending` evaluates the segmentation runs that are finished but not evaluated.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from elbo_t2ialign.runfolder import IDENTITY_FILE, lock_held, read_json

log = logging.getLogger(__name__)

GRID_FILE = "grid.json"
SIZES = ("small", "medium", "large")
SKIP_DIRS = {"maps", "images", "weights", "plots", "skipped", "damaged", "report"}  # inside run folders


class ReportError(Exception):
    """A path or option the report cannot use; printed as one line."""


@dataclass
class Run:
    task: str  # "segment" | "generate"
    folder: Path | None  # None: planned by a grid, not started
    fields: dict[str, Any]
    state: str  # done | unevaluated | partial | missing
    done: int = 0  # images finished (both variants of a generation run counted)
    expected: int | None = None  # images the run is for (None: unknown)
    skipped: int = 0  # images that could not be read (segmentation)
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> figures
    labels: dict[str, str] = field(default_factory=dict)  # variant name -> setting ("strength 3")
    order: int = 0  # position in the grid / in the sorted folder list
    evaluated: int | None = None  # images the metrics were computed over (None: not evaluated)
    running: bool = False  # a live launch holds the folder's lock (runfolder.lock_held)

    def update_state(self) -> None:
        """done: every image finished (or skipped) and evaluated since; unevaluated: finished, no
        current metrics; partial: images left. A folder never started stays missing."""
        if self.state == "missing":
            return
        complete = self.expected is not None and self.done + self.skipped >= self.expected
        if complete and self.evaluated is not None and self.evaluated >= self.done:
            self.state = "done"
        else:
            self.state = "unevaluated" if complete else "partial"

    @property
    def name(self) -> str:
        return str(self.folder) if self.folder is not None else f"(planned) {self.fields.get('dir', '?')}"


# ------------------------------------------------------------------ finding run folders
def collect(paths: list[str | Path]) -> list[Run]:
    """Every run under `paths` and every planned grid cell without a folder, grid order first."""
    runs: dict[Path, Run] = {}
    planned: list[Run] = []
    for given in paths:
        path = Path(given).expanduser()
        if not path.exists():
            raise ReportError(f"{path} does not exist; give run folders or folders that hold them")
        for folder, grid in _walk(path):
            if grid is not None:
                planned += _planned(folder, grid)
                continue
            run = read_run(folder)
            if run is not None:
                runs.setdefault(folder.resolve(), run)
    ordered: list[Run] = []
    seen: set[Path] = set()
    for cell in planned:  # grid order; cells with a folder are read from it
        resolved = cell.folder.resolve() if cell.folder is not None else None
        if resolved is not None and resolved in seen:
            continue
        if resolved is not None and resolved in runs:
            run = runs[resolved]
            if cell.expected is not None:  # the grid's number of images (num_images may have grown since)
                run.expected = run.fields["images"] = cell.expected
                run.done = min(run.done, run.expected)
                run.update_state()
            ordered.append(run)
            seen.add(resolved)
        else:  # not started (or its folder unreadable, which read_run has logged)
            cell.folder = None
            ordered.append(cell)
    ordered += [runs[k] for k in sorted(runs) if k not in seen]
    for i, run in enumerate(ordered):
        run.order = i
    return ordered


def _walk(root: Path):
    """(folder, grid plan or None): run folders (config.yaml) and grid.json files under root."""
    if root.is_file():
        if root.name == GRID_FILE:
            yield root.parent, read_json(root)
            return
        raise ReportError(f"{root} is a file; give a run folder or a folder that holds run folders")
    for top, dirs, files in os.walk(root):
        here = Path(top)
        if GRID_FILE in files:
            yield here, _read_grid(here / GRID_FILE)
        if "config.yaml" in files:
            yield here, None
            dirs[:] = []  # a run folder: its maps/ may hold thousands of folders
            continue
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))


def _read_grid(path: Path) -> dict[str, Any]:
    try:
        data = read_json(path)
    except (OSError, ValueError) as err:
        raise ReportError(f"{path} is unreadable ({err}); rerun the grid command to write it") from None
    if not isinstance(data, dict) or not isinstance(data.get("cells"), list):
        raise ReportError(f"{path} is not a grid plan (no 'cells' list)")
    return data


def _planned(root: Path, grid: dict[str, Any]) -> list[Run]:
    out = []
    for cell in grid["cells"]:
        folder = Path(cell["dir"])
        folder = folder if folder.is_absolute() else root / folder
        out.append(
            Run(
                task=grid.get("task", "segment"),
                folder=folder,
                fields={**cell["fields"], "dir": cell["dir"]},
                state="missing",
                expected=cell.get("expected"),
                labels=dict(cell.get("labels") or {}),
            )
        )
    return out


def grid_defaults(paths: list[str | Path]) -> dict[str, Any]:
    """The `report` section of the first grid.json found under `paths` (its default axes)."""
    for given in paths:
        path = Path(given).expanduser()
        candidates = [path] if path.name == GRID_FILE else [path / GRID_FILE]
        for candidate in candidates:
            if candidate.is_file():
                return dict(_read_grid(candidate).get("report") or {})
    return {}


# ------------------------------------------------------------------ one run folder
def load_config(folder: Path) -> dict[str, Any] | None:
    from omegaconf import OmegaConf

    try:
        conf = OmegaConf.to_container(OmegaConf.load(folder / "config.yaml"), resolve=True)
    except Exception as err:  # noqa: BLE001  (YAML or OmegaConf error: a damaged file)
        log.warning("%s: config.yaml unreadable (%s); left out", folder, " ".join(str(err).split()))
        return None
    return conf if isinstance(conf, dict) else None


def read_run(folder: Path) -> Run | None:
    """The Run of a segmentation or generation folder; None (with a warning) for anything else."""
    conf = load_config(folder)
    if conf is None:
        return None
    if isinstance(conf.get("dataset"), dict) and isinstance(conf.get("elbo"), dict):
        return _segmentation(folder, conf)
    if isinstance(conf.get("prompts"), dict) and "strength" in conf:
        return _generation(folder, conf)
    log.warning("%s holds a config.yaml that is not of a segmentation or generation run; left out", folder)
    return None


def flatten(conf: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"elbo": {"strength": 3}} -> {"elbo.strength": 3}; lists become tuples (hashable)."""
    out: dict[str, Any] = {}
    for key, value in conf.items():
        if key == "hydra":
            continue
        if isinstance(value, dict):
            out |= flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = tuple(value) if isinstance(value, list) else value
    return out


def segmentation_fields(conf: dict[str, Any], expected: int | None) -> dict[str, Any]:
    """The named fields of a segmentation config (what a grid records for a cell not started)."""
    from elbo_t2ialign.segmentation.config import prompt_mode

    dataset = conf["dataset"]
    prompt = prompt_mode(dataset)
    if prompt == "template" and dataset.get("phrase_path"):
        prompt = "phrases"
    return {
        **flatten(conf),
        "model": conf["model"].get("name"),
        "dataset": dataset.get("name"),
        "split": dataset.get("split"),
        "prompt": prompt,
        "strength": conf["elbo"].get("strength", 3.0),
        "seed": conf.get("seed", 0),
        "images": expected,
    }


def _segmentation(folder: Path, conf: dict[str, Any]) -> Run:
    from elbo_t2ialign.segmentation.layout import SegmentationFolder

    seg = SegmentationFolder(folder)
    metrics = _read_optional(folder / "metrics.json")
    expected = metrics.get("num_expected") if metrics else _expected_images(folder, conf)
    finished = len(seg.finished_images())
    done = finished if expected is None else min(finished, expected)
    skipped = len([n for n in seg.skipped_images() if not seg.is_done(n)])
    fields = segmentation_fields(conf, expected)
    fields["threshold"] = _threshold_mode(metrics) if metrics else None
    fields["buckets"] = metrics.get("bucket_rule") if metrics else None  # size buckets: equal | fixed-size
    fields["crf_unary"] = metrics.get("crf_unary") if metrics else None
    variants, labels = {}, _variant_labels(folder, conf)
    if metrics:
        variants = _seg_variants(metrics)
        labels |= {v: r["setting"]["label"] for v, r in (metrics.get("variants") or {}).items()}
    run = Run("segment", folder, fields, "partial", done, expected, skipped, variants, labels)
    run.running = lock_held(folder)
    run.evaluated = metrics.get("num_images") if metrics else None
    run.update_state()
    return run


def _read_optional(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = read_json(path)
    except (OSError, ValueError) as err:
        log.warning("%s unreadable (%s); the run counts as not evaluated", path, err)
        return None
    return data if isinstance(data, dict) else None


def _expected_images(folder: Path, conf: dict[str, Any]) -> int | None:
    """Images of the run: its split's length (identity.json) limited by num_images."""
    identity = _read_optional(folder / IDENTITY_FILE) or {}
    total = (identity.get("dataset") or {}).get("num_images")
    limit = conf.get("num_images")
    if total is None:
        return None
    return total if limit in (None, "") else min(int(limit), int(total))


def _threshold_mode(metrics: dict[str, Any]) -> str:
    mode = metrics.get("threshold_mode", "sweep")
    if mode != "fixed":  # the sweep's exact best, or the reference's binary search
        return str(metrics.get("threshold_search", mode))
    first = next(iter((metrics.get("variants") or {"elbo": metrics.get("elbo") or {}}).values()), {})
    return f"fixed {first.get('threshold', float('nan')):.2f}"


def _variant_labels(folder: Path, conf: dict[str, Any]) -> dict[str, str]:
    """Variant -> its setting, from variants.json, else parsed from the config (runs not evaluated)."""
    recorded = _read_optional(folder / "variants.json") if (folder / "variants.json").is_file() else None
    if isinstance(recorded, list):
        return {e["name"]: e.get("label", e["name"]) for e in recorded if isinstance(e, dict) and "name" in e}
    return planned_labels(conf)


def planned_labels(conf: dict[str, Any]) -> dict[str, str]:
    """Variant -> setting that a segmentation config asks for (its `variants`, default elbo and baseline)."""
    from elbo_t2ialign.core.options import AlignOptions
    from elbo_t2ialign.segmentation.variants import parse_variants

    try:
        options = AlignOptions.from_mapping(conf.get("elbo"))
        return {v.name: v.label for v in parse_variants(conf.get("variants"), options)}
    except Exception:  # noqa: BLE001  (a config this version cannot parse: names only)
        return {str(v): str(v) for v in conf.get("variants") or ["baseline", "elbo"]}


def _seg_variants(metrics: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Variant -> {mIoU, threshold, crf, small, medium, large} from metrics.json."""
    results = metrics.get("variants") or {v: metrics[v] for v in ("elbo", "baseline") if v in metrics}
    sizes = {row["variant"]: row for row in metrics.get("ablation") or []}
    out = {}
    for name, result in results.items():
        row = sizes.get(name, {})
        out[name] = {
            "mIoU": result.get("mIoU"),
            "threshold": result.get("threshold"),
            "crf": (result.get("crf") or {}).get("mIoU"),
            **{s: row.get(s) for s in SIZES},
        }
    return out


def _generation(folder: Path, conf: dict[str, Any]) -> Run:
    from elbo_t2ialign.generation.layout import VARIANTS, GenerationFolder

    gen = GenerationFolder(folder)
    try:
        prompts = read_json(gen.prompts) if gen.prompts.is_file() else None
    except (OSError, ValueError):
        prompts = None  # the run rewrites it on resume
    variants_made = list(VARIANTS) if conf.get("baseline", True) else ["elbo"]
    per_variant = int(conf.get("images_per_prompt") or 1) * len(prompts) if prompts else None
    expected = per_variant * len(variants_made) if per_variant is not None else None
    done = sum(len(gen.images(v)) for v in variants_made)
    scores = _read_optional(gen.scores)
    fields = {
        **flatten(conf),
        "model": conf["model"].get("name"),
        "prompts": conf["prompts"].get("name"),
        "strength": conf.get("strength"),
        "seed": conf.get("seed"),
        "steps": conf.get("steps"),
        "images": expected,
        "clip": scores.get("clip_model") if scores else None,
    }
    variants = {}
    if scores:
        paired = scores.get("paired") or {}
        for v in VARIANTS:
            result = (scores.get("variants") or {}).get(v) or {}
            value = paired.get(v, result.get("clip_score"))
            variants[v] = {"clip": value, "num_images": result.get("num_images", 0)}
    labels = {"baseline": "unweighted", "elbo": f"ELBO weights, strength {conf.get('strength')}"}
    run = Run("generate", folder, fields, "partial", done, expected, 0, variants, labels)
    run.running = lock_held(folder)
    run.evaluated = sum(r.get("num_images", 0) for r in variants.values()) if scores else None
    run.update_state()
    return run


# ------------------------------------------------------------------ evaluation of finished runs
def evaluate_pending(runs: list[Run], **options: Any) -> list[Path]:
    """Evaluate every segmentation run that is finished but not (or no longer) evaluated; returns the
    folders evaluated. `options`: evaluate()'s (threshold, crf, overlays)."""
    from elbo_t2ialign.segmentation.evaluate import evaluate

    done = []
    for i, run in enumerate(runs):
        if run.task == "segment" and run.state == "unevaluated" and run.folder is not None:
            log.info("evaluating %s", run.folder)
            evaluate(run.folder, progress=False, **options)
            again = read_run(run.folder) or run
            again.order, again.expected, again.fields["images"] = run.order, run.expected, run.expected
            again.done = min(again.done, run.expected) if run.expected is not None else again.done
            again.update_state()
            runs[i] = again
            done.append(run.folder)
    return done
