"""Run the reference implementation's own code side by side with this project, on the same model,
image and noise, and print how far the ELBO losses, taus and heatmaps are apart.

Needs a checkout of the reference (github VCG-team/elbo-t2ialign) and its extra import `einops`
(`pip install einops`); `cv2`, used by the reference only to write PNGs, is stubbed. The model is
the tiny SD1.5-structured pipeline of `elbo_t2ialign.devtools.tiny` with attention sharpened (bench builder),
so it runs offline on a CPU in seconds:

    python scripts/reference_parity.py --reference ../elbo-t2ialign --width 56 --height 40
"""

from __future__ import annotations

import argparse
import sys
import types

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image

from elbo_t2ialign import Aligner
from elbo_t2ialign.devtools.bench import ATTENTION_SHARPNESS, sharpen_attention
from elbo_t2ialign.devtools.tiny import BUILDERS


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reference", required=True, help="folder of a checkout of the reference implementation")
    p.add_argument("--width", type=int, default=56)
    p.add_argument("--height", type=int, default=40)
    p.add_argument("--seed", type=int, default=4307)
    p.add_argument("--classes", nargs="+", default=["cat", "plant", "dog"])
    args = p.parse_args(argv)
    sys.path.insert(0, args.reference)
    torch.compile = lambda module, **kw: module  # the reference compiles its VAE; not needed here
    sys.modules.setdefault("cv2", types.SimpleNamespace(imwrite=lambda *a, **k: None))
    import run_segmentation as ref_run  # noqa: E402  (the reference's modules)
    from utils.attention_control import AttnProcessor, aggregate_cross_att, aggregate_self_att
    from utils.diffusion import Diffusion

    pipe = BUILDERS["sd"]()
    sharpen_attention(pipe.unet, ATTENTION_SHARPNESS / 2)
    aligner = Aligner.from_pipeline(pipe, device="cpu", resolution=32)
    rng = np.random.RandomState(args.seed)
    image = Image.fromarray((rng.rand(args.height, args.width, 3) * 255).astype(np.uint8))
    ours = aligner.heatmaps(image, args.classes, seed=args.seed)
    n_stages = 3  # the tiny UNet: 16 / 8 / 16; the method's [1,0,..,1] / [0,..,1] for its stage count
    cfg = OmegaConf.create(
        {
            "cross_gaussian_var": aligner.options.gaussian_sigma,
            "self_weight": [[1] + [0] * (n_stages - 2) + [1], [0] * (n_stages - 1) + [1]],
        }
    )

    # the reference's per-image loop (run_segmentation.py), fed the noise this project draws
    pipe.unet.set_attn_processor(AttnProcessor())
    hook, diffusion = ref_run.AvgAttentionStoreHook(pipe), Diffusion(pipe)
    z = diffusion.encode_vae_image(image).float()
    collect_noise, elbo_noise = aligner._draw_noise(z, aligner.options, args.seed)
    timesteps = aligner.options.elbo_timesteps
    losses = torch.stack(
        [
            sum(
                diffusion.get_elbo(z, diffusion.encode_prompt(f"a photo of {c}"), t, elbo_noise[i : i + 1])
                for i, t in enumerate(timesteps)
            )
            for c in args.classes
        ]
    )
    taus = 3.0 ** ((losses - losses.min()) / (losses.max() - losses.min() + 1e-10))
    prompt = "a photo of " + ", ".join(args.classes)
    emb = diffusion.encode_prompt(prompt)
    hook.reset()
    for i, t in enumerate(aligner.options.collect_timesteps):
        diffusion.get_elbo(z, emb, t, collect_noise[i : i + 1], {"attention_hooks": [hook]})
    refined = aggregate_self_att(hook, 0, cfg)
    print(f"latent max diff {(aligner.adapter.encode_image(image) - z).abs().max().item():.2e}")
    worst = 0.0
    for k, c in enumerate(args.classes):
        cross = aggregate_cross_att(hook, 0, ours.token_positions[c], cfg)
        cross = ((cross - cross.min()) / (cross.max() - cross.min())) ** taus[k]
        r = round((cross.shape[0]) ** 0.5)
        mask = F.interpolate(
            (refined @ cross).view(1, 1, r, r), size=(args.height, args.width), mode="bilinear"
        )
        mask = ((mask - mask.min()) / (mask.max() - mask.min()))[0, 0].numpy()
        diff = float(np.abs(mask - ours.heatmaps[c]).max())
        worst = max(worst, diff)
        print(
            f"{c}: loss reference {losses[k].item():.6f} here {ours.losses[c]:.6f}; tau reference "
            f"{taus[k].item():.6f} here {ours.tau[c]:.6f}; max heatmap difference {diff:.2e}"
        )
    print(f"max heatmap difference over classes: {worst:.2e}")
    return worst


if __name__ == "__main__":
    main()
