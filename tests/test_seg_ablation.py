"""Calibration variants in one run: equal to single-setting runs, resumed by adding only what is
missing, ELBO losses reused from another run folder, and the evaluator's ablation report."""

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image
from test_seg_runner import CLASSES, Interrupting, _brute_miou, tree

from elbo_t2ialign import Aligner, demo
from elbo_t2ialign.cli import config_dir, to_container
from elbo_t2ialign.core.options import AlignOptions
from elbo_t2ialign.devtools.fixtures import PixelAligner, fixture_config, random_samples, write_dataset
from elbo_t2ialign.segmentation import ablation, evaluate, run
from elbo_t2ialign.segmentation.config import ConfigError
from elbo_t2ialign.segmentation.metrics import best_threshold, binary_search_threshold
from elbo_t2ialign.segmentation.variants import Variant, parse_variants
from elbo_t2ialign.testbed import train, world

ALL = ["baseline", "elbo", "s2", "s4", "s5", "fixed3", "cross", "cross_baseline"]
# each variant as one run's only setting: elbo.* overrides that make the `elbo` map that variant
SINGLE = {
    "baseline": {"strength": 1.0},
    "elbo": {},
    "s2": {"strength": 2.0},
    "s4": {"strength": 4.0},
    "s5": {"strength": 5.0},
    "fixed3": {"strength": 3.0, "fixed_temperature": True},
    "cross": {"refine": False},
    "cross_baseline": {"strength": 1.0, "refine": False},
}


@pytest.fixture
def data(tmp_path):
    return write_dataset(tmp_path / "data", CLASSES, random_samples(CLASSES, 8, convention="voc"))


def maps_of(out: Path, variant: str) -> dict[str, np.ndarray]:
    """image/class id -> the variant's stored 8-bit map."""
    return {
        f"{d.name}/{p.stem.rsplit('_', 1)[1]}": np.asarray(Image.open(p)).astype(int)
        for d in sorted((out / "maps").iterdir())
        for p in sorted(d.glob(f"{variant}_[0-9][0-9][0-9].png"))
    }


# ------------------------------------------------------------------ the real model


class Counting(Aligner):
    """The real aligner, counting its ELBO and collection passes (one count per image)."""

    def __init__(self, adapter, options):
        super().__init__(adapter, options)
        self.elbo_passes = self.collect_passes = 0

    def _elbo_losses(self, *args):
        self.elbo_passes += 1
        return super()._elbo_losses(*args)

    def _collect(self, *args):
        self.collect_passes += 1
        return super()._collect(*args)


@pytest.mark.skipif(
    not (train.DEFAULT_MODEL_DIR / "model_index.json").is_file(), reason="no committed testbed model"
)
def test_variants_equal_single_setting_runs_and_resume_adds_only_them(tmp_path):
    world.ensure_dataset(tmp_path / "shapes")
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = to_container(
            compose(
                "segment",
                overrides=[
                    "model=shapes",
                    "dataset=shapes",
                    "elbo=shapes",
                    f"datasets_dir={tmp_path}",
                    "num_images=3",
                    "device=cpu",
                    "progress=false",
                    "elbo.elbo_timesteps=[1,501]",
                    "elbo.collect_timesteps=[20,100]",
                ],
            )
        )
    cfg["model"]["id"] = str(demo.MODEL)
    base = Aligner.from_config(cfg["model"], device="cpu")

    def launch(out, variants, **elbo):
        conf = {
            **cfg,
            "output_dir": str(tmp_path / out),
            "variants": variants,
            "elbo": {**cfg["elbo"], **elbo},
        }
        aligner = Counting(base.adapter, AlignOptions.from_mapping(conf["elbo"]))
        run(conf, aligner=aligner)
        return aligner

    first = launch("multi", ["baseline", "elbo"])
    scores = [
        json.loads((d / "scores.json").read_text()) for d in sorted((tmp_path / "multi" / "maps").iterdir())
    ]
    multi_class = sum(len(s["classes"]) > 1 for s in scores)  # a one-class image needs no ELBO
    assert multi_class >= 1 and (first.elbo_passes, first.collect_passes) == (multi_class, 3)
    before = tree(tmp_path / "multi")
    added = launch("multi", ALL)  # the same folder with six more variants
    assert (added.elbo_passes, added.collect_passes) == (0, 3)  # losses from scores.json, attention again
    after = tree(tmp_path / "multi")
    assert all(after[k] == v for k, v in before.items() if not k.endswith("scores.json"))
    again = launch("multi", ALL)
    assert (again.elbo_passes, again.collect_passes) == (0, 0)

    scores = [
        json.loads((d / "scores.json").read_text()) for d in sorted((tmp_path / "multi" / "maps").iterdir())
    ]
    assert [s["variants"] for s in scores] == [ALL] * 3
    assert any(len(set(s["tau"].values())) > 1 for s in scores)  # the ELBO made the classes differ
    for variant, elbo in SINGLE.items():
        launch(f"single-{variant}", ["elbo"], **elbo)
        single, multi = maps_of(tmp_path / f"single-{variant}", "elbo"), maps_of(tmp_path / "multi", variant)
        assert sorted(single) == sorted(multi) and len(multi) >= 4
        assert max(np.abs(single[k] - multi[k]).max() for k in multi) <= 1, variant  # 8-bit rounding
    # the variants differ from each other where their settings do
    multi = {v: maps_of(tmp_path / "multi", v) for v in ALL}
    for a, b in [
        ("baseline", "elbo"),
        ("elbo", "s5"),
        ("elbo", "fixed3"),
        ("elbo", "cross"),
        ("cross", "cross_baseline"),
    ]:
        assert max(np.abs(multi[a][k] - multi[b][k]).max() for k in multi[a]) > 5, (a, b)


