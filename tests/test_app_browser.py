"""The explorer page in a real browser: `python -m elbo_t2ialign.app` on the bundled testbed model,
driven by headless Chromium (Debian's `chromium` through Playwright; nothing is downloaded).

One image: maps of two words of a shapes-world image, checked against the world's own masks (the
calibrated map's mass inside each word's object, from the downloaded .npy files); the strength slider
redraws them with the denoiser forward count unchanged; an oversize upload is refused on the page.
A run folder: a 3-image segmentation run made here, its image table sorted both ways, one image
opened; a path outside runs= refused on the page. Generation: both images shown.
ELBO_APP_SCREENSHOTS=docs/images writes the three screenshots of the README there."""

from __future__ import annotations

import io
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gradio", reason="the app needs Gradio: the [app] extra (not installed at the floor)")
playwright_api = pytest.importorskip(
    "playwright.sync_api", reason="the browser test needs playwright (the [app] extra)"
)

from PIL import Image  # noqa: E402

from elbo_t2ialign.testbed import train, world  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
IMAGE = 8  # val_00008: a triangle (5.1% of the image) and a star (8.1%)
WORDS = ("triangle", "star")


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


pytestmark = [
    pytest.mark.skipif(chromium() is None, reason="no chromium on PATH (Debian: apt-get install chromium)"),
    pytest.mark.skipif(
        not (train.DEFAULT_MODEL_DIR / "model_index.json").is_file(), reason="no committed testbed model"
    ),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_run(tmp: Path) -> Path:
    """A 3-image segmentation run of the shapes world with the testbed model, evaluated."""
    from hydra import compose, initialize_config_dir

    from elbo_t2ialign.cli import hydra_config_dir
    from elbo_t2ialign.segmentation import evaluate, run

    world.write_dataset(tmp / "datasets" / "shapes", splits={"val": ("standard", 3)})
    out = tmp / "runs" / "shapes-val"
    with initialize_config_dir(config_dir=hydra_config_dir(), version_base="1.3"):
        cfg = compose(
            "segment",
            overrides=[
                "model=shapes",
                "dataset=shapes",
                "elbo=shapes",
                "dataset.split=val",
                f"datasets_dir={tmp / 'datasets'}",
                f"output_dir={out}",
                "device=cpu",
                "num_images=3",
                "progress=false",
            ],
        )
    run(cfg)
    evaluate(out, overlays=0, progress=False)
    return tmp / "runs"


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("app")
    runs = tmp / "runs"
    runs.mkdir()
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    log = open(tmp / "app.log", "w")  # noqa: SIM115  (closed below)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "elbo_t2ialign.app",
            "runs=runs",
            # a random tiny BLIP built in code, over the shapes world's words (offline)
            "caption.model=tiny-shapes",
            "caption.max_new_tokens=3",
            f"caption.cache={tmp / 'captions.json'}",
            "--port",
            str(port),
            "--max-pixels",
            "1000000",
        ],
        cwd=tmp,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        make_run(tmp)  # while the app starts
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(url, timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(
                        f"the app did not start: {(tmp / 'app.log').read_text()[-2000:]}"
                    ) from None
                time.sleep(0.3)
        yield {"url": url, "tmp": tmp, "runs": runs}
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def page(app):
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), headless=True)
        pg = browser.new_page(viewport={"width": 1400, "height": 1100})
        pg.set_default_timeout(30_000)
        pg.goto(app["url"])
        yield pg
        browser.close()


def screenshot(page, name: str) -> None:
    """A full-page screenshot into $ELBO_APP_SCREENSHOTS, once no component is pending any more."""
    target = os.environ.get("ELBO_APP_SCREENSHOTS")
    if target:
        page.wait_for_function("() => document.querySelectorAll('.pending').length === 0")
        page.wait_for_timeout(500)  # the fade-in of the last update
        page.screenshot(path=str(Path(target) / name), full_page=True)


def forwards(page) -> int:
    return int(re.search(r"passes so far: (\d+)", page.locator("#forwards").inner_text()).group(1))


