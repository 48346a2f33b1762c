"""The page (Gradio Blocks): one image, a run folder, generation. Only drawing and wiring live here;
model calls go through `model.ModelSession`, run folders through `runs.RunsRoot`."""

from __future__ import annotations

import atexit
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
from PIL import Image

from elbo_t2ialign.app import views
from elbo_t2ialign.app.inputs import Limits, check_upload, split_words
from elbo_t2ialign.app.model import EXPECTED, ModelSession, Settings, result_at
from elbo_t2ialign.app.runs import SIZES, SORTS, PathRefused, RunsRoot, dataset_of, read_run_view, table

SHAPES_PICKS = 20  # the first images of the shapes world's val split offered on the page
KINDS = (("cross", "cross-attention"), ("baseline", "baseline"), ("elbo", "calibrated"))


def build(session: ModelSession, runs_root: RunsRoot | None, limits: Limits) -> gr.Blocks:
    work = Path(tempfile.mkdtemp(prefix="elbo-t2ialign-app-"))  # downloads; removed when the app stops
    atexit.register(shutil.rmtree, work, ignore_errors=True)

    def forwards_line() -> str:
        state = "loaded" if session.loaded else "not loaded yet"
        return f"model **{session.name}** ({state}); denoiser forward passes so far: **{session.forwards}**"

    # ------------------------------------------------------------ one image
    def pick_shapes(choice: str):
        from elbo_t2ialign.testbed import world

        if not choice:
            return gr.update(), gr.update()
        index = int(choice.split()[0].rsplit("_", 1)[1])
        sample = world.generate(index, "val")
        path = work / f"{sample.name}.png"
        Image.fromarray(sample.image).save(path)
        return str(path), ", ".join(dict.fromkeys(sample.classes))

    def gallery(image: Image.Image, evidence, settings: Settings, threshold: float):
        from elbo_t2ialign.segmentation.metrics import predict

        result = result_at(evidence, settings)
        items = []
        for word in evidence.names:
            for kind, title in KINDS:
                heat = getattr(
                    result, {"cross": "cross", "baseline": "baseline_heatmaps", "elbo": "heatmaps"}[kind]
                )[word]
                extra = f" (tau {result.tau[word]:.3g})" if kind == "elbo" else ""
                items.append((views.heat_over(image, heat), f"{word}: {title}{extra}"))
        ids, labels_items = list(range(1, len(evidence.names) + 1)), []
        for key, title in (("baseline_heatmaps", "baseline"), ("heatmaps", "calibrated")):
            maps = np.stack([getattr(result, key)[w] for w in evidence.names])
            levels = np.round(maps * 255).astype(np.uint8)
            labels = predict(levels, ids, threshold)
            legend = ", ".join(
                f"{w} {views.colour_name(i)}" for i, w in zip(ids, evidence.names, strict=True)
            )
            labels_items.append(
                (views.labels_over(image, labels), f"{title} labels at threshold {threshold:.2f} ({legend})")
            )
        rows = [
            [
                w,
                str(evidence.token_positions.get(w)),
                "-" if result.losses.get(w) is None else round(float(result.losses[w]), 5),
                round(float(result.tau[w]), 4),
            ]
            for w in evidence.names
        ]
        return items, labels_items, rows

    def observe(
        path,
        words_text,
        prompt,
        caption,
        strength,
        fixed,
        refine,
        threshold,
        progress=gr.Progress(),  # noqa: B008
    ):
        def fail(message: str):
            return None, None, [], [], [], f"**{message}**", forwards_line()

        if not path:
            return fail("upload an image or pick one of the shapes world first")
        try:
            image = check_upload(path, limits)
        except ValueError as err:
            return fail(str(err))
        except OSError as err:
            return fail(f"cannot read the upload as an image: {err}")
        words = split_words(words_text)
        if not words:
            return fail("type at least one word (several: separate them with commas)")
        if caption and prompt.strip():
            return fail("give a prompt or ask for the caption, not both")
        report = lambda f, d: progress(f, desc=d)  # noqa: E731
        status = ""
        try:
            if caption:
                text, cached, prompt, appended = session.caption_prompt(image, words, report)
                status = f"caption{' (from the cache)' if cached else ''}: {text}" + (
                    f" (appended: {', '.join(appended)})" if appended else ""
                )
            evidence = session.observe(image, words, prompt.strip() or None, progress=report)
        except EXPECTED as err:
            return fail(" ".join(str(err).split()))
        progress(0.9, desc="drawing the maps")
        items, labels, rows = gallery(image, evidence, Settings(strength, fixed, refine), threshold)
        status = "  \n".join(filter(None, [status, f"prompt: `{evidence.prompts['collect']}`"]))
        return (image, evidence), None, items, labels, rows, status, forwards_line()

    def redraw(state, strength, fixed, refine, threshold):
        if state is None:
            return gr.update(), gr.update(), gr.update(), forwards_line()
        image, evidence = state
        items, labels, rows = gallery(image, evidence, Settings(strength, fixed, refine), threshold)
        return items, labels, rows, forwards_line()

    def downloads(state, strength, fixed, refine):
        from elbo_t2ialign.explain import write_maps

        if state is None:
            return None
        image, evidence = state
        result = result_at(evidence, Settings(strength, fixed, refine))
        folder = Path(tempfile.mkdtemp(prefix="maps-", dir=work))
        options = session.options.replace(strength=float(strength), fixed_temperature=bool(fixed))
        write_maps(folder, session.conf, options, result, image)
        figure = folder.parent / f"{folder.name}-figure.png"
        os.replace(folder / "figure.png", figure)
        return [str(views.bundle(folder, f"{folder.name}-maps")), str(figure)]

    # ------------------------------------------------------------ a run folder
    def run_choices() -> list[str]:
        return [rel for rel, _ in runs_root.segmentation_runs()] if runs_root else []

    def open_run(rel: str, sort: str, cls: str, size: str):
        empty = ([], gr.update(choices=["all"], value="all"), gr.update(choices=[], value=None), "")
        if runs_root is None:
            return None, "**no runs folder given: start the app with runs=<folder>**", *empty
        try:
            view = read_run_view(runs_root.resolve(rel))
        except PathRefused as err:
            return None, f"**{err}**", *empty
        except (OSError, ValueError, KeyError) as err:
            return None, f"**{rel}: cannot be read: {' '.join(str(err).split())}**", *empty
        classes = ["all", *sorted({c for r in view.rows for c in r.classes})]
        rows = table(view, sort, cls if cls in classes else "all", size)
        return (
            view,
            view.summary(),
            rows,
            gr.update(choices=classes, value=cls if cls in classes else "all"),
            gr.update(choices=[r[0] for r in rows], value=None),
            view.report,
        )

    def refilter(view, sort, cls, size):
        if view is None:
            return [], gr.update()
        rows = table(view, sort, cls, size)
        return rows, gr.update(choices=[r[0] for r in rows])

    def open_image(view, name):
        from elbo_t2ialign.segmentation.evaluate import load_image_result
        from elbo_t2ialign.segmentation.metrics import predict

        if view is None or not name:
            return [], []
        row = next((r for r in view.rows if r.name == name), None)
        if row is None:
            return [], []
        variants = list(row.iou)
        try:
            seg, dataset = dataset_of(view.folder)
            gt, ids, maps, _ = load_image_result(seg, dataset, name, variants)
            image = dataset.load_image(name).convert("RGB")
        except (OSError, ValueError, KeyError) as err:  # moved or damaged since the run was opened
            gr.Warning(f"{name}: cannot be read: {' '.join(str(err).split())}")
            return [], []
        items = [(views.plain(image), "image"), (views.labels_over(None, gt), "ground truth")]
        for v in variants:
            th = view.thresholds.get(v, 0.5)
            label = view.labels.get(v, v)
            items.append(
                (views.labels_over(image, predict(maps[v], ids, th)), f"{v} labels ({label}, th {th:.2f})")
            )
            heat = maps[v].max(0) / 255.0 if ids else np.zeros(gt.shape)
            items.append((views.heat_over(image, heat), f"{v} heat (max over classes)"))
        classes = sorted({c for v in variants for c in row.per_class[v]})
        numbers = [[c, *(_round(row.per_class[v].get(c)) for v in variants)] for c in classes]
        numbers.append(["mIoU", *(_round(row.iou[v]) for v in variants)])
        return items, gr.update(value=numbers, headers=["class", *[f"IoU {v}" for v in variants]])

    # ------------------------------------------------------------ generation
    def generate(prompt, phrases_text, seed, steps, strength, progress=gr.Progress()):  # noqa: B008
        if not (prompt or "").strip():
            return None, None, None, "**type a prompt first**", forwards_line()
        try:
            phrases = split_words(phrases_text) or session.phrases(prompt)
            weighted, baseline = session.generate(
                prompt, phrases, int(seed), int(steps), float(strength), lambda f, d: progress(f, desc=d)
            )
        except EXPECTED as err:
            return None, None, None, f"**{' '.join(str(err).split())}**", forwards_line()
        plot = _weights_figure(weighted)
        status = f"phrases: {', '.join(phrases) or '(none)'}; weights at the last step: " + ", ".join(
            f"{p} {w:.2f}" for p, w in zip(weighted.phrases, weighted.weights[-1], strict=True)
        )
        return views.plain(weighted.image), views.plain(baseline.image), plot, status, forwards_line()

    # ------------------------------------------------------------ layout
    with gr.Blocks(title="elbo-t2ialign explorer") as demo:
        gr.Markdown(
            "# elbo-t2ialign explorer\nWhere a diffusion model puts each word, with and without the "
            "ELBO calibration (see the README)."
        )
        forwards = gr.Markdown(forwards_line(), elem_id="forwards")
        with gr.Tabs():
            with gr.Tab("One image", id="one"):
                state = gr.State(None)
                with gr.Row():
                    with gr.Column(scale=1):
                        upload = gr.Image(type="filepath", label="image", elem_id="upload", height=260)
                        pick = gr.Dropdown(
                            [f"{world_name(i)}" for i in range(SHAPES_PICKS)],
                            label="or a shapes-world image",
                            value=None,
                            elem_id="shapes-pick",
                        )
                        words = gr.Textbox(label="words (comma separated)", elem_id="words")
                        prompt = gr.Textbox(
                            label="prompt (optional: the words are found in it)", elem_id="prompt"
                        )
                        caption = gr.Checkbox(
                            value=False,
                            label="prompt = the image's caption (words it lacks are appended)",
                            elem_id="caption",
                        )
                        go = gr.Button("Compute maps", variant="primary", elem_id="compute")
                        strength = gr.Slider(
                            1,
                            10,
                            value=session.options.strength,
                            step=0.5,
                            label="strength",
                            elem_id="strength",
                        )
                        fixed = gr.Checkbox(
                            value=bool(session.options.fixed_temperature),
                            label="fixed temperature (tau = strength)",
                        )
                        refine = gr.Checkbox(
                            value=bool(session.options.refine), label="self-attention refinement"
                        )
                        threshold = gr.Slider(
                            0.01, 0.99, value=0.5, step=0.01, label="threshold (labels)", elem_id="threshold"
                        )
                    with gr.Column(scale=2):
                        one_status = gr.Markdown(elem_id="one-status")
                        word_table = gr.Dataframe(
                            headers=["word", "tokens", "loss", "tau"], interactive=False, elem_id="word-table"
                        )
                        maps = gr.Gallery(
                            label="per word: cross-attention, baseline, calibrated",
                            columns=3,
                            format="png",
                            elem_id="maps",
                            height="auto",
                            buttons=["download", "fullscreen"],
                        )
                        label_maps = gr.Gallery(
                            label="labels (argmax over the words, background below the threshold)",
                            columns=4,
                            format="png",
                            elem_id="labels",
                            buttons=["download", "fullscreen"],
                        )
                        get_files = gr.Button(
                            "Prepare downloads (maps .npy/.png, figure)", elem_id="prepare-downloads"
                        )
                        files = gr.File(label="downloads", file_count="multiple", elem_id="downloads")
                pick.change(pick_shapes, [pick], [upload, words])
                go.click(
                    observe,
                    [upload, words, prompt, caption, strength, fixed, refine, threshold],
                    [state, files, maps, label_maps, word_table, one_status, forwards],
                    concurrency_limit=1,
                    concurrency_id="model",
                )
                for control in (strength, fixed, refine, threshold):
                    control.change(
                        redraw,
                        [state, strength, fixed, refine, threshold],
                        [maps, label_maps, word_table, forwards],
                        trigger_mode="always_last",
                    )
                get_files.click(downloads, [state, strength, fixed, refine], [files])

            with gr.Tab("Run folder", id="runs"):
                view_state = gr.State(None)
                where = runs_root.given if runs_root else "(none: start with runs=<folder>)"
                gr.Markdown(f"Segmentation runs below `{where}`")
                with gr.Row():
                    run_pick = gr.Dropdown(
                        run_choices(), label="run", value=None, allow_custom_value=True, elem_id="run-pick"
                    )
                    refresh = gr.Button("Refresh list", scale=0)
                    open_btn = gr.Button("Open", variant="primary", scale=0, elem_id="open-run")
                run_status = gr.Markdown(elem_id="run-status")
                with gr.Row():
                    sort = gr.Dropdown(list(SORTS), value=next(iter(SORTS)), label="sort", elem_id="sort")
                    cls = gr.Dropdown(["all"], value="all", label="class", elem_id="class-filter")
                    size = gr.Dropdown(
                        ["all", *SIZES],
                        value="all",
                        label="object size (smallest object, terciles)",
                        elem_id="size-filter",
                    )
                images = gr.Dataframe(
                    headers=[
                        "image",
                        "classes",
                        "smallest object %",
                        "size",
                        "IoU baseline",
                        "IoU elbo",
                        "change",
                    ],
                    interactive=False,
                    elem_id="image-table",
                )
                image_pick = gr.Dropdown([], label="open an image", elem_id="image-pick")
                overlays = gr.Gallery(
                    label="image, ground truth, each variant's labels and heat",
                    columns=4,
                    format="png",
                    elem_id="overlays",
                    height="auto",
                )
                class_numbers = gr.Dataframe(headers=["class"], interactive=False, elem_id="class-numbers")
                gr.Markdown("### The run's metrics and ablation table (metrics.md)")
                report = gr.Markdown(elem_id="run-report")
                refresh.click(lambda: gr.update(choices=run_choices()), None, [run_pick])
                open_btn.click(
                    open_run,
                    [run_pick, sort, cls, size],
                    [view_state, run_status, images, cls, image_pick, report],
                )
                for control in (sort, cls, size):
                    control.input(refilter, [view_state, sort, cls, size], [images, image_pick])
                image_pick.input(open_image, [view_state, image_pick], [overlays, class_numbers])

                def select_row(view, evt: gr.SelectData):
                    row = evt.row_value if evt is not None else None
                    name = row[0] if row else None
                    items, numbers = open_image(view, name)
                    return items, numbers, gr.update(value=name)

                images.select(select_row, [view_state], [overlays, class_numbers, image_pick])

            with gr.Tab("Generation", id="generation"):
                with gr.Row():
                    with gr.Column(scale=1):
                        gen_prompt = gr.Textbox(
                            label="prompt", value="a photo of a circle and a square", elem_id="gen-prompt"
                        )
                        gen_phrases = gr.Textbox(
                            label="phrases (comma separated; empty: spaCy noun phrases)",
                            elem_id="gen-phrases",
                        )
                        seed = gr.Number(value=4307, precision=0, label="seed")
                        steps = gr.Slider(2, 100, value=20, step=1, label="steps")
                        gen_strength = gr.Slider(0.5, 3, value=1.2, step=0.05, label="ELBO weight strength")
                        gen_go = gr.Button("Generate", variant="primary", elem_id="generate")
                    with gr.Column(scale=2):
                        gen_status = gr.Markdown(elem_id="gen-status")
                        with gr.Row():
                            weighted = gr.Image(
                                label="ELBO-weighted",
                                format="png",
                                elem_id="gen-weighted",
                                buttons=["download", "fullscreen"],
                            )
                            baseline = gr.Image(
                                label="baseline (same seed, no weights)",
                                format="png",
                                elem_id="gen-baseline",
                                height=256,
                            )
                        weights_plot = gr.Plot(label="phrase weights per step", elem_id="gen-weights")
                gen_go.click(
                    generate,
                    [gen_prompt, gen_phrases, seed, steps, gen_strength],
                    [weighted, baseline, weights_plot, gen_status, forwards],
                    concurrency_limit=1,
                    concurrency_id="model",
                )
        demo.load(forwards_line, None, [forwards])
    return demo


def world_name(index: int) -> str:
    from elbo_t2ialign.testbed import world

    sample = world.generate(index, "val")
    return f"{sample.name} ({', '.join(sample.classes)})"


def _round(value: Any) -> Any:
    return (
        None if value is None or (isinstance(value, float) and math.isnan(value)) else round(float(value), 2)
    )


def _weights_figure(result):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3))
    ax = fig.add_subplot()
    steps = np.arange(1, len(result.weights) + 1)
    for k, phrase in enumerate(result.phrases):
        ax.plot(steps, [w[k] for w in result.weights], label=phrase)
    ax.set_xlabel("step")
    ax.set_ylabel("ELBO weight")
    if result.phrases:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
