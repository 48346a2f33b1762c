"""Method options with PROTOCOL's defaults (sections 3-5).

One dataclass shared by the Python API, the runners and the YAML configs
(`configs/elbo/default.yaml` holds the same fields), so a default lives in
exactly one place.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass
class AlignOptions:
    # -- ELBO score (PROTOCOL 3) --
    strength: float = 3.0  # tau_i = strength ** n_i; 1.0 disables the calibration
    fixed_temperature: bool = False  # tau_i = strength for every class (ablation)
    elbo_prompt: str = "a photo of {}"
    elbo_timesteps: list[int] = field(default_factory=lambda: list(range(1, 999, 50)))
    # -- attention collection (PROTOCOL 4) --
    collect_prompt: str = "a photo of {}"  # {} <- "c_1, c_2, ..., c_K"
    collect_timesteps: list[int] = field(default_factory=lambda: list(range(20, 201, 20)))
    # -- aggregation (PROTOCOL 5) --
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