# ------------------------------------------------------------------ variant specs


def test_variant_specs_parse_to_settings():
    opts = AlignOptions(strength=4.0)
    got = parse_variants(
        ["baseline", "elbo", "s2", "strength=2.5", "fixed=3", "fixed0.5", "cross", "cross_baseline"], opts
    )
    assert got == [
        Variant("baseline", 1.0),
        Variant("elbo", 4.0),
        Variant("s2", 2.0),
        Variant("s2.5", 2.5),
        Variant("fixed3", 3.0, True),
        Variant("fixed0.5", 0.5, True),
        Variant("cross", 4.0, False, False),
        Variant("cross_baseline", 1.0, False, False),
    ]
    assert [v.needs_elbo for v in got] == [False, True, True, True, False, False, True, False]
    fixed = parse_variants(
        ["elbo", "cross"], AlignOptions(strength=2.0, fixed_temperature=True, refine=False)
    )
    assert fixed == [Variant("elbo", 2.0, True, False), Variant("cross", 2.0, True, False)]
    assert [v.name for v in parse_variants(None, opts)] == ["baseline", "elbo"]


@pytest.mark.parametrize(
    "specs, message",
    [
        (["s0"], "unknown calibration variant 's0'"),
        (["bogus"], "unknown calibration variant 'bogus'"),
        (["s-1"], "unknown"),
        (["s2", "strength=2"], "'s2' is listed twice"),
        ([], "non-empty list"),
        ("elbo", "non-empty list"),
    ],
)
def test_bad_variant_specs_are_named_before_anything_is_written(tmp_path, data, specs, message):
    with pytest.raises(ConfigError, match=message):
        parse_variants(specs, AlignOptions())
    with pytest.raises(ConfigError, match=message):
        run(fixture_config(data, tmp_path / "run", "voc", variants=specs), aligner=PixelAligner())
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ resume with added variants


def test_added_variants_resume_to_a_from_scratch_run(tmp_path, data):
    wanted = ["baseline", "elbo", "s2", "cross"]
    run(fixture_config(data, tmp_path / "scratch", "voc", variants=wanted), aligner=PixelAligner())
    cfg = fixture_config(data, tmp_path / "grown", "voc")
    run(cfg, aligner=PixelAligner())
    png = {k: v for k, v in tree(tmp_path / "grown").items() if k.endswith(".png")}
    cfg["variants"] = wanted
    with pytest.raises(KeyboardInterrupt):  # killed while adding: 3 images get the new variants
        run(cfg, aligner=Interrupting(after=3))
    partial = evaluate(tmp_path / "grown", progress=False, overlays=0)
    assert [r["variant"] for r in partial["ablation"]] == ["baseline", "elbo"]  # s2, cross: 3 of 8 images
    second = PixelAligner()
    run(cfg, aligner=second)
    assert [c["seed"] for c in second.calls] == [3, 4, 5, 6, 7]
    assert {c["elbo"] for c in second.calls} <= {"given", None}  # ELBO losses from scores.json
    grown = tree(tmp_path / "grown")
    assert grown == tree(tmp_path / "scratch")
    assert all(grown[k] == v for k, v in png.items())
    third = PixelAligner()
    run(cfg, aligner=third)
    assert third.calls == []


def test_removing_a_variant_keeps_its_maps_and_changing_strength_is_refused(tmp_path, data):
    cfg = fixture_config(data, tmp_path / "run", "voc", num_images=2, variants=["baseline", "elbo", "s5"])
    run(cfg, aligner=PixelAligner())
    before = tree(tmp_path / "run")
    aligner = PixelAligner()
    run({**cfg, "variants": ["baseline"]}, aligner=aligner)
    assert aligner.calls == [] and tree(tmp_path / "run") == before
    with pytest.raises(ConfigError, match=r"elbo.strength: 3.0 -> 2.0"):
        run({**cfg, "elbo": {"strength": 2.0}}, aligner=PixelAligner())
    recorded = json.loads((tmp_path / "run" / "variants.json").read_text())
    assert [(v["name"], v["strength"], v["fixed"], v["refine"]) for v in recorded] == [
        ("baseline", 1.0, False, True),
        ("elbo", 3.0, False, True),
        ("s5", 5.0, False, True),
    ]


