"""UNet with cross-attention: SD1.x, SD2.x (epsilon and v), SD-Turbo, SDXL,
SDXL-Turbo and Playground v2.5 (EDM). Differences are read from the
components (a second text encoder, `addition_embed_type`, the scheduler)."""

from __future__ import annotations

import contextlib
import io
import re

import torch

from elbo_t2ialign.core.adapters.base import Cond, ModelAdapter, TextBlock, compel_fragments
from elbo_t2ialign.core.adapters.schedules import NoiseSchedule, schedule_from_scheduler
from elbo_t2ialign.core.capture import CaptureAttnProcessor, LayerInfo

_PATH_RANK = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
_PATH_NAME = {"down_blocks": "down", "mid_block": "mid", "up_blocks": "up"}


class UNetAdapter(ModelAdapter):
    family = "unet"
    capture_processor = CaptureAttnProcessor
    parses_compel = True

    def __init__(self, pipe, device, dtype, resolution=None, max_sequence_length=None):
        super().__init__(pipe, device, dtype, resolution, max_sequence_length)
        self.unet = pipe.unet
        # SDXL-style conditioning: pooled text embedding + size/crop time ids
        self.is_xl = self.unet.config.get("addition_embed_type") == "text_time"
        self._compel = None  # built on first use with prompt_syntax=compel

    @property
    def denoiser(self):
        return self.pipe.unet

    @property
    def attention_tokenizer(self):
        return self.pipe.tokenizer

    @property
    def text_length(self) -> int:
        return int(self.pipe.tokenizer.model_max_length)

    @property
    def generation_kind(self) -> str:
        return "sdxl" if self.is_xl else "sd"

    @property
    def default_guidance(self) -> float:
        return 5.0 if self.is_xl else 7.5

    def text_blocks(self) -> list[TextBlock]:
        """One CLIP sequence (SDXL's two encoders share its tokens)."""
        clip = self.pipe.tokenizer
        both = (self.pipe.text_encoder, getattr(self.pipe, "text_encoder_2", None))
        encoders = tuple(e for e in both if e is not None)
        return [TextBlock("CLIP", clip, 0, int(clip.model_max_length), True, encoders)]

    def build_schedule(self) -> NoiseSchedule:
        return schedule_from_scheduler(self.pipe.scheduler)

    def _compel_encoder(self):
        """Compel set up as the reference sets it up (SDXL: both encoders' penultimate hidden states,
        pooled text from the second)."""
        if self._compel is None:
            from compel import Compel, ReturnedEmbeddingsType

            pipe = self.pipe
            if self.is_xl:  # the reference's call; compel 2.5 prints a deprecation note for it
                with contextlib.redirect_stdout(io.StringIO()):
                    self._compel = Compel(
                        tokenizer=[pipe.tokenizer, pipe.tokenizer_2],
                        text_encoder=[pipe.text_encoder, pipe.text_encoder_2],
                        returned_embeddings_type=ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED,
                        requires_pooled=[False, True],
                    )
            else:
                self._compel = Compel(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder)
        return self._compel

    def _encode_prompt(self, prompt: str) -> Cond:
        if self.compel_active:
            compel_fragments(prompt)  # refuses what Compel would encode as more than one sequence
            out = self._compel_encoder()(prompt)
            embeds, pooled = out if self.is_xl else (out, None)
        elif not self.is_xl:
            embeds, _ = self.pipe.encode_prompt(prompt, self.text_device, 1, False)
        else:
            embeds, _, pooled, _ = self.pipe.encode_prompt(
                prompt, device=self.text_device, num_images_per_prompt=1, do_classifier_free_guidance=False
            )
        if not self.is_xl:
            return {"encoder_hidden_states": embeds.to(self.device, self.dtype)}
        size = (self.resolution, self.resolution)
        proj_dim = self.pipe.text_encoder_2.config.projection_dim
        time_ids = self.pipe._get_add_time_ids(
            size, (0, 0), size, dtype=self.dtype, text_encoder_projection_dim=proj_dim
        )
        return {
            "encoder_hidden_states": embeds.to(self.device, self.dtype),
            "text_embeds": pooled.to(self.device, self.dtype),
            "time_ids": time_ids.to(self.device),
        }

    def _forward(self, x: torch.Tensor, timestep: torch.Tensor, cond: Cond) -> torch.Tensor:
        added = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]} if self.is_xl else None
        return self.net(
            x,
            timestep,
            encoder_hidden_states=cond["encoder_hidden_states"],
            added_cond_kwargs=added,
            return_dict=False,
        )[0]

    def attention_layers(self) -> list[LayerInfo]:
        """Attention layers in execution order (down, mid, up), with their token-grid side."""
        block_res = self._block_resolutions()
        modules = dict(self.unet.named_modules())
        names = [k.removesuffix(".processor") for k in self.unet.attn_processors]

        def rank(name: str) -> tuple:
            return (_PATH_RANK[name.split(".")[0]], *map(int, re.findall(r"\d+", name)))

        layers = []
        for order, name in enumerate(sorted(names, key=rank)):
            path = name.split(".")[0]
            block = path if path == "mid_block" else ".".join(name.split(".")[:2])
            kind = "cross" if modules[name].is_cross_attention else "self"
            layers.append(LayerInfo(name, kind, order, block_res[block], _PATH_NAME[path]))
        return layers

    def _block_resolutions(self) -> dict[str, int]:
        """Token-grid side of every down/mid/up block, from where the (up/down)samplers sit."""
        res, out = self.latent_size, {}
        for i, block in enumerate(self.unet.down_blocks):
            out[f"down_blocks.{i}"] = res
            if getattr(block, "downsamplers", None):
                res //= 2
        out["mid_block"] = res
        for i, block in enumerate(self.unet.up_blocks):
            out[f"up_blocks.{i}"] = res
            if getattr(block, "upsamplers", None):
                res *= 2
        return out
