"""Calibration variants of one segmentation run: every setting from one pass over the network.

Everything that differs between the paper's ablation settings happens after the forwards: tau is a
function of the per-class ELBO losses and each map is `refine(cross ** tau)` on one captured
attention (`elbo_t2ialign.core.aligner.Evidence`). So a run takes a list of variants (config key
`variants`) and writes each variant's maps beside the others, from one network pass per image.

Variant specs (a name is also the prefix of the variant's files, `<name>_<class id>.png`):

    baseline            strength 1: no calibration
    elbo                the configured setting: elbo.strength (and elbo.fixed_temperature)
    s<N> | strength=<N> ELBO calibration at strength N, e.g. s2, s2.5 (file prefix s<N>)
    fixed<N> | fixed=<N> fixed temperature tau = N for every class, no ELBO (file prefix fixed<N>)
    cross               the class's cross-attention map before the self-attention refinement,
                        calibrated at the configured setting (the reference's save_cross_att)
    cross_baseline      the same at strength 1

The refinement of the other variants follows `elbo.refine`. What a resume needs is in each
image's scores.json: the variants already written ("variants") and the summed ELBO losses
("elbo"); a variant added to a finished run needs the collection forwards again (the attention
is not stored) but never the ELBO forwards when the losses are there.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from elbo_t2ialign.cli import damaged
from elbo_t2ialign.core.options import AlignOptions
from elbo_t2ialign.runfolder import read_config, read_json, read_record, write_json_atomic
from elbo_t2ialign.segmentation.config import ConfigError
from elbo_t2ialign.segmentation.layout import VARIANTS, SegmentationFolder

DEFAULT = ["baseline", "elbo"]
SPEC_FORMS = "baseline, elbo, s<N> (or strength=<N>), fixed<N> (or fixed=<N>), cross, cross_baseline"
_NUMBERED = re.compile(r"^(s|strength=|fixed=?)([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)$")


@dataclass(frozen=True)
class Variant:
    """One calibration setting: tau from `strength` (ELBO or `fixed`), with or without refinement."""

    name: str
    strength: float
    fixed: bool = False
    refine: bool = True

    @property
    def needs_elbo(self) -> bool:
        return not self.fixed and self.strength != 1.0

    @property
    def key(self) -> tuple[float, bool, bool]:
        """Variants with equal keys have equal maps (strength 1 is the same with or without `fixed`)."""
        return (1.0, False, self.refine) if self.strength == 1.0 else (self.strength, self.fixed, self.refine)

    @property
    def label(self) -> str:
        tau = f"fixed tau {_number(self.strength)}" if self.fixed else f"strength {_number(self.strength)}"
        return tau if self.refine else f"{tau}, cross-attention (no refinement)"

    def setting(self) -> dict[str, Any]:
        """What variants.json records about this variant."""
        return {**{k: v for k, v in asdict(self).items() if k != "name"}, "label": self.label}

    def maps(self, evidence: Any) -> dict[str, np.ndarray]:
        return evidence.maps(self.strength, self.fixed, refine=self.refine)


def parse_variants(specs: Any, options: AlignOptions) -> list[Variant]:
    """The config's `variants` list -> Variants, in the given order (None: baseline and elbo)."""
    specs = DEFAULT if specs is None else specs
    if isinstance(specs, str) or not isinstance(specs, Sequence) or not specs:
        raise ConfigError(f"variants must be a non-empty list of variant names ({SPEC_FORMS}), got {specs!r}")
    out: list[Variant] = []
    for spec in specs:
        variant = _parse_one(str(spec).strip(), options)
        if any(v.name == variant.name for v in out):
            raise ConfigError(f"variant {variant.name!r} is listed twice in variants {list(specs)}")
        out.append(variant)
    return out


def _parse_one(spec: str, options: AlignOptions) -> Variant:
    configured = (float(options.strength), bool(options.fixed_temperature))
    named = {
        "baseline": (1.0, False, options.refine),
        "elbo": (*configured, options.refine),
        "cross": (*configured, False),
        "cross_baseline": (1.0, False, False),
    }
    if spec in named:
        return Variant(spec, *named[spec])
    match = _NUMBERED.match(spec)
    value = float(match.group(2)) if match else math.nan
    if not match or not math.isfinite(value) or value <= 0:
        raise ConfigError(
            f"unknown calibration variant {spec!r}; use one of {SPEC_FORMS} with N > 0 "
            "(e.g. variants=[baseline,elbo,s2,fixed3,cross])"
        )
    fixed = match.group(1).startswith("fixed")
    return Variant(f"{'fixed' if fixed else 's'}{_number(value)}", value, fixed, options.refine)


def _number(x: float) -> str:
    return f"{x:g}"


