"""The shapes world: determinism, ground truth against captions, skew, splits, on-disk layout."""

import json

import numpy as np
import pytest

from elbo_t2ialign.testbed import world


def test_scene_is_a_pure_function_of_seed_split_and_index():
    a, b = world.generate(3, "val", seed=0), world.generate(3, "val", seed=0)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    assert a.caption == b.caption and a.objects == b.objects
    assert not np.array_equal(a.image, world.generate(4, "val", seed=0).image)
    assert not np.array_equal(a.image, world.generate(3, "val", seed=1).image)
    assert not np.array_equal(a.image, world.generate(3, "train", seed=0).image)
    assert a.image.shape == (64, 64, 3) and a.image.dtype == np.uint8 and a.mask.dtype == np.uint8


@pytest.mark.parametrize("split", ["val", "val_rare", "val_occlusion"])
def test_mask_caption_and_objects_agree(split):
    for i in range(40):
        s = world.generate(i, split)
        ids = sorted(int(v) for v in np.unique(s.mask) if v)
        assert ids == sorted(o.class_id for o in s.objects)
        assert len(set(s.classes)) == len(s.classes) and 1 <= len(s.objects) <= 3
        assert s.caption == "a photo of " + " and ".join(f"a {c}" for c in s.classes)
        for o in s.objects:
            assert (s.mask == o.class_id).sum() >= 3 and o.visible > 0.1


def test_every_class_is_drawn_in_its_own_hue_family():
    import colorsys

    for i in range(60):
        s = world.generate(i, "val")
        for o in s.objects:
            hue, sat, val = colorsys.rgb_to_hsv(*(c / 255 for c in o.rgb))
            expected = world.CLASS_HUES[o.cls][0]
            off = abs((hue * 360 - expected + 180) % 360 - 180)  # circular distance, degrees
            assert off <= world.HUE_JITTER + 0.5, (o.cls, hue * 360)
            assert world.SATURATION[0] - 0.01 <= sat <= world.SATURATION[1] + 0.01
            # the inner pixels of a sizeable visible object carry that colour (shading and grain average out)
            own = s.mask == o.class_id
            own = own & np.roll(own, 1, 0) & np.roll(own, -1, 0) & np.roll(own, 1, 1) & np.roll(own, -1, 1)
            if own.sum() >= 60:
                assert np.abs(s.image[own].mean(0) - np.array(o.rgb)).max() < 12, (i, o.cls)


def test_sizes_span_a_few_pixels_to_half_the_image():
    areas = [
        (s.mask == o.class_id).sum()
        for s in (world.generate(i, "val") for i in range(150))
        for o in s.objects
    ]
    assert min(areas) <= 20 and max(areas) >= 900


def test_class_frequencies_are_skewed_and_rare_split_holds_rare_classes():
    counts = np.zeros(len(world.CLASSES) + 1)
    for i in range(600):
        for o in world.generate(i, "train").objects:
            counts[o.class_id] += 1
    common = counts[1:5].mean()
    rare = counts[[world.CLASSES.index(c) + 1 for c in world.RARE_CLASSES]]
    assert (rare < 0.5 * common).all() and (rare > 0).all()
    for i in range(30):
        assert set(world.generate(i, "val_rare").classes) & set(world.RARE_CLASSES)


def test_occlusion_split_occludes_more():
    def mean_visible(split):
        vis = [o.visible for i in range(60) for o in world.generate(i, split).objects[:-1]]
        return float(np.mean(vis))

    assert mean_visible("val_occlusion") < mean_visible("val") - 0.15


def test_every_shape_renders_inside_its_box_with_the_expected_fill():
    for cls in world.CLASSES:
        cover = world.coverage(world.ShapeObject(cls, "red", 32, 32, 20, 0, 1))
        fill = cover.sum() / (40 * 40)
        assert 0.2 < fill < 0.9, (cls, fill)
        assert cover[:8].sum() == 0 and cover[:, :8].sum() == 0  # nothing outside the box


def test_written_dataset_has_the_real_layout(tmp_path):
    from PIL import Image

    splits = {"val": ("standard", 12), "val_rare": ("rare", 3), "val_occlusion": ("occlusion", 3)}
    world.write_dataset(tmp_path, splits=splits)
    info = json.loads((tmp_path / "classes.json").read_text())
    voc_keys = {"dataset", "data_root", "image_path", "gt_path", "num_classes_without_background", "classes"}
    assert voc_keys <= set(info) and [c["name"] for c in info["classes"]] == list(world.CLASSES)
    for f in ("val_id.txt", "val_id_10.txt", "val_id_100.txt", "val_id_rare.txt", "val_id_occlusion.txt"):
        assert (tmp_path / f).is_file()
    names = (tmp_path / "val_id.txt").read_text().split()
    assert len(names) == 12
    path = info["gt_path"].format(data_root=tmp_path, img_name=names[0])
    mask = np.array(Image.open(path))
    assert np.array_equal(mask, world.generate(0, "val").mask)
    captions = json.loads((tmp_path / "captions.json").read_text())
    assert captions[names[0]] == world.generate(0, "val").caption
    # the same seed writes the same bytes
    other = tmp_path / "again"
    world.write_dataset(other, splits=splits)
    assert (other / "images" / f"{names[1]}.png").read_bytes() == (
        tmp_path / "images" / f"{names[1]}.png"
    ).read_bytes()


def test_segmentation_datasets_read_it(tmp_path):
    datasets = pytest.importorskip("elbo_t2ialign.segmentation.datasets")
    world.write_dataset(tmp_path, splits={"val": ("standard", 5), "val_rare": ("rare", 2)})
    cfg = {"name": "shapes", "metadata": str(tmp_path), "data_root": str(tmp_path), "split": "val_rare"}
    ds = datasets.SegDataset(cfg)
    assert ds.class_names == list(world.CLASSES) and len(ds.images) == 2
    labels = ds.load_labels(ds.images[0])
    assert np.array_equal(labels, world.generate(0, "val_rare").mask)


def test_tiny_shapes_captioner_words_are_the_worlds():
    """`tiny.models.SHAPES_WORDS` is a copy (the library sits below the testbed): it must stay the
    world's caption vocabulary."""
    from elbo_t2ialign.tiny.models import SHAPES_WORDS

    assert tuple(SHAPES_WORDS) == tuple(world.VOCABULARY)