# ------------------------------------------------------------------ ELBO from another run


def test_elbo_losses_reused_from_another_run(tmp_path, data):
    run(fixture_config(data, tmp_path / "source", "voc"), aligner=PixelAligner())
    aligner = PixelAligner()
    out = run(
        fixture_config(
            data, tmp_path / "reuse", "voc", variants=["elbo", "s5"], elbo_from=str(tmp_path / "source")
        ),
        aligner=aligner,
    )
    multi = [c for c in aligner.calls if len(c["classes"]) > 1]
    assert multi and {c["elbo"] for c in multi} == {"given"}
    assert maps_of(out, "elbo").keys() == maps_of(tmp_path / "source", "elbo").keys()
    for k, v in maps_of(tmp_path / "source", "elbo").items():
        assert np.array_equal(maps_of(out, "elbo")[k], v)
    for name in ("img_000", "img_004"):
        mine, theirs = (
            json.loads((d / "maps" / name / "scores.json").read_text()) for d in (out, tmp_path / "source")
        )
        assert mine["elbo"] == theirs["elbo"] and mine["tau"] == theirs["tau"]
        assert mine.get("elbo_from") == (str(tmp_path / "source") if len(mine["classes"]) > 1 else None)


def test_elbo_reuse_mismatches_are_clear_errors(tmp_path, data):
    source = tmp_path / "source"
    run(fixture_config(data, source, "voc", num_images=3), aligner=PixelAligner())

    def reuse(name, **top):
        aligner = PixelAligner()
        with pytest.raises(ConfigError) as err:
            run(
                fixture_config(data, tmp_path / name, "voc", elbo_from=str(top.pop("src", source)), **top),
                aligner=aligner,
            )
        return str(err.value), aligner.calls

    message, calls = reuse("more_images")
    assert "has no finished image 'img_003' (nor 4 more)" in message and calls == []
    message, _ = reuse("timesteps", elbo={"strength": 3.0, "elbo_timesteps": [1, 2]})
    assert "other elbo.elbo_timesteps" in message
    # the losses depend on the precision the model ran in (model.dtype; the source ran with "auto")
    message, _ = reuse("half", model={"name": "pixel", "id": "none", "dtype": "float16"})
    assert "other model.dtype" in message
    message, _ = reuse("nowhere", src=tmp_path / "nowhere")
    assert "is not a segmentation run folder" in message

    scores_path = source / "maps" / "img_000" / "scores.json"
    scores = json.loads(scores_path.read_text())
    assert len(scores["classes"]) > 1
    scores["classes"] = scores["classes"][::-1]
    scores_path.write_text(json.dumps(scores))
    message, calls = reuse("classes", num_images=3)
    assert "image 'img_000': classes" in message and "differ" in message and calls == []

    no_elbo = tmp_path / "no_elbo"
    run(fixture_config(data, no_elbo, "voc", num_images=1, variants=["baseline"]), aligner=PixelAligner())
    message, _ = reuse("from_baseline", src=no_elbo, num_images=1)
    assert "no ELBO losses stored" in message


# ------------------------------------------------------------------ the evaluator's report


def test_ablation_report_rows_match_brute_force(tmp_path, data):
    variants = ["baseline", "elbo", "s2", "s5", "fixed3", "cross"]
    out = run(fixture_config(data, tmp_path / "run", "voc", variants=variants), aligner=PixelAligner())
    m = evaluate(out, progress=False, overlays=1)
    saved = json.loads((out / "metrics.json").read_text())
    rows = {r["variant"]: r for r in saved["ablation"]}
    assert list(rows) == variants and sorted(saved["variants"]) == sorted(
        variants
    )  # the table keeps the order
    for v, r in rows.items():
        assert r["mIoU"] == pytest.approx(_brute_miou(data, out, v, r["threshold"]))
        assert r["mIoU"] == pytest.approx(
            max(x for x in saved["variants"][v]["curve"]["mIoU"] if x is not None)
        )
        if v != "baseline":
            for k in ("mIoU", "precision", "recall", "F1", "small", "medium", "large"):
                assert r["delta"][k] == pytest.approx(r[k] - rows["baseline"][k])
    assert (rows["s5"]["strength"], rows["fixed3"]["fixed"], rows["cross"]["refine"]) == (5.0, True, False)
    assert m["elbo"]["mIoU"] == rows["elbo"]["mIoU"] and saved["delta_mIoU"] == pytest.approx(
        rows["elbo"]["delta"]["mIoU"]
    )
    text = (out / "metrics.md").read_text()
    assert (
        f"| s5 | strength 5 | {rows['s5']['threshold']:.2f} | {rows['s5']['mIoU']:.2f} ({rows['s5']['delta']['mIoU']:+.2f}) |"
        in text
    )
    for plot in ("miou_vs_strength.png", "threshold_curves.png", "miou_vs_threshold.png", "overlays.png"):
        assert Image.open(out / "plots" / plot).size[0] > 100


