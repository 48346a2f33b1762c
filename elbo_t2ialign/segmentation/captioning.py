"""Caption prompts of a segmentation run (`dataset.prompt=caption`).

Before any network pass, the runner captions the images of its shard that have no caption yet
(BLIP or a chat endpoint, `elbo_t2ialign/captions.py`, through the shared caption cache) and records
them in the run folder's `captions.json`; the captioner is then released and the diffusion model
loaded. An image's collection prompt is its caption with the class words it lacks appended
(`captions.fit_words`), and its scores.json keeps that prompt, so a resumed run, a variant added
later or a copy of the folder on another machine needs no captioner.

    captions.json   {"captioner": settings of the captioner, "captions": {image name: caption}}

Shards of one run add to the same file under a lock (`.captions.lock`), each merging what is there.
"""

from __future__ import annotations

import fcntl
import logging
from pathlib import Path
from typing import Any

from tqdm import tqdm

from elbo_t2ialign.runfolder import read_json, write_json_atomic
from elbo_t2ialign.segmentation.config import ConfigError, InputError
from elbo_t2ialign.segmentation.datasets import SegDataset

log = logging.getLogger(__name__)

SAVE_EVERY = 50  # captions written to the run folder every this many images (a kill loses fewer)


class RunCaptions:
    """The captions recorded in one run folder."""

    def __init__(self, root: str | Path) -> None:
        self.path = Path(root) / "captions.json"
        self.lock = Path(root) / ".captions.lock"

    def load(self) -> dict[str, Any]:
        if not self.path.is_file():
            return {"captioner": None, "captions": {}}
        try:
            data = read_json(self.path)
        except (OSError, ValueError) as err:
            raise ConfigError(
                f"{self.path} is unreadable ({err}); restore it, or move it away to caption again"
            ) from None
        if not isinstance(data, dict) or not isinstance(data.get("captions"), dict):
            raise ConfigError(f"{self.path} does not hold {{'captioner', 'captions'}}; move it away")
        return data

    def add(self, settings: dict[str, Any], new: dict[str, str]) -> None:
        """Merge `new` captions into the file (under the lock: other shards write it too)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.lock, "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            data = self.load()
            if data["captioner"] not in (None, settings):
                log.warning(
                    "%s was started with the captioner %s; adding captions of %s",
                    self.path,
                    data["captioner"],
                    settings,
                )
            data["captioner"] = data["captioner"] or settings
            data["captions"] = {**data["captions"], **new}
            write_json_atomic(self.path, data)


def ensure_captions(
    root: Path, dataset: SegDataset, conf: dict[str, Any], names: list[str], device: str
) -> dict[str, str]:
    """The caption of every image in `names`: recorded in the run folder, else computed (the captioner
    is loaded only then) and recorded. Images that cannot be read get none (the runner skips them)."""
    from elbo_t2ialign import captions

    record = RunCaptions(root)
    known = record.load()["captions"]
    need = [n for n in names if n not in known]
    if not need:
        return {n: known[n] for n in names}
    try:
        captioner, cache = captions.from_config(conf.get("caption") or {}, device)
    except captions.CaptionError as err:
        raise ConfigError(f"dataset.prompt=caption: {err}") from None
    new: dict[str, str] = {}
    for k, name in enumerate(tqdm(need, desc="caption", unit="img", disable=not conf.get("progress", True))):
        try:
            image = dataset.load_image(name)
        except InputError:
            continue  # the image loop reports it (skipped/ or on_error=stop)
        try:
            new[name] = cache.caption(image, captioner)
        except captions.CaptionError as err:
            record.add(captioner.settings, new)  # what is captioned so far is kept
            raise ConfigError(f"captioning {name}: {err}") from None
        if (k + 1) % SAVE_EVERY == 0:
            record.add(captioner.settings, new)
    record.add(captioner.settings, new)
    log.info(
        "captioned %d image(s) (%d from the cache %s) -> %s",
        len(new),
        cache.hits,
        cache.path,
        record.path,
    )
    del captioner
    known = {**known, **new}
    return {n: known[n] for n in names if n in known}
