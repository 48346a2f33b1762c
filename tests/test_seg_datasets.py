"""Datasets: ground-truth conventions, metadata and splits, the label cache, phrase files."""

import json

import numpy as np
import pytest
from PIL import Image

from elbo_t2ialign.devtools.fixtures import CONVENTIONS, fixture_config, write_dataset
from elbo_t2ialign.segmentation.config import ConfigError, InputError
from elbo_t2ialign.segmentation.datasets import IGNORE, GroundTruthConvention, SegDataset

CLASSES = ["cat", "dog", "car"]


def _dataset(tmp_path, masks, convention, **dataset_keys):
    """A fixture folder whose images are blank and whose masks are the given raw arrays."""
    samples = {name: (np.zeros((*m.shape, 3), np.uint8), m) for name, m in masks.items()}
    root = write_dataset(tmp_path / "data", CLASSES, samples)
    cfg = fixture_config(root, tmp_path / "run", convention)["dataset"]
    return SegDataset({**cfg, **dataset_keys})


def test_voc_convention_ignores_255(tmp_path):
    raw = np.array([[0, 1, 255], [3, 255, 2]], np.uint8)
    ds = _dataset(tmp_path, {"a": raw}, "voc")
    assert ds.load_labels("a").tolist() == [[0, 1, IGNORE], [3, IGNORE, 2]]
    assert ds.labels.get("a").class_ids == [1, 2, 3]


def test_coco_convention_shifts_ids_and_maps_stuff_to_background(tmp_path):
    # raw 0 -> id 1 (cat), 2 -> 3 (car); stuff ids 80, 91, 181 and unlabeled 255 -> background
    raw = np.array([[0, 80, 91], [2, 181, 255]], np.uint8)
    ds = _dataset(tmp_path, {"a": raw}, "coco")
    assert ds.load_labels("a").tolist() == [[1, 0, 0], [3, 0, 0]]
    assert ds.labels.get("a").class_ids == [1, 3]


def test_plain_convention_keeps_ids(tmp_path):
    raw = np.array([[0, 2, 2], [3, 0, 1]], np.uint8)
    ds = _dataset(tmp_path, {"a": raw}, "plain")
    assert ds.load_labels("a").tolist() == raw.tolist()


def test_id_absent_from_classes_json_is_an_error_naming_it(tmp_path):
    ds = _dataset(tmp_path, {"a": np.array([[0, 1], [7, 255]], np.uint8)}, "voc")
    with pytest.raises(InputError, match=r"mask of a .*raw id\(s\) \[7\].*1\.\.3"):
        ds.load_labels("a")


def test_convention_is_data_for_coco_sized_ids():
    conv = GroundTruthConvention(num_classes=80, id_shift=1, max_id=80)
    raw = np.arange(256).reshape(16, 16)
    labels = conv.apply(raw)
    expected = np.where(raw + 1 <= 80, raw + 1, 0)  # independent statement of method.md §6
    assert (labels == expected).all()


def test_rgb_mask_is_rejected(tmp_path):
    ds = _dataset(tmp_path, {"a": np.zeros((2, 2), np.uint8)}, "plain")
    Image.new("RGB", (2, 2)).save(ds.mask_path("a"))
    with pytest.raises(InputError, match="RGB"):
        ds.load_labels("a")


def test_label_cache_is_json_and_reused_without_the_mask(tmp_path):
    raw = np.array([[0, 3], [3, 1]], np.uint8)
    ds = _dataset(tmp_path, {"a": raw, "b": raw * 0}, "plain")
    assert ds.labels.get("a").class_ids == [1, 3]
    assert ds.labels.get("b").class_ids == []
    ds.labels.save()
    cache = json.loads(ds.labels.path.read_text())
    st = ds.mask_path("a").stat()
    assert cache["images"]["a"] == {
        "class_ids": [1, 3],
        "size": [2, 2],
        "stamp": [st.st_size, st.st_mtime_ns],
    }
    ds.mask_path("a").unlink()  # a second dataset object must not need the mask any more
    again = SegDataset(ds.cfg)
    assert again.labels.get("a").class_ids == [1, 3]
    # another convention invalidates the cache: the mask is read again, and it is gone
    other = SegDataset({**ds.cfg, **CONVENTIONS["voc"]})
    with pytest.raises(InputError, match="not found"):
        other.labels.get("a")


def test_label_cache_rereads_a_mask_that_changed(tmp_path):
    import os

    ds = _dataset(tmp_path, {"a": np.array([[0, 3], [3, 1]], np.uint8)}, "plain")
    assert ds.labels.get("a").class_ids == [1, 3]
    ds.labels.save()
    # the dataset is regenerated: same file name, other content (and a later mtime)
    Image.fromarray(np.array([[2, 2], [0, 2]], np.uint8)).save(ds.mask_path("a"))
    st = ds.mask_path("a").stat()
    os.utime(ds.mask_path("a"), ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert SegDataset(ds.cfg).labels.get("a").class_ids == [2]


def test_split_names_and_unknown_split(tmp_path):
    samples = {n: (np.zeros((2, 2, 3), np.uint8), np.zeros((2, 2), np.uint8)) for n in "abc"}
    root = write_dataset(
        tmp_path / "d", CLASSES, samples, splits={"val": ["a", "b", "c"], "val_2": ["b", "c"]}
    )
    cfg = fixture_config(root, tmp_path / "run")["dataset"]
    assert SegDataset({**cfg, "split": "val_2"}).images == ["b", "c"]
    with pytest.raises(ConfigError, match=r"split 'val_9'.*available: \['val', 'val_2'\]"):
        SegDataset({**cfg, "split": "val_9"})


@pytest.mark.parametrize(
    ("name", "num_classes", "first", "splits"),
    [
        ("voc", 20, "plane", {"val": 1449, "val_100": 100, "val_10_car": 10, "train": 1464}),
        ("context", 59, "airplane", {"val": 5104, "val_100": 100, "val_10_car": 10}),
        ("coco", 80, "person", {"val": 5000, "val_100": 100, "val_10_car": 10}),
        ("ade20k", 150, "wall", {"val": 2000}),
        ("aep", 38, "backpack", {"val": 741}),
    ],
)
def test_builtin_metadata(name, num_classes, first, splits):
    for split, count in splits.items():
        ds = SegDataset({"name": name, "data_root": "/nonexistent", "split": split})
        assert len(ds.images) == count
        assert len(set(ds.images)) == count
    assert len(ds.class_names) == num_classes and ds.class_names[0] == first
    assert "{img_name}" in ds.image_template and "{img_name}" in ds.gt_template


def test_phrase_file_and_fallback(tmp_path):
    raw = np.array([[0, 1], [2, 2]], np.uint8)
    ds = _dataset(tmp_path, {"a": raw, "b": raw}, "plain", phrase_path="{data_root}/phrases/{img_name}.json")
    (ds.data_root / "phrases").mkdir()
    (ds.data_root / "phrases" / "a.json").write_text(json.dumps({"dog": "a sleepy dog"}))
    assert ds.phrases_for("a", [1, 2]) == (["cat", "a sleepy dog"], "phrase_file")
    assert ds.phrases_for("b", [1, 2]) == (None, "class_names (no phrase file)")
    (ds.data_root / "phrases" / "b.json").write_text(json.dumps({"unicorn": "a unicorn"}))
    with pytest.raises(InputError, match=r"\['unicorn'\] absent from classes.json"):
        ds.phrases_for("b", [1, 2])
