"""prepare_data: the published split archive, the file check, AEP prompts, and the whole path a new user takes."""

import hashlib
import io
import json
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from elbo_t2ialign.cli import config_dir
from elbo_t2ialign.segmentation import archive, prepare
from elbo_t2ialign.segmentation.config import InputError, SegmentationError
from elbo_t2ialign.segmentation.datasets import SegDataset
from elbo_t2ialign.segmentation.prompts import convert_aep_prompts, read_prompts

SPLIT = "val_10_car"  # 10 VOC images of the built-in metadata: the archive below holds exactly these
VOC = "VOCdevkit/VOC2012"
ESCAPE = "datasets_copy/../../escaped.txt"  # the malicious member


def voc_files(names, seed=0):
    """Relative path -> bytes: VOC-style JPEGs and palette PNG masks (class 7 = car, 255 borders)."""
    rng = np.random.default_rng(seed)
    files = {}
    for name in names:
        h, w = rng.integers(20, 33, 2)
        jpg = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(jpg, "JPEG")
        mask = np.zeros((h, w), np.uint8)
        mask[4 : h - 4, 3 : w // 2] = 7
        mask[[0, -1], :] = 255
        mask[:, [0, -1]] = 255
        png = Image.fromarray(mask, "P")
        png.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
        buf = io.BytesIO()
        png.save(buf, "PNG")
        files[f"{VOC}/JPEGImages/{name}.jpg"] = jpg.getvalue()
        files[f"{VOC}/SegmentationClassAug/{name}.png"] = buf.getvalue()
    return files


def build_parts(folder, files, n_parts=3, malicious=True):
    """A .tar.gz in the published layout (members under datasets_copy/), cut into n_parts files."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz") as tar:
        members = [(f"datasets_copy/{k}", v) for k, v in files.items()]
        members.insert(1, ("datasets_copy/ade/other.txt", b"not requested"))
        if malicious:
            members.insert(3, (ESCAPE, b"owned"))
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    blob = raw.getvalue()
    folder.mkdir(parents=True, exist_ok=True)
    cuts = np.linspace(0, len(blob), n_parts + 1).astype(int)
    parts = []
    for i in range(n_parts):
        parts.append(folder / f"dataset.tar.gz.{i:02d}")
        parts[-1].write_bytes(blob[cuts[i] : cuts[i + 1]])
    return parts


@pytest.fixture
def names():
    return SegDataset({"name": "voc", "data_root": "/nonexistent", "split": SPLIT}).images


def test_parts_are_streamed_in_name_order_and_unsafe_members_refused(tmp_path, names):
    files = voc_files(names)
    parts = build_parts(tmp_path / "dl", files)
    target = tmp_path / "work" / "datasets"
    result = archive.extract_parts(parts[::-1], target, [VOC])  # given out of order: sorted by name
    for rel, data in files.items():
        assert (target / rel).read_bytes() == data
    assert result.extracted == {VOC: len(files)}
    assert len(result.refused) == 1 and result.refused[0].startswith(ESCAPE)
    assert not list(tmp_path.rglob("escaped.txt"))
    assert not (target / "ade").exists()  # not requested
    assert not (target / archive.PARTIAL).exists()
    assert result.digests == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in parts}


def test_interrupted_extraction_resumes(tmp_path, names):
    files = voc_files(names)
    parts = build_parts(tmp_path / "dl", files, malicious=False)
    target = tmp_path / "datasets"
    first = next(iter(files))
    staged = target / archive.PARTIAL / first  # a kill during the first member's write
    staged.parent.mkdir(parents=True)
    staged.write_bytes(files[first][:10])
    result = archive.extract_parts(parts, target, [VOC])
    assert (target / first).read_bytes() == files[first]
    assert result.extracted == {VOC: len(files)} and not result.kept
    again = archive.extract_parts(parts, target, [VOC])  # a rerun keeps everything
    assert again.extracted == {VOC: 0} and again.kept == {VOC: len(files)}


def test_checksum_mismatch_moves_nothing_into_place(tmp_path, names):
    parts = build_parts(tmp_path / "dl", voc_files(names))
    target = tmp_path / "datasets"
    with pytest.raises(
        SegmentationError, match=r"dataset.tar.gz.01: sha256 .* differs .* delete that file and rerun"
    ):
        archive.extract_parts(parts, target, [VOC], expected_sha256={"dataset.tar.gz.01": "0" * 64})
    assert not (target / VOC).exists()


def test_missing_part_is_named(tmp_path, names, capsys):
    parts = build_parts(tmp_path / "dl", voc_files(names))
    rc = prepare.main(
        [
            "--datasets",
            "voc",
            "--split",
            SPLIT,
            "--dir",
            str(tmp_path / "d"),
            "--no-prompts",
            "--archive",
            str(parts[0]),
            str(parts[2]),
        ]
    )
    assert rc == 2
    assert "not one complete .tar.gz" in capsys.readouterr().err


def test_check_only_reports_empty_and_unreadable_files(tmp_path, names, capsys):
    target = tmp_path / "datasets"
    for rel, data in voc_files(names).items():
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        (target / rel).write_bytes(data)
    argv = ["--datasets", "voc", "--split", SPLIT, "--dir", str(target), "--check-only"]
    assert prepare.main(argv) == 0
    assert "ok      voc: 10 images" in capsys.readouterr().out
    (target / VOC / "JPEGImages" / f"{names[0]}.jpg").write_bytes(b"")
    (target / VOC / "SegmentationClassAug" / f"{names[1]}.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (target / VOC / "SegmentationClassAug" / f"{names[2]}.png").unlink()
    assert prepare.main(argv) == 1
    out = capsys.readouterr().out
    assert "voc: 1 image(s) and 2 mask(s) of 10 not usable (1 empty, 1 missing, 1 unreadable" in out
    listed = (target / "missing_voc.txt").read_text().splitlines()
    assert sorted(line.split("\t")[1] for line in listed) == ["empty", "missing", "unreadable"]


def test_local_parts_digest_is_recorded_and_checked_on_rerun(tmp_path, names, capsys):
    parts = build_parts(tmp_path / "dl", voc_files(names))
    target = tmp_path / "datasets"
    argv = [
        "--datasets",
        "voc",
        "--split",
        SPLIT,
        "--dir",
        str(target),
        "--no-prompts",
        "--archive",
        *map(str, parts),
    ]
    assert prepare.main(argv) == 0
    recorded = json.loads((target / "archive_sha256.json").read_text())
    assert recorded == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in parts}
    (target / VOC / "JPEGImages" / f"{names[0]}.jpg").unlink()
    parts[1].write_bytes(parts[1].read_bytes()[::-1])  # the part changed since the first run
    assert prepare.main(argv) == 2
    assert "dataset.tar.gz.01: sha256" in capsys.readouterr().err
    assert not (target / archive.PARTIAL).exists()  # nothing staged from the damaged part survives


# -- AEP prompts --

AEP_CLASSES = SegDataset({"name": "aep", "data_root": "/nonexistent"}).class_names


def test_aep_prompts_become_phrase_files(tmp_path):
    a, b = AEP_CLASSES[0], AEP_CLASSES[5]
    prompts = {
        "img_1": {"subject": [a, b, a], "phrase": [f"a red {a}", f"two {b}s", f"another {a}"]},
        "img_2": {"subject": [b], "phrase": [f"a {b} on grass"]},
    }
    path = tmp_path / "prompts.pkl"
    path.write_bytes(pickle.dumps(prompts))
    assert convert_aep_prompts(path, tmp_path / "phrases", AEP_CLASSES) == 2
    assert (
        json.loads((tmp_path / "phrases" / "img_1.json").read_text()) == prompts["img_1"]
    )  # as is, in order
    assert json.loads((tmp_path / "phrases" / "img_2.json").read_text()) == prompts["img_2"]
    # the dataset reads them, in the order of the image's class ids
    data = tmp_path / "aep"
    (data / "phrases").mkdir(parents=True)
    shutil.copy(tmp_path / "phrases" / "img_1.json", data / "phrases")
    ds = SegDataset(
        {"name": "aep", "data_root": str(data), "phrase_path": "{data_root}/phrases/{img_name}.json"}
    )
    # a class takes its first subject's phrase (the reference's subject.index); all phrases in file order
    assert ds.phrases_for("img_1", [6, 1]) == ([f"two {b}s", f"a red {a}"], "phrase_file")
    assert ds.phrase_lists("img_1") == (prompts["img_1"]["subject"], prompts["img_1"]["phrase"])


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (pickle.dumps({"x": Evil()}), r"refused to load builtins.print"),
        (pickle.dumps({"x": {"subject": ["cat"], "phrase": ("a cat",)}}), r"entry 'x' is not"),
        (pickle.dumps({"x": {"subject": ["cat", "dog"], "phrase": ["a cat"]}}), "one phrase per subject"),
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:00\n", "Git LFS pointer"),
        (b"garbage", "not a plain prompts pickle"),
    ],
)
def test_restricted_unpickler_refuses_anything_else(tmp_path, payload, message, capsys):
    path = tmp_path / "prompts.pkl"
    path.write_bytes(payload)
    with pytest.raises(InputError, match=message):
        read_prompts(path)
    assert "pwned" not in capsys.readouterr().out


def test_unknown_subject_is_refused(tmp_path):
    path = tmp_path / "prompts.pkl"
    path.write_bytes(pickle.dumps({"x": {"subject": ["unicorn"], "phrase": ["a unicorn"]}}))
    with pytest.raises(InputError, match=r"\['unicorn'\] that are not AEP classes"):
        convert_aep_prompts(path, tmp_path / "phrases", AEP_CLASSES)
    assert not (tmp_path / "phrases").exists()


def test_aep_config_reads_phrase_files_by_default(tmp_path):
    cfg = prepare.dataset_config("aep", tmp_path)
    assert cfg["phrase_path"] == "{data_root}/phrases/{img_name}.json"
    assert cfg["data_root"] == str(tmp_path / "aep")


# -- rehearsal: the path a new user takes, hub mocked --


def test_rehearsal_hub_archive_to_segment_to_evaluate(tmp_path, names, monkeypatch, capsys):
    import huggingface_hub
    from huggingface_hub.hf_api import RepoFile
    from hydra import compose, initialize_config_dir

    from elbo_t2ialign.segmentation import evaluate, run

    files = voc_files(names)
    hub = tmp_path / "hub"
    parts = build_parts(hub, files)
    listing = [
        RepoFile(
            path=p.name,
            size=p.stat().st_size,
            oid="x",
            lfs={
                "size": p.stat().st_size,
                "oid": hashlib.sha256(p.read_bytes()).hexdigest(),
                "pointerSize": 130,
            },
        )
        for p in parts
    ]
    listing.append(RepoFile(path=".gitattributes", size=10, oid="y"))
    downloads = []

    def list_repo_tree(self, repo_id, path_in_repo=None, *, recursive=False, repo_type=None, **kw):
        assert (repo_id, repo_type, recursive) == (prepare.REPO_ID, "dataset", True)
        return iter(listing)

    def hf_hub_download(repo_id, filename, *, repo_type=None, local_dir=None, **kw):
        downloads.append(filename)
        dest = Path(local_dir) / filename
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(hub / filename, dest)
        return str(dest)

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_tree", list_repo_tree)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    datasets = tmp_path / "datasets"
    argv = ["--datasets", "voc", "--split", SPLIT, "--dir", str(datasets), "--no-prompts"]
    assert prepare.main(argv) == 0
    captured = capsys.readouterr()
    assert downloads == [p.name for p in parts]
    assert f"extracted {VOC}: {len(files)} new file(s)" in captured.out
    assert "ok      voc: 10 images and masks" in captured.out
    assert f"REFUSED unsafe archive member {ESCAPE}" in captured.err
    assert not list(tmp_path.rglob("escaped.txt"))
    for rel, data in files.items():
        assert (datasets / rel).read_bytes() == data
    assert prepare.main(argv) == 0  # a rerun fetches nothing
    assert downloads == [p.name for p in parts] and "in place voc" in capsys.readouterr().out

    overrides = [
        "model=shapes",
        "dataset=voc",
        "elbo=shapes",
        f"dataset.split={SPLIT}",
        f"datasets_dir={datasets}",
        f"output_dir={tmp_path / 'run'}",
        "device=cpu",
        "num_images=2",
        "progress=false",
        "elbo.elbo_timesteps=[1,501]",
        "elbo.collect_timesteps=[20]",
    ]
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("segment", overrides=overrides)
    out = run(cfg)
    metrics = evaluate(out, progress=False, overlays=1)
    assert metrics["num_images"] == 2 and metrics["dataset"] == "voc"
    for variant in ("elbo", "baseline"):
        assert 0.0 <= metrics[variant]["mIoU"] <= 100.0
        assert set(metrics[variant]["per_class"]) <= {"background", "car"}
    assert (out / "metrics.md").is_file()


def test_folder_extracted_by_hand_is_moved_into_place_and_not_fetched(tmp_path, names, capsys):
    files = voc_files(names)
    target = tmp_path / "datasets"
    for rel, data in files.items():  # `tar -xzf dataset.tar.gz` without the `mv datasets_copy/* ./`
        (target / archive.PREFIX / rel).parent.mkdir(parents=True, exist_ok=True)
        (target / archive.PREFIX / rel).write_bytes(data)
    assert prepare.main(["--datasets", "voc", "--split", SPLIT, "--dir", str(target), "--no-prompts"]) == 0
    out = capsys.readouterr().out
    assert f"moved {len(files)} file(s) of {VOC}" in out and "in place voc" in out
    assert all((target / rel).read_bytes() == data for rel, data in files.items())


def test_repository_of_plain_folders_is_fetched_directly(tmp_path, monkeypatch, capsys):
    import huggingface_hub
    from huggingface_hub.hf_api import RepoFile

    listing = [
        RepoFile(path=f"{VOC}/JPEGImages/a.jpg", size=1, oid="a"),
        RepoFile(path="AnE.txt", size=1, oid="b"),
    ]
    calls = []
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_tree", lambda self, *a, **k: iter(listing))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda **kw: calls.append(kw))
    assert prepare.download(tmp_path, [VOC, "ade/ADEChallengeData2016", "AnE.txt"]) is None
    assert [c["allow_patterns"] for c in calls] == [[f"{VOC}/**", "AnE.txt"]]
    assert "neither archive parts nor ['ade/ADEChallengeData2016']" in capsys.readouterr().err
