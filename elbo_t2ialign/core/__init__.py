"""The method: images and strings in, per-word heatmaps out. No datasets, files or configs.

Read it in the order of docs/method.md, each file top to bottom:

1. `options.py`       AlignOptions: every value of the method, checked (the method's defaults).
2. `adapters/`        all family knowledge (SD1.x/2.x/XL, SD3, FLUX, PixArt): `schedules.py` the
                      noise schedules and prediction targets (method.md §2), `base.py` image -> z0,
                      prompt -> conditioning, one denoiser call, `unet.py` / `transformers.py` the
                      families' attention layers, text blocks and sampler facts.
3. `capture.py`       the attention layers' softmax probabilities (method.md §4.3), the layer weights
                      and the recorder that sums them over steps and layers (method.md §5).
4. `elbo.py`          per-class summed diffusion loss, shared noise, batched (method.md §3.1-3.4).
5. `calibrate.py`     token positions (4.4), tau = strength ** n (3.5-3.6), class cross maps,
                      self-attention refinement and image-sized maps (5).
6. `aligner.py`       `Aligner`, the API: one image's network passes -> `Evidence`, from which
                      every map setting (tau computed and applied there) is made without another pass.

Beside them: `images.py` (the image inputs as one PIL image), `nlp.py` (spaCy nouns), `compat.py`
(names that differ between the supported diffusers and transformers releases), `errors.py` (the
damaged-file error), `model_files.py` (a local model folder checked before loading), `finite.py`
(NaN and infinity refused where they arise).
"""