def gallery_images(page, elem: str) -> list[np.ndarray]:
    """The gallery's images as RGB arrays, in order (fetched from the app by their addresses)."""
    out = []
    for img in page.locator(f"#{elem} .grid-container img").all():
        body = page.request.get(img.get_attribute("src")).body()
        out.append(np.asarray(Image.open(io.BytesIO(body)).convert("RGB"), dtype=np.float32))
    return out


def read_table(page, elem: str) -> list[list[str]]:
    """The body cells of a Gradio dataframe, row by row."""
    return page.evaluate(
        """(sel) => Array.from(document.querySelectorAll(sel + ' [role=row].virtual-row'))
            .sort((a, b) => a.dataset.index - b.dataset.index)
            .map(r => Array.from(r.querySelectorAll('[role=gridcell]')).map(c => c.innerText.trim()))""",
        f"#{elem}",
    )


def wait_table(page, elem: str, ready, timeout: float = 30.0) -> list[list[str]]:
    deadline = time.time() + timeout
    while True:
        rows = read_table(page, elem)
        try:
            if ready(rows):
                return rows
        except (ValueError, IndexError):
            pass
        if time.time() > deadline:
            raise AssertionError(f"#{elem} never got ready; it shows {rows}")
        page.wait_for_timeout(200)


def read_gallery_count(page, elem: str) -> int:
    return page.locator(f"#{elem} .grid-container img").count()


def wait_gallery(page, elem: str, count: int) -> None:
    page.wait_for_function(
        "([sel, n]) => document.querySelectorAll(sel).length === n",
        arg=[f"#{elem} .grid-container img", count],
    )


def test_one_image(app, page):
    sample = world.generate(IMAGE, "val")
    path = app["tmp"] / "shapes.png"
    Image.fromarray(sample.image).save(path)
    page.locator("#upload input[type=file]").set_input_files(str(path))
    page.locator("#words textarea").fill(", ".join(WORDS))
    page.locator("#compute").click()
    wait_gallery(page, "maps", 3 * len(WORDS))  # per word: cross-attention, baseline, calibrated
    wait_gallery(page, "labels", 2)  # baseline and calibrated labels
    loaded = forwards(page)
    assert loaded > 0

    first = gallery_images(page, "maps")
    calibrated = [first[3 * i + 2] for i in range(len(WORDS))]
    assert np.abs(calibrated[0] - calibrated[1]).mean() > 5  # the two words' maps differ

    # the maps follow the ground truth: the calibrated map's mass inside its object, from the .npy
    page.locator("#prepare-downloads").click()
    link = page.locator("#downloads a[download$='maps.zip']")
    link.wait_for()
    bundle = zipfile.ZipFile(io.BytesIO(page.request.get(link.get_attribute("href")).body()))
    for word in WORDS:
        heat = np.load(io.BytesIO(bundle.read(f"{word}.elbo.npy")), allow_pickle=False)
        mask = sample.mask == world.CLASSES.index(word) + 1
        assert heat.shape == mask.shape
        inside = heat[mask].sum() / heat.sum()
        # a map that ignored the object would hold about its area fraction (5-8% here)
        assert inside > 3 * mask.mean(), (word, inside, mask.mean())
    assert forwards(page) == loaded  # a download is drawn from the stored evidence

    # a new strength redraws from the stored evidence: maps change, no forward pass
    old = ",".join(i.get_attribute("src") for i in page.locator("#maps .grid-container img").all())
    page.locator("#strength input[type=range]").fill("8")
    page.wait_for_function(
        "([sel, old]) => Array.from(document.querySelectorAll(sel)).map(i => i.src).join() !== old",
        arg=["#maps .grid-container img", old],
    )
    wait_gallery(page, "maps", 3 * len(WORDS))
    second = gallery_images(page, "maps")
    changed = max(np.abs(second[3 * i + 2] - first[3 * i + 2]).mean() for i in range(len(WORDS)))
    assert changed > 0.5
    for i in range(len(WORDS)):  # the baseline and cross-attention maps do not depend on the strength
        assert np.abs(second[3 * i] - first[3 * i]).max() == 0
    assert forwards(page) == loaded
    # so does a new threshold: the labels change, nothing is recomputed by the network
    old = ",".join(i.get_attribute("src") for i in page.locator("#labels .grid-container img").all())
    page.locator("#threshold input[type=range]").fill("0.9")
    page.wait_for_function(
        "([sel, old]) => Array.from(document.querySelectorAll(sel)).map(i => i.src).join() !== old",
        arg=["#labels .grid-container img", old],
    )
    assert forwards(page) == loaded
    screenshot(page, "app_one_image.png")

    # an image above the pixel limit (1 megapixel here) is refused with a message on the page
    big = app["tmp"] / "big.png"
    Image.new("RGB", (1200, 1000), (90, 120, 150)).save(big)
    page.locator("#upload button[aria-label='Remove Image']").click()
    page.locator("#upload input[type=file]").set_input_files(str(big))
    page.locator("#compute").click()
    status = page.locator("#one-status")
    status.filter(has_text="refused").wait_for()
    assert "1200x1000" in status.inner_text() and "megapixels" in status.inner_text()
    assert forwards(page) == loaded
    assert read_gallery_count(page, "maps") == 0  # the maps of the earlier image are gone


