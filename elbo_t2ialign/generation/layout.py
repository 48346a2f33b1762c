"""The run folder of a generation run: one place that knows every path.

Layout (``<run>`` is ``cfg.output_dir``)::

    <run>/
      config.yaml                 resolved config of the first launch (a resume must match it)
      run.json                    git revision, seed, model, prompt set, creation time
      launches.jsonl              one line per launch: time, argv, git revision, host
      generate.log                the runner's log
      identity.json               the model that made the images (weight digest or hub revision)
      .lock                       held by the running launch (pid, host, start time)
      prompts.json                [{"index", "prompt", "phrases"}] of the selected prompts
      images/elbo/<i>_<seed>.png  ELBO-weighted image of prompt <i> (5 digits) from noise <seed>
      images/baseline/<i>_<seed>.png   the unweighted image from the same noise
      weights/<i>_<seed>.json     {"index", "prompt", "seed", "phrases", "weights": [[w_p] per step],
                                   "distances": [[d_p] per ELBO step], "final_prompt": Compel syntax}
      clip_scores.json            evaluator: per variant overall and per prompt, and the delta
      clip_scores.md              evaluator: table with the delta
      grid.png                    evaluator: baseline beside weighted for a few prompts
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from elbo_t2ialign.cli import damaged
from elbo_t2ialign.runfolder import RunFolder, read_record

VARIANTS = ("elbo", "baseline")
PROMPTS_REMEDY = (
    "restore it; or, if the prompt file is unchanged since the images were made, delete it and rerun "
    "the generation command, which writes it again"
)
_NAME = re.compile(r"^(\d+)_(\d+)\.png$")


def image_stem(index: int, seed: int) -> str:
    return f"{index:05d}_{seed}"


def parse_image_name(name: str) -> tuple[int, int] | None:
    """File name "00012_4307.png" -> (12, 4307); None for other files."""
    m = _NAME.match(name)
    return (int(m.group(1)), int(m.group(2))) if m else None


class GenerationFolder(RunFolder):
    """Paths inside one generation run folder; creating it never removes anything."""

    log_name = "generate.log"

    def __init__(self, root: str | Path) -> None:
        super().__init__(root)
        self.prompts = self.root / "prompts.json"
        self.weights_dir = self.root / "weights"
        self.scores = self.root / "clip_scores.json"
        self.report = self.root / "clip_scores.md"
        self.grid = self.root / "grid.png"

    def image(self, variant: str, index: int, seed: int) -> Path:
        return self.root / "images" / variant / f"{image_stem(index, seed)}.png"

    def weights(self, index: int, seed: int) -> Path:
        return self.weights_dir / f"{image_stem(index, seed)}.json"

    def images(self, variant: str) -> dict[tuple[int, int], Path]:
        """(prompt index, seed) -> path of every finished image of a variant."""
        folder = self.root / "images" / variant
        if not folder.is_dir():
            return {}
        found = {key: p for p in folder.iterdir() if (key := parse_image_name(p.name)) is not None}
        return dict(sorted(found.items()))

    def read_prompts(self) -> dict[int, dict[str, Any]]:
        """prompts.json as {index: entry}; a damaged one raises `DamagedFileError` saying how to recover."""
        entries = read_record(self.prompts, list, PROMPTS_REMEDY)
        try:
            return {int(e["index"]): {**e, "prompt": str(e["prompt"])} for e in entries}
        except (KeyError, TypeError, ValueError) as err:
            raise damaged(
                self.prompts, f"an entry without index or prompt: {err!r}", PROMPTS_REMEDY
            ) from None
