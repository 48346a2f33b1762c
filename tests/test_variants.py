"""Family variants that differ only in data: SD3.5 dual attention, EDM (Playground), v-prediction."""

import numpy as np
import torch
from PIL import Image

from elbo_t2ialign import Aligner
from elbo_t2ialign.devtools.tiny import tiny_sd, tiny_sd3, tiny_sdxl

IMG = Image.fromarray((np.random.RandomState(0).rand(32, 32, 3) * 255).astype(np.uint8))
FAST = {"elbo_timesteps": [1, 501], "collect_timesteps": [20, 60]}


def _call_order(aligner):
    modules = dict(aligner.adapter.denoiser.named_modules())
    seen = []
    hooks = [
        modules[x.name].register_forward_pre_hook(lambda m, a, n=x.name: seen.append(n))
        for x in aligner.layers
    ]
    ad = aligner.adapter
    ad.predict(torch.zeros(1, 4, 16, 16), torch.tensor([10]), ad.encode_prompt("a photo of cat"))
    for h in hooks:
        h.remove()
    return seen


def test_sd35_dual_attention_layers():
    aligner = Aligner.from_pipeline(
        tiny_sd3(dual_attention=True), device="cpu", resolution=32, max_sequence_length=16, **FAST
    )
    assert [(x.name, x.kind) for x in aligner.layers] == [
        ("transformer_blocks.0.attn", "joint"),
        ("transformer_blocks.0.attn2", "self"),
        ("transformer_blocks.1.attn", "joint"),
        ("transformer_blocks.2.attn", "joint"),
    ]
    assert [x.name for x in aligner.layers] == _call_order(aligner)
    res = aligner.heatmaps(IMG, ["cat", "dog"])
    np.testing.assert_allclose(sorted(res.tau.values()), [1.0, 3.0], rtol=1e-6)  # two classes: 1 and strength
    # the Gaussian runs over the three joint layers only; the image-only attn2 feeds refinement
    assert set(aligner._weights["cross"]) == {
        "transformer_blocks.0.attn",
        "transformer_blocks.1.attn",
        "transformer_blocks.2.attn",
    }
    assert aligner._weights["self2"]["transformer_blocks.0.attn2"] == 1.0


def test_edm_scheduler_selects_edm_schedule_and_runs():
    from diffusers import EDMDPMSolverMultistepScheduler

    pipe = tiny_sdxl()
    pipe.scheduler = EDMDPMSolverMultistepScheduler(sigma_schedule="exponential")
    aligner = Aligner.from_pipeline(pipe, device="cpu", resolution=32, **FAST)
    assert type(aligner.adapter.schedule).__name__ == "EDMSchedule"
    res = aligner.heatmaps(IMG, ["cat", "dog"])
    assert all(np.isfinite(v) for v in res.losses.values())


def test_v_prediction_model_scores_in_epsilon_space():
    aligner = Aligner.from_pipeline(tiny_sd("v_prediction"), device="cpu", **FAST)
    ad = aligner.adapter
    z0 = ad.encode_image(IMG)
    eps = torch.randn(1, *z0.shape[1:], generator=torch.Generator().manual_seed(0))
    t = torch.tensor([501])
    z_t = ad.schedule.add_noise(z0, eps, t)
    v = ad.network(z_t, t, ad.encode_prompt("a photo of cat"))
    a, b = (float(c) for c in ad.schedule.coefficients(t))
    torch.testing.assert_close(ad.predict(z_t, t, ad.encode_prompt("a photo of cat")), a * v + b * z_t)
