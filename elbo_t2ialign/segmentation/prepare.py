"""Fetch the published data (`Matrix53/elbo-t2ialign`) into datasets/ and check its layout.

    python -m elbo_t2ialign.prepare_data                      # all five datasets + prompt sets
    python -m elbo_t2ialign.prepare_data --datasets voc coco  # some of them
    python -m elbo_t2ialign.prepare_data --archive dataset.tar.gz.*   # parts downloaded elsewhere
    python -m elbo_t2ialign.prepare_data --aep-prompts prompts.pkl    # AEP's per-image phrases
    python -m elbo_t2ialign.prepare_data --check-only         # no download, only the check

The hub repository holds split archive parts (`dataset.tar.gz.*`, members under
`datasets_copy/`); they are downloaded (resumable), checked against the hub's sha256,
and streamed into extraction of the requested datasets only (see `archive.py`).
Datasets already complete are not fetched again. The check opens every image and
mask of the split; for each incomplete dataset it says what is missing, empty or
unreadable, and writes the full list to `<datasets_dir>/missing_<dataset>.txt`.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from PIL import Image

from elbo_t2ialign.cli import cli_run, config_dir, debug_requested, storage_fault
from elbo_t2ialign.runfolder import RunLock, read_record, write_json_atomic, write_text_atomic, writing
from elbo_t2ialign.segmentation import archive
from elbo_t2ialign.segmentation.config import SegmentationError
from elbo_t2ialign.segmentation.datasets import BUILTIN, SegDataset
from elbo_t2ialign.segmentation.prompts import convert_aep_prompts

log = logging.getLogger(__name__)

REPO_ID = "Matrix53/elbo-t2ialign"
PROMPT_SETS = ("AnE.txt", "DVMP.txt", "ABC-6K.txt")  # generation prompts, one per line
PART = re.compile(r"(?:.*/)?dataset\.tar\.gz(?:\.\w+)?")  # dataset.tar.gz, dataset.tar.gz.00, ...
PARTS_DIR = ".archive"  # where downloaded parts are kept (delete it once prepared)


def dataset_config(name: str, datasets_dir: Path, split: str = "val") -> dict[str, Any]:
    """configs/dataset/<name>.yaml (./configs of the working directory first, as the entry points
    search) resolved against `datasets_dir`."""
    candidates = [Path("configs") / "dataset" / f"{name}.yaml", config_dir() / "dataset" / f"{name}.yaml"]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise SegmentationError(
            f"no dataset config {name}.yaml in {' or '.join(str(p.parent) for p in candidates)}"
        )
    root = OmegaConf.create({"datasets_dir": str(datasets_dir), "dataset": OmegaConf.load(path)})
    cfg = OmegaConf.to_container(root, resolve=True)["dataset"]  # type: ignore[index]
    cfg["split"] = split
    return cfg


FileProblem = tuple[Path, str]  # (path, "missing" | "empty" | "unreadable")


def file_problem(path: Path) -> str | None:
    """None when `path` is a non-empty file that PIL can open and verify."""
    try:
        if path.stat().st_size == 0:
            return "empty"
    except OSError:
        return "missing"
    try:
        with Image.open(path) as img:
            img.verify()  # reads the whole file structure without decoding the pixels
    except Exception:  # noqa: BLE001 -- PIL raises many kinds for damaged files
        return "unreadable"
    return None


def missing_files(dataset: SegDataset) -> list[FileProblem]:
    """Images and masks of the split that are missing, empty or cannot be opened."""
    paths = [p for n in dataset.images for p in (dataset.image_path(n), dataset.mask_path(n))]
    return [(p, why) for p in paths if (why := file_problem(p))]


def describe_missing(dataset: SegDataset, problems: list[FileProblem], listing: Path) -> str:
    image_paths = {dataset.image_path(n) for n in dataset.images}
    images = sum(p in image_paths for p, _ in problems)
    kinds = Counter(why for _, why in problems)
    what = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
    return (
        f"{dataset.name}: {images} image(s) and {len(problems) - images} mask(s) of {len(dataset.images)} "
        f"not usable ({what}; {dataset.split} split). They belong at {_where(dataset.image_template, dataset)} "
        f"and {_where(dataset.gt_template, dataset)}; e.g. {problems[0][0]} ({problems[0][1]}). "
        f"Full list: {listing}"
    )


def _where(template: str, dataset: SegDataset) -> str:
    return template.format(data_root=dataset.data_root, img_name="<image id>")


def dataset_roots(datasets_dir: Path, names: list[str]) -> dict[str, str]:
    """Dataset name -> its data_root relative to `datasets_dir` (the folder inside the archive)."""
    roots = {}
    for name in names:
        root = Path(dataset_config(name, datasets_dir)["data_root"])
        try:
            roots[name] = root.relative_to(datasets_dir).as_posix()
        except ValueError:
            raise SegmentationError(
                f"{name}: data_root {root} lies outside {datasets_dir}; set it under --dir to prepare it here"
            ) from None
    return roots


def incomplete(datasets_dir: Path, names: list[str], split: str) -> list[str]:
    """Datasets with at least one split file absent (a quick test; `check` opens every file)."""
    out = []
    for name in names:
        ds = SegDataset(dataset_config(name, datasets_dir, split))
        if any(not p.is_file() for n in ds.images for p in (ds.image_path(n), ds.mask_path(n))):
            out.append(name)
    return out


def wanted_roots(datasets_dir: Path, names: list[str], split: str, prompts: bool) -> list[str]:
    """Archive folders (and prompt files) still to fetch; complete datasets are not fetched again.

    A folder extracted by hand but not moved out of `datasets_copy/` yet is moved into place first.
    """
    unpacked = datasets_dir / archive.PREFIX
    prompt_files = list(PROMPT_SETS) if prompts else []
    for root in [*dataset_roots(datasets_dir, names).values(), *prompt_files]:
        moved = archive.move_into_place(unpacked / root, datasets_dir / root)
        if moved:
            print(f"moved {moved} file(s) of {root} out of {unpacked}")
    todo = incomplete(datasets_dir, names, split)
    for name in names:
        if name not in todo:
            print(f"in place {name}: every file of the {split} split is present (not fetched again)")
    files = [f for f in prompt_files if not (datasets_dir / f).is_file()]
    return list(dataset_roots(datasets_dir, todo).values()) + files


def report_extraction(result: archive.ExtractResult) -> None:
    for root in sorted(set(result.extracted) | set(result.kept)):
        print(
            f"extracted {root}: {result.extracted.get(root, 0)} new file(s), "
            f"{result.kept.get(root, 0)} already in place"
        )
    for line in result.refused:
        print(f"REFUSED unsafe archive member {line}", file=sys.stderr)


def extract_local(parts: list[Path], datasets_dir: Path, roots: list[str]) -> archive.ExtractResult:
    """--archive: parts downloaded elsewhere; their sha256 is recorded so a rerun detects changed parts."""
    absent = [str(p) for p in parts if not p.is_file()]
    if absent:
        raise SegmentationError(f"archive part(s) not found: {absent}")
    record = datasets_dir / "archive_sha256.json"
    remedy = "restore it, or delete it: the parts' digests are then recorded again from these parts"
    known = read_record(record, dict, remedy) if record.is_file() else {}
    hint = (
        f"the part differs from the one extracted earlier ({record}): use the same parts, or delete "
        "that record if the archive was replaced on purpose"
    )
    result = archive.extract_parts(parts, datasets_dir, roots, expected_sha256=known, hint=hint)
    write_json_atomic(record, {**known, **result.digests})
    return result


def download(datasets_dir: Path, roots: list[str], repo_id: str = REPO_ID) -> archive.ExtractResult | None:
    """List the hub repository; fetch its archive parts (or, without parts, its plain folders)."""
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download

    files = [
        f for f in HfApi().list_repo_tree(repo_id, repo_type="dataset", recursive=True) if hasattr(f, "size")
    ]
    parts = sorted((f for f in files if PART.fullmatch(f.path)), key=lambda f: f.path)
    if not parts:  # plain folders: fetch the requested ones directly
        present = [r for r in roots if any(archive.member_root(f.path, [r]) for f in files)]
        absent = sorted(set(roots) - set(present))
        if absent:
            print(f"{repo_id} holds neither archive parts nor {absent}", file=sys.stderr)
        if present:
            patterns = [r if r in PROMPT_SETS else f"{r}/**" for r in present]
            log.info("downloading %s (%s) into %s", repo_id, ", ".join(patterns), datasets_dir)
            snapshot_download(
                repo_id=repo_id, repo_type="dataset", local_dir=str(datasets_dir), allow_patterns=patterns
            )
        return None
    size = sum(f.size for f in parts) / 2**30
    log.info(
        "downloading %d archive part(s) of %s (%.1f GiB) into %s",
        len(parts),
        repo_id,
        size,
        datasets_dir / PARTS_DIR,
    )
    local = [
        Path(hf_hub_download(repo_id, f.path, repo_type="dataset", local_dir=str(datasets_dir / PARTS_DIR)))
        for f in parts
    ]
    expected = {Path(f.path).name: f.lfs.sha256 for f in parts if f.lfs is not None}
    return archive.extract_parts(
        local,
        datasets_dir,
        roots,
        expected_sha256=expected,
        hint="delete that part (a damaged download) and rerun",
    )


def check(datasets_dir: Path, names: list[str], split: str = "val") -> dict[str, list[FileProblem]]:
    """Unusable files per dataset (empty lists when complete); prints one line per dataset."""
    result = {}
    for name in names:
        dataset = SegDataset(dataset_config(name, datasets_dir, split))
        problems = missing_files(dataset)
        result[name] = problems
        if problems:
            listing = datasets_dir / f"missing_{name}.txt"
            datasets_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(listing, "".join(f"{p}\t{why}\n" for p, why in problems))
            print(f"MISSING {describe_missing(dataset, problems, listing)}")
        else:
            print(
                f"ok      {name}: {len(dataset.images)} images and masks under {dataset.data_root} (all open)"
            )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m elbo_t2ialign.prepare_data", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--datasets", nargs="+", default=list(BUILTIN), choices=list(BUILTIN))
    parser.add_argument("--dir", default="datasets", help="datasets_dir (default: ./datasets)")
    parser.add_argument("--split", default="val", help="split whose files are checked (default: val)")
    parser.add_argument("--repo", default=REPO_ID, help="Hugging Face dataset repository")
    parser.add_argument("--check-only", action="store_true", help="do not download, only check")
    parser.add_argument("--no-prompts", action="store_true", help="skip the generation prompt sets")
    parser.add_argument(
        "--archive",
        nargs="+",
        type=Path,
        metavar="PART",
        help="extract these archive parts (dataset.tar.gz.*) instead of downloading",
    )
    parser.add_argument(
        "--aep-prompts",
        type=Path,
        metavar="PKL",
        help="convert the reference's AEP prompts.pkl to <aep data_root>/phrases/<image>.json",
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of an expected error too")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    datasets_dir = Path(args.dir).expanduser().resolve()
    debug = debug_requested(["--debug"] if args.debug else [])[0]
    missing, code = cli_run(lambda: prepare(args, datasets_dir), (SegmentationError,), debug)
    if code:
        return code
    if any(missing.values()):
        print(
            "Some data is missing: rerun this command online, or put the files at the paths above "
            "(layout: datasets/README.md of the repository).",
            file=sys.stderr,
        )
        return 1
    return 0


def prepare(args: argparse.Namespace, datasets_dir: Path) -> dict[str, list[FileProblem]]:
    """Fetch or extract what is missing (unless --check-only), convert AEP prompts, then check. One
    process at a time per datasets folder (a lock in it), as two would extract into one staging folder."""
    if args.check_only and not args.aep_prompts:
        return check(datasets_dir, args.datasets, args.split)
    datasets_dir.mkdir(parents=True, exist_ok=True)
    hint = "wait for that prepare_data to finish, or give this one another --dir"
    with RunLock(datasets_dir / ".prepare.lock", SegmentationError, hint=hint), writing(datasets_dir):
        if not args.check_only:
            roots = wanted_roots(datasets_dir, args.datasets, args.split, prompts=not args.no_prompts)
            if args.archive and roots:
                report_extraction(extract_local(args.archive, datasets_dir, roots))
            elif roots:
                _download_reporting_failure(datasets_dir, roots, args.repo)
        if args.aep_prompts:
            aep_root = Path(dataset_config("aep", datasets_dir)["data_root"])
            written = convert_aep_prompts(
                args.aep_prompts,
                aep_root / "phrases",
                SegDataset(dataset_config("aep", datasets_dir)).class_names,
            )
            print(f"converted {args.aep_prompts}: {written} phrase file(s) in {aep_root / 'phrases'}")
        return check(datasets_dir, args.datasets, args.split)


def _download_reporting_failure(datasets_dir: Path, roots: list[str], repo_id: str) -> None:
    try:
        result = download(datasets_dir, roots, repo_id)
    except SegmentationError:
        raise
    except Exception as err:  # offline, no access, interrupted transfer: the check says what is missing
        if storage_fault(err):
            raise
        print(
            f"download from {repo_id} failed: {type(err).__name__}: {err} (rerun to resume)", file=sys.stderr
        )
        return
    if result is not None:
        report_extraction(result)
