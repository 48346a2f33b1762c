"""Every call the app makes to a model, in one place (the page code never touches a network).

`ModelSession` loads the configured model on first use, runs one computation at a time (a lock, on
top of the page's queue), and counts the denoiser's forward passes, so the page can show that
moving a slider recomputes maps from the stored `Evidence` without one. What it calls is the public
API: `Aligner.observe` for the network passes of one image, `Evidence.maps`/`temperatures` for any
setting afterwards, and the generation sampler (`ElboSampler`) on the same loaded pipeline.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from PIL import Image

from elbo_t2ialign.core.aligner import Evidence, HeatmapResult
from elbo_t2ialign.core.nlp import PhraseError
from elbo_t2ialign.core.options import AlignOptions
from elbo_t2ialign.explain import ExplainError

Progress = Callable[[float, str], None]
# what a model call raises on bad input or an unusable model or setting: shown on the page as one line
EXPECTED = (TypeError, ValueError, OSError, ExplainError, PhraseError)


def _no_progress(fraction: float, desc: str) -> None:
    pass


@dataclass
class Settings:
    """The map settings the stored evidence can be redrawn at."""

    strength: float = 3.0
    fixed: bool = False  # tau = strength for every word instead of the ELBO's
    refine: bool = True  # the self-attention refinement


def result_at(evidence: Evidence, settings: Settings) -> HeatmapResult:
    """The maps of one observed image at `settings`, from the evidence alone (no network pass)."""
    elbo_maps = evidence.maps(settings.strength, settings.fixed, refine=settings.refine)
    losses = evidence.losses or {}
    return HeatmapResult(
        elbo_maps,
        evidence.maps(1.0, refine=settings.refine),
        evidence.maps(1.0, refine=False),
        {n: losses.get(n) for n in evidence.names},
        evidence.temperatures(settings.strength, settings.fixed),
        evidence.prompts,
        evidence.token_positions,
        evidence,
    )


class ModelSession:
    """One model for the app: loaded on first use from a composed explain config (model, elbo, device)."""

    def __init__(self, conf: dict[str, Any], aligner: Any = None):
        self.conf = conf
        self.options = AlignOptions.from_mapping(conf.get("elbo"))
        self.name = str((conf.get("model") or {}).get("name") or (conf.get("model") or {}).get("id"))
        self._aligner = aligner
        self._lock = threading.Lock()
        self._sampler: tuple[tuple, Any] | None = None
        self._extractor = None
        self.forwards = 0  # denoiser forward passes since the model was loaded
        if aligner is not None:
            self._count_forwards()

    # ------------------------------------------------------------ loading
    @property
    def loaded(self) -> bool:
        return self._aligner is not None

    def aligner(self, progress: Progress = _no_progress):
        if self._aligner is None:
            from elbo_t2ialign.explain import load_aligner

            progress(0.0, f"loading model {self.name}")
            self._aligner = load_aligner(self.conf, self.options)
            self._count_forwards()
        return self._aligner

    def _count_forwards(self) -> None:
        def count(module, args, output):
            self.forwards += 1

        self._aligner.adapter.denoiser.register_forward_hook(count)

    # ------------------------------------------------------------ one image
    def observe(
        self,
        image: Image.Image,
        words: list[str],
        prompt: str | None = None,
        progress: Progress = _no_progress,
    ) -> Evidence:
        """The network passes of one image (the ELBO forwards included whenever there are two
        words or more, so every strength can be drawn from it afterwards)."""
        with self._lock:
            aligner = self.aligner(progress)
            progress(0.3, "ELBO and attention passes")
            return aligner.observe(
                image, words, prompt=prompt, options=self.options, need_elbo=len(words) > 1
            )

    def caption_prompt(self, image: Image.Image, words: list[str], progress: Progress = _no_progress):
        """(caption, from the cache, prompt, appended words): the image's caption by the configured
        captioner (configs/explain.yaml `caption`, cached), with the words it lacks appended."""
        from elbo_t2ialign.explain import caption_prompt

        with self._lock:
            progress(0.1, "captioning the image")
            return caption_prompt(self.conf, image, words)

    # ------------------------------------------------------------ generation
    def phrases(self, prompt: str) -> list[str]:
        """The prompt's noun phrases, as the generation runner extracts them (spaCy, default stop-list)."""
        from elbo_t2ialign.cli import config_dir
        from elbo_t2ialign.generation.phrases import PhraseExtractor, load_stopwords

        if self._extractor is None:
            import yaml

            path = config_dir() / "phrases" / "default.yaml"
            spacy_model = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get(
                "spacy_model", "en_core_web_sm"
            )
            self._extractor = PhraseExtractor.from_config(spacy_model, load_stopwords(path))
        return self._extractor(prompt)

    def generate(
        self,
        prompt: str,
        phrases: list[str],
        seed: int,
        steps: int,
        strength: float,
        progress: Progress = _no_progress,
    ) -> tuple[Any, Any]:
        """(weighted, baseline) `SampleResult`s of `prompt` from the same noise `seed`."""
        from elbo_t2ialign.generation.sampler import ElboSampler

        with self._lock:
            aligner = self.aligner(progress)
            key = (int(steps), float(strength))
            if self._sampler is None or self._sampler[0] != key:
                self._sampler = (
                    key,
                    ElboSampler(aligner.adapter, steps=int(steps), strength=float(strength)),
                )
            sampler = self._sampler[1]
            progress(0.2, f"ELBO-weighted image ({steps} steps)")
            weighted = sampler.sample(prompt, phrases, int(seed), weighted=True)
            progress(0.6, f"baseline image ({steps} steps)")
            baseline = sampler.sample(prompt, phrases, int(seed), weighted=False)
            return weighted, baseline
