"""python -m elbo_t2ialign.app [model=...] [runs=<folder>] [key=value ...] [--host H] [--port P]

Starts the explorer page on 127.0.0.1 (never shared publicly). `model=` and any other key=value are
overrides of configs/explain.yaml (defaults: the bundled testbed model, elbo=shapes; with a real
model give elbo=default, e.g. `model=sd15 elbo=default`); `runs=` is the folder whose segmentation
runs the page may open (nothing outside it is read). Offline with the defaults.
"""

from __future__ import annotations

import argparse
import os
import sys

from elbo_t2ialign.explain import OVERRIDE


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, list[str], str | None]:
    parser = argparse.ArgumentParser(prog="python -m elbo_t2ialign.app", description=__doc__.split("\n\n")[0])
    parser.add_argument("items", nargs="*", metavar="key=value", help="runs=<folder>, model=..., elbo=...")
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)"
    )
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--max-upload-mb", type=float, default=20.0, help="largest image file accepted")
    parser.add_argument(
        "--max-pixels", type=int, default=16_000_000, help="largest image (width x height) accepted"
    )
    args = parser.parse_args(argv)
    bad = [a for a in args.items if not OVERRIDE.match(a)]
    if bad:
        parser.error(f"expected key=value arguments, got {bad}")
    runs = [a.split("=", 1)[1] for a in args.items if a.startswith("runs=")]
    overrides = [a for a in args.items if not a.startswith("runs=")]
    return args, overrides, (runs[-1] if runs else None)


def main(argv: list[str] | None = None) -> int:
    args, overrides, runs = parse(argv)
    # offline by default: no usage analytics or version check calls out (GRADIO_ANALYTICS_ENABLED=True allows them)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio  # noqa: F401
    except ImportError:
        print("the app needs Gradio: pip install 'elbo-t2ialign[app]'", file=sys.stderr)
        return 2
    from elbo_t2ialign.app.inputs import Limits
    from elbo_t2ialign.app.model import ModelSession
    from elbo_t2ialign.app.runs import RunsRoot
    from elbo_t2ialign.app.ui import build
    from elbo_t2ialign.explain import ExplainError, compose

    try:
        conf = compose(overrides)
        session = ModelSession(conf)
    except (ExplainError, TypeError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    root = RunsRoot(runs) if runs else None
    if root is not None and not root.root.is_dir():
        print(
            f"error: runs={runs} is not a folder; give the folder that holds your run folders",
            file=sys.stderr,
        )
        return 2
    limits = Limits(args.max_upload_mb, args.max_pixels)
    demo = build(session, root, limits)
    demo.queue(default_concurrency_limit=1)
    where = f"http://{'localhost' if args.host == '127.0.0.1' else args.host}:{args.port}"
    scope = "this machine only" if args.host in ("127.0.0.1", "localhost") else f"listening on {args.host}"
    print(f"explorer: {where} ({scope}); model {session.name}, loaded on first use; Ctrl-C stops it")
    demo.launch(
        server_name=args.host,
        server_port=args.port,
        share=False,  # never a public link
        max_file_size=limits.max_bytes,
        show_error=True,
        quiet=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