def test_run_without_elbo_or_baseline_still_reports(tmp_path, data):
    out = run(fixture_config(data, tmp_path / "run", "voc", variants=["s2", "cross"]), aligner=PixelAligner())
    m = evaluate(out, progress=False, overlays=1)
    assert (
        "elbo" not in m and "delta_mIoU" not in m and [r["variant"] for r in m["ablation"]] == ["s2", "cross"]
    )
    assert all("delta" not in r for r in m["ablation"])
    assert "| cross | strength 3, cross-attention (no refinement) |" in (out / "metrics.md").read_text()
    assert (out / "plots" / "threshold_curves.png").is_file() and not (
        out / "plots" / "overlays.png"
    ).exists()


def test_folder_from_before_variants_is_evaluated_and_extended(tmp_path, data):
    cfg = fixture_config(data, tmp_path / "old", "voc")
    run(cfg, aligner=PixelAligner())
    before = evaluate(tmp_path / "old", progress=False, overlays=0)
    # what this folder looked like before variants existed: no variants.json, no "variants" key
    (tmp_path / "old" / "variants.json").unlink()
    for path in (tmp_path / "old" / "maps").glob("*/scores.json"):
        scores = json.loads(path.read_text())
        del scores["variants"]
        path.write_text(json.dumps(scores))
    old = evaluate(tmp_path / "old", progress=False, overlays=0)
    assert {r["variant"]: r["mIoU"] for r in old["ablation"]} == {
        "elbo": before["elbo"]["mIoU"],
        "baseline": before["baseline"]["mIoU"],
    }
    aligner = PixelAligner()
    run({**cfg, "variants": ["baseline", "elbo", "s2"]}, aligner=aligner)
    assert len(aligner.calls) == 8 and {c["elbo"] for c in aligner.calls} <= {"given", None}
    grown = evaluate(tmp_path / "old", progress=False, overlays=0)
    assert [r["variant"] for r in grown["ablation"]] == ["baseline", "elbo", "s2"]
    assert grown["elbo"]["mIoU"] == before["elbo"]["mIoU"]


def test_reference_search_and_buckets_as_options_and_the_other_search_in_the_table(tmp_path, data):
    out = run(fixture_config(data, tmp_path / "run", "voc"), aligner=PixelAligner())
    m = evaluate(out, progress=False, overlays=0, search="binary", buckets="fixed-size")
    assert (m["threshold_search"], m["bucket_rule"]) == ("binary", "fixed-size")
    for v in ("baseline", "elbo"):
        curve = np.array([np.nan if y is None else y for y in m[v]["curve"]["mIoU"]])
        assert m[v]["threshold"] == binary_search_threshold(curve) == m[v]["searches"]["binary"]["threshold"]
        assert m[v]["mIoU"] == pytest.approx(_brute_miou(data, out, v, m[v]["threshold"]))
        assert m[v]["searches"]["sweep"] == {"threshold": best_threshold(curve), "mIoU": np.nanmax(curve)}
        counts = [b["count"] for b in m[v]["size_buckets"]]
        size = sum(counts) // 10 + 1  # the reference's runs of len // 10 + 1
        assert counts == [max(0, min(size, sum(counts) - b * size)) for b in range(10)]
    # the table names the other search's choice for the rows where it differs, "same" elsewhere
    table = copy.deepcopy(m)
    mine = table["ablation"][1]["searches"]["binary"]
    table["ablation"][1]["searches"]["sweep"] = {"threshold": mine["threshold"] + 0.06, "mIoU": 99.5}
    table["ablation"][0]["searches"]["sweep"] = table["ablation"][0]["searches"]["binary"]
    lines = ablation.markdown(table)
    assert lines[2].endswith("| exact sweep: threshold, mIoU |")
    assert lines[4].endswith("| same |") and lines[5].endswith(f"| {mine['threshold'] + 0.06:.2f}, 99.50 |")
    differs = any(
        r["searches"]["sweep"]["threshold"] != r["searches"]["binary"]["threshold"] for r in m["ablation"]
    )
    assert ("exact sweep: threshold, mIoU" in (out / "metrics.md").read_text()) == differs