def record(folder: SegmentationFolder, variants: list[Variant]) -> dict[str, dict[str, Any]]:
    """Add this launch's variants to <run>/variants.json, a list of {"name", setting...} in the order
    they were first asked for; returns name -> setting of all recorded. A name recorded with
    another setting (impossible while the config check holds) is refused."""
    known = recorded(folder) if (folder.root / "variants.json").is_file() else {}
    for v in variants:
        if v.name in known and known[v.name] != v.setting():
            raise ConfigError(
                f"{folder.root / 'variants.json'} records variant {v.name!r} as {known[v.name]}, "
                f"this config makes it {v.setting()}; set output_dir=<new folder>"
            )
        known.setdefault(v.name, v.setting())
    write_json_atomic(folder.root / "variants.json", [{"name": k, **s} for k, s in known.items()])
    return known


def recorded(folder: SegmentationFolder, also: Sequence[str] = ()) -> dict[str, dict[str, Any]]:
    """Variant name -> setting of a run folder, in recorded order (folders older than
    variants.json: elbo and baseline); names in `also` that it lacks (written by a launch whose
    record was lost) are parsed again with the folder's config."""
    path = folder.root / "variants.json"
    if path.is_file():
        remedy = "delete it: it is rebuilt from config.yaml and the images' scores.json"
        entries = read_record(path, list, remedy)
        if not all(isinstance(e, dict) and isinstance(e.get("name"), str) for e in entries):
            raise damaged(path, "an entry without a name", remedy)
        out = {entry["name"]: {k: x for k, x in entry.items() if k != "name"} for entry in entries}
    else:
        out, also = {}, [*VARIANTS, *also]
    extra = [name for name in dict.fromkeys(also) if name not in out]
    if extra:
        conf = read_config(folder.config, resolve=True)
        options = AlignOptions.from_mapping(conf.get("elbo"))
        out |= {v.name: v.setting() for v in parse_variants(extra, options)}
    return out


def written(scores: Mapping[str, Any]) -> list[str]:
    """Variants an image's scores.json says are on disk (images written before the key: elbo, baseline)."""
    return list(scores.get("variants", VARIANTS))


@dataclass
class VariantMaps:
    """Maps of the requested variants of one image and what scores.json records with them."""

    maps: dict[str, dict[str, np.ndarray]]  # variant -> class -> (H, W) float32
    losses: dict[str, float] | None  # summed ELBO loss per class (computed or reused); None: none needed
    tau: dict[str, float | None]  # the configured setting's tau per class (None: no ELBO losses)
    elbo_from: str | None = None  # the run folder the losses were taken from
    collect_prompts: list[str] | None = None  # the collection prompt(s) of the image
    prompt_of: dict[str, int] | None = None  # class -> index of its collection prompt
    truncated: list[str] | None = None  # prompt_overflow=truncate: the classes cut off (zero maps)
    tokens: Any = None  # (P, R*R, L) text attention of every token (Evidence.tokens), if kept

    def scores(self) -> dict[str, Any]:
        """The scores.json fields of these maps (classes in map order)."""
        names = list(self.tau)
        out = {
            "elbo": {c: None if self.losses is None else float(self.losses[c]) for c in names},
            "tau": {c: None if self.tau[c] is None else float(self.tau[c]) for c in names},
            "variants": list(self.maps),
        }
        if self.collect_prompts:
            out |= {"collect_prompts": list(self.collect_prompts), "prompt_of": dict(self.prompt_of or {})}
        if self.truncated:
            out |= {"truncated": list(self.truncated)}
        return out | ({"elbo_from": self.elbo_from} if self.elbo_from else {})


class VariantPlan:
    """The variants of a run and where ELBO losses may come from; computes an image's missing maps."""

    def __init__(
        self, variants: list[Variant], options: AlignOptions, source: ElboSource | None = None
    ) -> None:
        self.variants, self.options, self.source = variants, options, source

    def missing(self, folder: SegmentationFolder, name: str) -> list[Variant]:
        """The variants image `name` still lacks (all of them when it is not finished)."""
        if not folder.is_done(name):
            return list(self.variants)
        return self._wanted(read_json(folder.image_dir(name) / "scores.json"))

    def _wanted(self, stored: Mapping[str, Any] | None) -> list[Variant]:
        have = set(written(stored)) if stored is not None else set()
        return [v for v in self.variants if v.name not in have]

    def compute(
        self,
        aligner: Any,
        image: Any,
        image_name: str,
        names: list[str],
        phrases: list[str] | None,
        seed: int,
        stored: Mapping[str, Any] | None = None,
        prompt: str | None = None,
    ) -> VariantMaps:
        """One network pass (`aligner.observe`), then every missing variant's maps; equal settings once.

        `stored`: the image's scores.json when it is finished (its variants are skipped, its ELBO
        losses reused). The ELBO forwards run only when a missing variant needs losses that neither
        scores.json nor `elbo_from` hold."""
        wanted = self._wanted(stored)
        if not names:
            return VariantMaps({v.name: {} for v in wanted}, None, {})
        losses, origin = (
            (stored_losses(stored), stored.get("elbo_from")) if stored is not None else (None, None)
        )
        need = len(names) > 1 and any(v.needs_elbo for v in wanted)
        if need and losses is None and self.source is not None:
            losses, origin = (
                self.source.losses(image_name, names, phrases, seed),
                str(self.source.folder.root),
            )
        evidence = aligner.observe(
            image, names, phrases, seed, prompt=prompt, need_elbo=need, elbo_losses=losses
        )
        done: dict[tuple[float, bool, bool], dict[str, np.ndarray]] = {}
        maps = {}
        for v in wanted:
            if v.key not in done:
                done[v.key] = v.maps(evidence)
            maps[v.name] = done[v.key]
        try:
            tau = evidence.temperatures(self.options.strength, self.options.fixed_temperature)
        except ValueError:  # no ELBO losses, and no variant needed them
            tau = dict.fromkeys(names)
        return VariantMaps(
            maps,
            evidence.losses,
            dict(tau),
            origin if losses is not None else None,
            list(getattr(evidence, "collect_prompts", None) or []),
            dict(getattr(evidence, "prompt_of", None) or {}),
            list(getattr(evidence, "truncated", None) or []),
            getattr(evidence, "tokens", None),
        )


