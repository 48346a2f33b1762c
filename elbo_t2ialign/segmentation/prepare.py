"""Fetch the published data (`Matrix53/elbo-t2ialign`) into datasets/ and check its layout.

    python -m elbo_t2ialign.prepare_data                      # all five datasets + prompt sets
    python -m elbo_t2ialign.prepare_data --datasets voc coco  # some of them
    python -m elbo_t2ialign.prepare_data --check-only         # no download, only the check

Offline or incomplete, it names each dataset with missing files, shows where
they should be, and writes the full list to `<datasets_dir>/missing_<dataset>.txt`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from .config import SegmentationError
from .datasets import BUILTIN, SegDataset

log = logging.getLogger(__name__)

REPO_ID = "Matrix53/elbo-t2ialign"
PROMPT_SETS = ("AnE.txt", "DVMP.txt", "ABC-6K.txt")  # generation prompts, one per line
PROJECT = Path(__file__).resolve().parents[2]
CONFIG_DIR = PROJECT / "configs" / "dataset"


def dataset_config(name: str, datasets_dir: Path, split: str = "val") -> dict[str, Any]:
    """configs/dataset/<name>.yaml resolved against `datasets_dir`."""
    path = CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        raise SegmentationError(f"no dataset config {path}")
    root = OmegaConf.create({"datasets_dir": str(datasets_dir), "dataset": OmegaConf.load(path)})
    cfg = OmegaConf.to_container(root, resolve=True)["dataset"]  # type: ignore[index]
    cfg["split"] = split
    return cfg


def missing_files(dataset: SegDataset) -> list[Path]:
    """Images and masks of the split that are not on disk."""
    paths = [p for n in dataset.images for p in (dataset.image_path(n), dataset.mask_path(n))]
    return [p for p in paths if not p.is_file()]


def describe_missing(dataset: SegDataset, missing: list[Path], listing: Path) -> str:
    image_paths = {dataset.image_path(n) for n in dataset.images}
    images = sum(p in image_paths for p in missing)
    return (f"{dataset.name}: {images} image(s) and {len(missing) - images} mask(s) of {len(dataset.images)} "
            f"missing ({dataset.split} split). They belong at {_where(dataset.image_template, dataset)} and "
            f"{_where(dataset.gt_template, dataset)}; e.g. {missing[0]}. Full list: {listing}")


def _where(template: str, dataset: SegDataset) -> str:
    return template.format(data_root=dataset.data_root, img_name="<image id>")


def download(datasets_dir: Path, names: list[str], repo_id: str = REPO_ID, prompts: bool = True) -> None:
    """snapshot_download of the selected datasets' folders (and the prompt sets) into `datasets_dir`."""
    from huggingface_hub import snapshot_download

    patterns = list(PROMPT_SETS) if prompts else []
    for name in names:
        root = Path(dataset_config(name, datasets_dir)["data_root"])
        patterns.append(f"{root.relative_to(datasets_dir).as_posix()}/**")
    log.info("downloading %s (%s) into %s", repo_id, ", ".join(patterns), datasets_dir)
    snapshot_download(repo_id=repo_id, repo_type="dataset", local_dir=str(datasets_dir), allow_patterns=patterns)


def check(datasets_dir: Path, names: list[str], split: str = "val") -> dict[str, list[Path]]:
    """Missing files per dataset (empty lists when complete); prints one line per dataset."""
    result = {}
    for name in names:
        dataset = SegDataset(dataset_config(name, datasets_dir, split))
        missing = missing_files(dataset)
        result[name] = missing
        if missing:
            listing = datasets_dir / f"missing_{name}.txt"
            datasets_dir.mkdir(parents=True, exist_ok=True)
            listing.write_text("\n".join(map(str, missing)) + "\n", encoding="utf-8")
            print(f"MISSING {describe_missing(dataset, missing, listing)}")
        else:
            print(f"ok      {name}: {len(dataset.images)} images and masks under {dataset.data_root}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m elbo_t2ialign.prepare_data", description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", nargs="+", default=list(BUILTIN), choices=list(BUILTIN))
    parser.add_argument("--dir", default="datasets", help="datasets_dir (default: ./datasets)")
    parser.add_argument("--split", default="val", help="split whose files are checked (default: val)")
    parser.add_argument("--repo", default=REPO_ID, help="Hugging Face dataset repository")
    parser.add_argument("--check-only", action="store_true", help="do not download, only check")
    parser.add_argument("--no-prompts", action="store_true", help="skip the generation prompt sets")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    datasets_dir = Path(args.dir).expanduser().resolve()
    if not args.check_only:
        try:
            download(datasets_dir, args.datasets, args.repo, prompts=not args.no_prompts)
        except Exception as err:  # offline, no access, interrupted transfer: the check below says what is missing
            print(f"download from {args.repo} failed: {type(err).__name__}: {err}", file=sys.stderr)
    try:
        missing = check(datasets_dir, args.datasets, args.split)
    except SegmentationError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if any(missing.values()):
        print("Some data is missing: rerun this command online, or put the files at the paths above "
              f"(layout: {PROJECT / 'datasets' / 'README.md'}).", file=sys.stderr)
        return 1
    return 0
