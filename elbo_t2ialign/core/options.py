"""Method options with the method's defaults (sections 3-5).

One dataclass shared by the Python API, the runners and the YAML configs
(`configs/elbo/default.yaml` holds the same fields), so a default lives in
exactly one place. Every value is checked when the options are built: a bad
value fails here, with its name and what to give instead, never as a wrong
map or an error from deep inside torch.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, field, fields
from typing import Any

MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed accepts [0, 2**64)
PROMPT_OVERFLOW = ("split", "refuse", "truncate")


@dataclass
class AlignOptions:
    # -- ELBO score (method.md §3) --
    strength: float = 3.0  # tau_i = strength ** n_i; 1.0 disables the calibration
    fixed_temperature: bool = False  # tau_i = strength for every class (ablation)
    elbo_prompt: str = "a photo of {}"
    elbo_timesteps: list[int] = field(default_factory=lambda: list(range(1, 999, 50)))
    # -- attention collection (method.md §4) --
    collect_prompt: str = "a photo of {}"  # {} <- "c_1, c_2, ..., c_K"
    collect_timesteps: list[int] = field(default_factory=lambda: list(range(20, 201, 20)))
    # A class list whose collection prompt is longer than the text encoder's context: "split" the
    # classes, in their given order, over as few prompts as fit, as evenly as they fit (each class's
    # map from its own prompt's attention); "refuse" it (an error); "truncate" the prompt as the text
    # encoder would, the classes cut off get all-zero maps (a naive port; for comparison).
    prompt_overflow: str = "split"
    # At most this many classes per collection prompt (more: split as above, whatever the context);
    # None: as many as fit. For measuring what splitting changes, or a fixed competition per prompt.
    max_prompt_classes: int | None = None
    # Per-image phrases whose class word is not one of the phrase's words: "nouns" reads the
    # phrase's spaCy NOUN tokens (the reference), "phrase" averages all of the phrase's tokens.
    phrase_tokens: str = "nouns"
    spacy_model: str = "en_core_web_sm"
    # "plain": prompts (templates, class names, phrases, captions) are text. "compel": on SD1.x/SDXL,
    # Compel's weighting syntax in them ("(dog)1.2", "cat+", "cat-") takes effect and prompts are
    # encoded through Compel, as the reference encodes them; other families keep plain text.
    prompt_syntax: str = "plain"
    # -- aggregation (method.md §5) --
    gaussian_sigma: float = 3.0  # 0 switches to per-stage cross weights
    cross_stage_weights: list[float] = field(default_factory=lambda: [1, 1, 10, 15, 10, 1, 1])
    # self-attention refinement: "first_last" = finest stage of the down and up
    # paths ([1,0,0,0,0,0,1] for SD1.5); "last" = the up path's finest stage only.
    # An explicit per-stage list is accepted too.
    self_weights_1: Any = "first_last"
    self_weights_2: Any = "last"
    refine: bool = True
    # -- execution --
    batch_size: int = 8  # network samples per forward call; halves on out-of-memory
    seed: int = 0
    self_attention_chunk_mb: float = 256.0  # bound on one chunk of explicit self-attention
    # Captured attention probabilities: "float32" computes the scores, softmax and head mean of
    # the captured layers in float32 whatever the network's dtype; "model" keeps the network's
    # dtype there (what the reference's fp16 autocast path does; for fidelity measurements).
    capture_precision: str = "float32"

    def __post_init__(self) -> None:
        _check_number("strength", self.strength, positive=True)
        _check_bool("fixed_temperature", self.fixed_temperature)
        _check_bool("refine", self.refine)
        for name in ("elbo_prompt", "collect_prompt"):
            template = getattr(self, name)
            if not isinstance(template, str) or template.count("{}") != 1:
                raise ValueError(
                    f"{name} must be a string with exactly one '{{}}' for the class text, got {template!r}"
                )
        for name in ("elbo_timesteps", "collect_timesteps"):
            steps = getattr(self, name)
            if (
                isinstance(steps, (str, bytes))
                or not hasattr(steps, "__len__")
                or not len(steps)
                or not all(_is_int(t) and t >= 0 for t in steps)
            ):
                raise ValueError(
                    f"{name} must be a non-empty list of training timesteps (integers >= 0), got {steps!r}"
                )
        if self.prompt_syntax not in ("plain", "compel"):
            raise ValueError(f"prompt_syntax must be 'plain' or 'compel', got {self.prompt_syntax!r}")
        if self.prompt_overflow not in PROMPT_OVERFLOW:
            raise ValueError(
                f"prompt_overflow must be one of {list(PROMPT_OVERFLOW)}, got {self.prompt_overflow!r}"
            )
        if self.max_prompt_classes is not None and (
            not _is_int(self.max_prompt_classes) or self.max_prompt_classes < 1
        ):
            raise ValueError(
                f"max_prompt_classes must be an integer >= 1 or null, got {self.max_prompt_classes!r}"
            )
        if self.phrase_tokens not in ("nouns", "phrase"):
            raise ValueError(f"phrase_tokens must be 'nouns' or 'phrase', got {self.phrase_tokens!r}")
        _check_number("gaussian_sigma", self.gaussian_sigma, positive=False)
        _check_number("self_attention_chunk_mb", self.self_attention_chunk_mb, positive=True)
        if not _is_int(self.batch_size) or self.batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        if not _is_int(self.seed) or not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be an integer in [0, 2**64 - 1], got {self.seed!r}")
        if self.capture_precision not in ("float32", "model"):
            raise ValueError(
                f"capture_precision must be 'float32' or 'model', got {self.capture_precision!r}"
            )

    def replace(self, **changes: Any) -> AlignOptions:
        unknown = sorted(set(changes) - {f.name for f in fields(self)})
        if unknown:
            raise TypeError(
                f"unknown option(s) {unknown}; valid options are {[f.name for f in fields(self)]}"
            )
        return AlignOptions(**{**asdict(self), **changes})

    @classmethod
    def from_mapping(cls, values: dict[str, Any] | None) -> AlignOptions:
        return cls().replace(**dict(values or {}))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")


def _check_number(name: str, value: Any, positive: bool) -> None:
    """A finite real number; > 0 when `positive`, else >= 0."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value <= 0 if positive else value < 0):
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