def merged_scores(stored: Mapping[str, Any], added: VariantMaps) -> dict[str, Any]:
    """A finished image's scores.json after `added` maps were written beside its others."""
    new = added.scores()
    out = dict(stored) | {"variants": written(stored) + new["variants"]}
    if stored_losses(stored) is None and added.losses is not None:  # ELBO computed (or reused) just now
        out |= {k: new[k] for k in ("elbo", "tau")} | (
            {"elbo_from": added.elbo_from} if added.elbo_from else {}
        )
    for key in ("collect_prompts", "prompt_of"):  # folders written before the keys
        if key not in stored and key in new:
            out[key] = new[key]
    return out


def stored_losses(scores: Mapping[str, Any]) -> dict[str, float] | None:
    """The ELBO losses in a scores.json, None when any class has none."""
    values = scores.get("elbo") or {}
    if not scores.get("classes") or any(values.get(c) is None for c in scores["classes"]):
        return None
    return {c: float(values[c]) for c in scores["classes"]}


# Config values that decide the ELBO losses of an image (besides its classes, phrases and seed).
_ELBO_KEYS = (("model", "id"), ("model", "dtype"), ("elbo", "elbo_prompt"), ("elbo", "elbo_timesteps"))


class ElboSource:
    """Per-image ELBO losses of an earlier run folder (`elbo_from=<run folder>`, the reference's
    `elbo_path`), checked against this run: same model and ELBO options, and per image the same
    classes, phrases and seed; anything else is an error that names it."""

    def __init__(self, path: str | Path, conf: Mapping[str, Any]) -> None:
        self.folder = SegmentationFolder(Path(path).expanduser())
        if not self.folder.config.is_file():
            raise ConfigError(
                f"elbo_from={path} is not a segmentation run folder (no config.yaml); "
                "give the output_dir of a finished run"
            )
        theirs = read_config(self.folder.config, resolve=True, remedy=f"restore it, or drop elbo_from={path}")
        diffs = [".".join(k) for k in _ELBO_KEYS if _elbo_value(theirs, k) != _elbo_value(conf, k)]
        if diffs:
            raise ConfigError(
                f"elbo_from={path} computed its ELBO losses with other {', '.join(diffs)} "
                "than this run; reuse a run made with the same values"
            )

    def check_images(self, names: list[str]) -> None:
        """Every image this run will compute must be finished in the source folder."""
        absent = [n for n in names if not self.folder.is_done(n)]
        if absent:
            raise ConfigError(
                f"elbo_from={self.folder.root} has no finished image {absent[0]!r}"
                f"{f' (nor {len(absent) - 1} more)' if len(absent) > 1 else ''}; "
                "finish that run first or drop elbo_from"
            )

    def losses(self, image: str, names: list[str], phrases: list[str] | None, seed: int) -> dict[str, float]:
        self.check_images([image])
        scores = read_record(
            self.folder.image_dir(image) / "scores.json",
            dict,
            f"rerun the segmentation of {self.folder.root} (it recomputes damaged images), or drop elbo_from",
        )
        where = f"elbo_from={self.folder.root}, image {image!r}"
        if list(scores["classes"]) != list(names):
            raise ConfigError(
                f"{where}: classes {scores['classes']} differ from this run's {names}; "
                "reuse a run over the same dataset and labels"
            )
        if scores.get("phrases") != phrases or scores.get("seed") != seed:
            raise ConfigError(
                f"{where}: phrases {scores.get('phrases')} / seed {scores.get('seed')} differ from "
                f"this run's {phrases} / {seed}; reuse a run with the same phrases, seed and split"
            )
        losses = stored_losses(scores)
        if losses is None:
            raise ConfigError(
                f"{where}: no ELBO losses stored (that run needed none: strength 1 or fixed "
                "temperature only); drop elbo_from"
            )
        return losses


def _elbo_value(conf: Mapping[str, Any], key: tuple[str, ...]) -> Any:
    if key[0] == "elbo":
        return AlignOptions.from_mapping(conf.get("elbo")).to_dict()[key[1]]
    value: Any = conf
    for part in key:
        value = value.get(part) if isinstance(value, Mapping) else None
    return "auto" if key == ("model", "dtype") and value is None else value
