"""A page in the browser for looking at maps: one image, a run folder, generation (the `[app]` extra).

    python -m elbo_t2ialign.app [model=...] [runs=<folder>] [--host 127.0.0.1] [--port 7860]

`model.py` holds every model call, `runs.py` reads run folders below `runs=`, `ui.py` is the page.
"""