def test_caption_as_prompt(app, page):
    sample = world.generate(IMAGE, "val")
    path = app["tmp"] / "shapes.png"
    Image.fromarray(sample.image).save(path)
    page.locator("#upload button[aria-label='Remove Image']").click()
    page.locator("#upload input[type=file]").set_input_files(str(path))
    page.locator("#words textarea").fill(", ".join(WORDS))
    page.locator("#caption input").check()
    page.locator("#compute").click()
    status = page.locator("#one-status")
    status.filter(has_text="prompt:").wait_for()  # the result, not the progress line ("captioning ...")
    wait_gallery(page, "maps", 3 * len(WORDS))
    text = status.inner_text()
    assert text.startswith("caption: "), text
    prompt = text.split("prompt:", 1)[1]
    assert all(word in prompt for word in WORDS), text  # the words the caption lacks are appended
    assert (app["tmp"] / "captions.json").is_file()
    page.locator("#caption input").uncheck()


def test_run_folder(app, page):
    page.get_by_role("tab", name="Run folder").click()
    pick = page.locator("#run-pick input")
    # a path leaving runs= is refused on the page
    pick.fill("../")
    pick.press("Enter")
    page.locator("#open-run").click()
    page.locator("#run-status").filter(has_text="refused").wait_for()
    assert "outside the runs folder" in page.locator("#run-status").inner_text()

    pick.fill("shapes-val")
    pick.press("Enter")
    page.locator("#open-run").click()
    page.locator("#run-status").filter(has_text="3 of 3 images finished").wait_for()
    helped = wait_table(page, "image-table", lambda rows: len(rows) == 3)
    changes = [float(r[6]) for r in helped]
    assert changes == sorted(changes, reverse=True)
    page.locator("#sort input").click()
    page.get_by_role("option", name="IoU change, most hurt first").click()
    hurt = wait_table(
        page,
        "image-table",
        lambda rows: (
            [float(r[6]) for r in rows] == sorted(changes) and (rows != helped or len(set(changes)) == 1)
        ),
    )
    assert sorted(r[0] for r in hurt) == sorted(r[0] for r in helped)

    name = hurt[0][0]
    page.locator("#image-pick input").click()
    page.get_by_role("option", name=name).click()
    wait_gallery(page, "overlays", 2 + 2 * 2)  # image, ground truth, labels and heat of 2 variants
    assert "mIoU" in page.locator("#class-numbers").inner_text()
    assert (
        "Ablation" in page.locator("#run-report").inner_text()
        or "mIoU" in page.locator("#run-report").inner_text()
    )
    screenshot(page, "app_run_folder.png")


def test_generation(app, page):
    page.get_by_role("tab", name="Generation").click()
    before = forwards(page)
    page.locator("#gen-phrases textarea").fill("a circle, a square")
    page.locator("#generate").click()
    page.locator("#gen-status").filter(has_text="weights at the last step").wait_for()
    for elem in ("gen-weighted", "gen-baseline"):
        page.locator(f"#{elem} img").wait_for()
    # 20 steps (999, 949, ..., 49 -> 0): the weighted image makes one ELBO forward (prompt and phrases
    # in one batch) and one guided forward per step, the baseline one guided forward per step
    assert forwards(page) == before + 20 * 2 + 20
    screenshot(page, "app_generation.png")
