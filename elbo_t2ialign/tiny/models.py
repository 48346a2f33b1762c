"""Tiny random-weight pipelines of every supported family, built in code (`tiny:<family>`).

No weights and no download: small configs, offline tokenizers, fixed seeds.
Used by the tests, the CPU smoke demo and the notebooks' offline mode. The
maps they give are meaningless; they exercise shapes, slices and arithmetic.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from elbo_t2ialign.tiny.tokenizers import (
    build_bert_tokenizer,
    build_clip_tokenizer,
    build_lm_tokenizer,
    build_qwen_tokenizer,
    build_word_tokenizer,
)

WORDS = [
    "a",
    "photo",
    "of",
    "and",
    "the",
    "cat",
    "dog",
    "bird",
    "car",
    "plant",
    "person",
    "red",
    "blue",
    "green",
    "circle",
    "square",
    "triangle",
    "on",
    "with",
    "sofa",
    "table",
]


def _token_fields(tokenizer) -> dict[str, int]:
    """The text-config fields a tokenizer fixes: vocabulary size, context length, special token ids."""
    return dict(
        vocab_size=len(tokenizer),
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _clip_text(tokenizer, hidden: int = 32, projection: int | None = None, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        **_token_fields(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=projection or hidden,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def _t5_text(tokenizer, d_model: int = 32, seed: int = 0):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    cfg = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(cfg).eval()


def _vae(latent_channels: int = 4, sample_size: int = 32, shift_factor: float | None = None, seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=latent_channels,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=sample_size,
        scaling_factor=0.5,
        shift_factor=shift_factor,
    ).eval()  # scale factor 2: 32 px -> 16x16 latents


def _ddpm(prediction_type: str = "epsilon"):
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type=prediction_type,
        steps_offset=1,
        clip_sample=False,
    )


def tiny_sd(prediction_type: str = "epsilon", seed: int = 0):
    """SD1.x/2.x-like: 2 cross-attention resolutions (16, 8) + mid block, 7 cross and 7 self layers."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    tok = build_clip_tokenizer(WORDS)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    ).eval()
    return StableDiffusionPipeline(
        vae=_vae(seed=seed),
        text_encoder=_clip_text(tok, seed=seed),
        tokenizer=tok,
        unet=unet,
        scheduler=_ddpm(prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_sdxl(seed: int = 0):
    """SDXL-like: two CLIP encoders, pooled embedding and time ids, a down block without attention."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    tok = build_clip_tokenizer(WORDS)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2),
        cross_attention_dim=64,
        attention_head_dim=(2, 4, 8),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,
        norm_num_groups=8,
    ).eval()
    return StableDiffusionXLPipeline(
        vae=_vae(seed=seed),
        text_encoder=_clip_text(tok, seed=seed),
        text_encoder_2=_clip_text(tok, 32, 32, seed + 1),
        tokenizer=tok,
        tokenizer_2=build_clip_tokenizer(WORDS),
        unet=unet,
        scheduler=_ddpm(),
    )


def tiny_sd3(seed: int = 0, dual_attention: bool = False):
    """SD3-like MMDiT: joint attention over [image; CLIP(77) + T5] tokens, flow matching with shift 3."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tok = build_clip_tokenizer(WORDS)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=3,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=64,
        caption_projection_dim=32,
        pooled_projection_dim=64,
        pos_embed_max_size=16,
        qk_norm="rms_norm" if dual_attention else None,
        dual_attention_layers=(0,) if dual_attention else (),
    ).eval()
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(shift_factor=0.1, seed=seed),
        text_encoder=_clip_text(tok, 32, 32, seed),
        text_encoder_2=_clip_text(tok, 32, 32, seed + 1),
        text_encoder_3=_t5_text(build_word_tokenizer(WORDS), 64),
        tokenizer=tok,
        tokenizer_2=build_clip_tokenizer(WORDS),
        tokenizer_3=build_word_tokenizer(WORDS),
    )


def tiny_flux(seed: int = 0):
    """FLUX-like: [text; image] joint attention, one double- and one single-stream block, RoPE."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tok, t5tok = build_clip_tokenizer(WORDS), build_word_tokenizer(WORDS)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=(4, 4, 8),
        guidance_embeds=False,
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True,
        base_image_seq_len=16,
        max_image_seq_len=256,
        base_shift=0.5,
        max_shift=1.15,
    )
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=_vae(shift_factor=0.1, seed=seed),
        text_encoder=_clip_text(tok, seed=seed),
        tokenizer=tok,
        text_encoder_2=_t5_text(t5tok),
        tokenizer_2=t5tok,
        transformer=transformer,
    )
    pipe.default_sample_size = 16  # 32 px images, like the other tiny models
    return pipe


def tiny_pixart(seed: int = 0):
    """PixArt-Sigma-like DiT: self- and T5 cross-attention per block, learned sigma output."""
    from diffusers import DDIMScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    t5tok = build_word_tokenizer(WORDS)
    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        sample_size=16,
        num_layers=2,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=3,
        caption_channels=32,
        in_channels=4,
        cross_attention_dim=24,
        out_channels=8,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    ).eval()
    return PixArtSigmaPipeline(
        tokenizer=t5tok,
        text_encoder=_t5_text(t5tok),
        vae=_vae(seed=seed),
        transformer=transformer,
        scheduler=DDIMScheduler(),
    )


def _gemma2_text(tokenizer, hidden: int = 32, seed: int = 0):
    """A 2-layer random Gemma-2 (Sana's and Lumina-Image 2.0's text encoder)."""
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(seed)
    cfg = Gemma2Config(
        **_token_fields(tokenizer) | dict(max_position_embeddings=512),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=64,
    )
    return Gemma2Model(cfg).eval()


def tiny_sana(seed: int = 0):
    """Sana-like: linear self-attention and Gemma cross-attention, a 2x DC autoencoder, DPM flow sigmas."""
    _require("sana")

    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel

    tok = build_lm_tokenizer(WORDS)
    torch.manual_seed(seed)
    transformer = SanaTransformer2DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=2,
        num_cross_attention_heads=2,
        cross_attention_head_dim=8,
        cross_attention_dim=16,
        caption_channels=32,
        sample_size=16,
        patch_size=1,
    ).eval()
    torch.manual_seed(seed)
    vae = AutoencoderDC(
        in_channels=3,
        latent_channels=4,
        attention_head_dim=2,
        encoder_block_types=("ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8),
        encoder_layers_per_block=(1, 1),
        decoder_layers_per_block=(1, 1),
        encoder_qkv_multiscales=((), (5,)),
        decoder_qkv_multiscales=((), (5,)),
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=0.41407,
    ).eval()  # scale factor 2: 32 px -> 16x16 latents
    scheduler = DPMSolverMultistepScheduler(
        flow_shift=3.0, use_flow_sigmas=True, prediction_type="flow_prediction"
    )
    return SanaPipeline(
        tokenizer=tok,
        text_encoder=_gemma2_text(tok, seed=seed),
        vae=vae,
        transformer=transformer,
        scheduler=scheduler,
    )


def tiny_lumina2(seed: int = 0):
    """Lumina-Image-2.0-like: Gemma text refiner, image refiner and joint blocks, 3-axis RoPE, GQA."""
    _require("lumina2")

    from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Pipeline, Lumina2Transformer2DModel

    tok = build_lm_tokenizer(WORDS)
    torch.manual_seed(seed)
    transformer = Lumina2Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        hidden_size=32,
        num_layers=2,
        num_refiner_layers=1,
        num_attention_heads=2,
        num_kv_heads=1,
        multiple_of=16,
        axes_dim_rope=(4, 6, 6),
        axes_lens=(320, 32, 32),
        cap_feat_dim=32,
    ).eval()
    pipe = Lumina2Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(shift_factor=0.1, seed=seed),
        text_encoder=_gemma2_text(tok, seed=seed),
        tokenizer=tok,
    )
    pipe.system_prompt = "Draw."  # short: the tests' text window is 16 tokens
    return pipe


# ------------------------------------------------ current families (diffusers >= 0.36)

# words of the templates the chat-encoder pipelines wrap prompts in, one token each in the tiny
# tokenizer like in the real ones (Qwen-Image drops its template's first 34 tokens: this makes the
# tiny template's prefix 34 tokens long as well)
TEMPLATE_WORDS = [
    "user",
    "assistant",
    "system",
    "Describe",
    *"the image by detailing color shape size texture quantity text spatial relationships objects background".split(),
]


def _qwen_tokenizer():
    return build_qwen_tokenizer([*WORDS, *TEMPLATE_WORDS])


def _qwen3_text(tokenizer, hidden: int = 16, layers: int = 2, causal_lm: bool = False, seed: int = 0):
    """A Qwen3 text model (FLUX.2 [klein], Z-Image) of `layers` tiny layers."""
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

    torch.manual_seed(seed)
    cfg = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=1024,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    return (Qwen3ForCausalLM if causal_lm else Qwen3Model)(cfg).eval()


def tiny_flux2(seed: int = 0):
    """FLUX.2 [klein]-like: Qwen3 text (27 layers: the pipeline stacks hidden states 9, 18 and 27),
    chat template, 2x2-patchified batch-normalised latents, one double- and one single-stream block."""
    _require("flux2")
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )

    tok = _qwen_tokenizer()
    torch.manual_seed(seed)
    vae = AutoencoderKLFlux2(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    ).eval()
    with torch.no_grad():  # batch-norm statistics other than (0, 1), so the normalisation shows
        vae.bn.running_mean.uniform_(-0.2, 0.2)
        vae.bn.running_var.uniform_(0.5, 2.0)
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=3 * 16,
        timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=False,
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential")
    pipe = Flux2KleinPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=_qwen3_text(tok, layers=27, causal_lm=True, seed=seed),
        tokenizer=tok,
        transformer=transformer,
    )
    pipe.default_sample_size = 16  # 32 px images, like the other tiny models
    return pipe


def tiny_flux2_dev(seed: int = 0):
    """FLUX.2 [dev]-like (`Flux2Pipeline`): a Mistral-3 text model (30 layers: the pipeline stacks hidden
    states 10, 20 and 30), the system message, guidance embedding. The Pixtral processor the real
    pipeline tokenizes with needs torchvision; a tokenizer with the same chat-template call stands in
    for it. Not in BUILDERS (the [klein] builder covers the shared transformer in every family test)."""
    _require("flux2")
    from diffusers import Flux2Pipeline, Flux2Transformer2DModel
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    klein = tiny_flux2(seed)
    tok = klein.tokenizer
    torch.manual_seed(seed)
    text = dict(
        model_type="mistral",
        vocab_size=len(tok),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=30,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=1024,
        pad_token_id=tok.pad_token_id,
    )
    vision = dict(
        model_type="pixtral",
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        head_dim=8,
        patch_size=2,
        image_size=32,
    )
    config = Mistral3Config(text_config=text, vision_config=vision, spatial_merge_size=1, image_token_index=0)
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=3 * 16,
        timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=True,
    ).eval()
    pipe = Flux2Pipeline(
        scheduler=klein.scheduler,
        vae=klein.vae,
        text_encoder=Mistral3ForConditionalGeneration(config).eval(),
        tokenizer=tok,
        transformer=transformer,
    )
    pipe.default_sample_size = 16
    return pipe


def tiny_chroma(seed: int = 0):
    """Chroma-like: FLUX.1's layout with T5 text only, no pooled text or guidance, a text mask."""
    _require("chroma")
    from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    t5tok = build_word_tokenizer(WORDS)
    torch.manual_seed(seed)
    transformer = ChromaTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        axes_dims_rope=(4, 4, 8),
        approximator_num_channels=8,
        approximator_hidden_dim=32,
        approximator_layers=1,
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True,
        base_image_seq_len=16,
        max_image_seq_len=256,
        base_shift=0.5,
        max_shift=1.15,
    )
    pipe = ChromaPipeline(
        scheduler=scheduler,
        vae=_vae(shift_factor=0.1, seed=seed),
        text_encoder=_t5_text(t5tok, seed=seed),
        tokenizer=t5tok,
        transformer=transformer,
    )
    pipe.default_sample_size = 16
    return pipe


def tiny_qwenimage(seed: int = 0):
    """Qwen-Image-like: Qwen2.5-VL text behind the pipeline's instruction template (its first 34
    tokens dropped), the video VAE's one frame, two joint-attention blocks with 3-axis RoPE."""
    _require("qwenimage")
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tok = _qwen_tokenizer()
    torch.manual_seed(seed)
    text = dict(
        vocab_size=len(tok),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=1024,
        rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]},
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    vision = dict(
        depth=1,
        hidden_size=16,
        intermediate_size=32,
        num_heads=2,
        out_hidden_size=16,
        patch_size=2,
        spatial_merge_size=1,
        temporal_patch_size=1,
        fullatt_block_indexes=[0],
    )
    config = Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, **{k: text[k] for k in ("vocab_size", "hidden_size")}
    )
    text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    z_dim = 4
    vae = AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=z_dim,
        dim_mult=[1, 2],
        num_res_blocks=1,
        temperal_downsample=[False],
        latents_mean=[0.1, -0.2, 0.05, 0.3],
        latents_std=[1.5, 0.8, 1.2, 2.0],
    ).eval()  # scale factor 2: 32 px -> 16x16 latents
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=4 * z_dim,
        out_channels=z_dim,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=16,
        axes_dims_rope=(4, 6, 6),
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True,
        base_image_seq_len=16,
        max_image_seq_len=256,
        base_shift=0.5,
        max_shift=0.9,
        shift_terminal=0.02,
        time_shift_type="exponential",
    )
    pipe = QwenImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok, transformer=transformer
    )
    pipe.default_sample_size = 16
    return pipe


def tiny_zimage(seed: int = 0):
    """Z-Image-like single-stream DiT: Qwen3 text behind the chat template, one image-only refiner, one
    caption-only refiner and one joint block over [image; caption], 3-axis RoPE, fixed shift 3."""
    _require("zimage")
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

    tok = _qwen_tokenizer()
    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=4,
        dim=32,
        n_layers=1,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=16,
        axes_dims=[4, 6, 6],
        axes_lens=[256, 32, 32],
    ).eval()
    with torch.no_grad():  # the pad tokens start at zero; random ones show where they sit
        transformer.x_pad_token.normal_()
        transformer.cap_pad_token.normal_()
    pipe = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(shift_factor=0.1, seed=seed),
        text_encoder=_qwen3_text(tok, seed=seed),
        tokenizer=tok,
        transformer=transformer,
    )
    pipe.default_sample_size = 16
    return pipe


def tiny_cogview4(seed: int = 0):
    """CogView4-like: [GLM text; image] joint attention, image RoPE, size conditions, linear time shift."""
    _require("cogview4")

    from diffusers import CogView4Pipeline, CogView4Transformer2DModel, FlowMatchEulerDiscreteScheduler
    from transformers import GlmConfig, GlmModel

    tok = build_lm_tokenizer(WORDS, prefix=("[gMASK]", "<sop>"))
    torch.manual_seed(seed)
    glm = GlmModel(
        GlmConfig(
            **_token_fields(tok) | dict(max_position_embeddings=512),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
        )
    ).eval()
    torch.manual_seed(seed)
    transformer = CogView4Transformer2DModel(
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        text_embed_dim=32,
        time_embed_dim=16,
        condition_dim=8,
        pos_embed_max_size=16,
        sample_size=16,
        rope_axes_dim=(16, 16),
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=16,
        base_shift=0.25,
        max_shift=0.75,
        use_dynamic_shifting=True,
        time_shift_type="linear",
    )
    return CogView4Pipeline(
        tokenizer=tok, text_encoder=glm, vae=_vae(seed=seed), transformer=transformer, scheduler=scheduler
    )


def tiny_hunyuanimage(seed: int = 0):
    """HunyuanImage-2.1-like: Qwen2.5-VL text behind the template (first 34 tokens dropped) and a ByT5
    glyph encoder, one double- and one single-stream block, a 2x HunyuanImage VAE, static shift."""
    _require("hunyuanimage")

    from diffusers import (
        AutoencoderKLHunyuanImage,
        FlowMatchEulerDiscreteScheduler,
        HunyuanImagePipeline,
        HunyuanImageTransformer2DModel,
    )
    from transformers import ByT5Tokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tok = _qwen_tokenizer()
    torch.manual_seed(seed)
    text = dict(
        vocab_size=len(tok),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=1024,
        rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]},
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    vision = dict(
        depth=1,
        hidden_size=16,
        intermediate_size=32,
        num_heads=2,
        out_hidden_size=16,
        patch_size=2,
        spatial_merge_size=1,
        temporal_patch_size=1,
        fullatt_block_indexes=[0],
    )
    config = Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, **{k: text[k] for k in ("vocab_size", "hidden_size")}
    )
    text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    byt5 = ByT5Tokenizer()
    glyph_encoder = _t5_text(byt5, d_model=16, seed=seed)
    torch.manual_seed(seed)
    vae = AutoencoderKLHunyuanImage(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(32, 32),  # GroupNorm(32)
        layers_per_block=1,
        spatial_compression_ratio=2,
        sample_size=32,
        scaling_factor=0.75,
    ).eval()  # 32 px -> 16x16 latents
    transformer = HunyuanImageTransformer2DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        patch_size=(2, 2),
        text_embed_dim=16,
        text_embed_2_dim=16,
        rope_axes_dim=(4, 4),
    ).eval()
    pipe = HunyuanImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tok,
        text_encoder_2=glyph_encoder,
        tokenizer_2=byt5,
        transformer=transformer,
    )
    pipe.default_sample_size = 16
    pipe.tokenizer_2_max_length = 8  # the tests' text is short (the pipeline: 128 glyph bytes)
    return pipe


def tiny_auraflow(seed: int = 0):
    """AuraFlow-like: 8 register tokens + T5 text, one joint and one single-stream block, static shift."""
    from diffusers import AuraFlowPipeline, AuraFlowTransformer2DModel, FlowMatchEulerDiscreteScheduler

    t5tok = build_word_tokenizer(WORDS)
    # the pipeline passes every tokenizer output to the encoder; like AuraFlow's own tokenizer, give no
    # token_type_ids (transformers 4.x's fast tokenizer would)
    t5tok.model_input_names = ["input_ids", "attention_mask"]
    torch.manual_seed(seed)
    transformer = AuraFlowTransformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        num_mmdit_layers=1,
        num_single_dit_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=16,
        out_channels=4,
        pos_embed_max_size=64,
    ).eval()
    with torch.no_grad():  # default-initialised AdaLN gates are ~0.07: the text would barely reach the output
        for name, module in transformer.named_modules():
            if name.endswith("norm1.linear"):
                module.weight.mul_(20.0)
    return AuraFlowPipeline(
        tokenizer=t5tok,
        text_encoder=_t5_text(t5tok, seed=seed),
        vae=_vae(seed=seed),
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.73),
    )


# the first diffusers release each newer tiny model needs (its adapter's); older releases skip them
SINCE = {"flux2": "0.37.0", "chroma": "0.34.0", "qwenimage": "0.37.0", "zimage": "0.36.0"}
SINCE["hunyuanimage"] = "0.36.0"  # Sana (0.32), Lumina2 and CogView4 (0.33) are in the floor


def unavailable(name: str) -> str | None:
    """Why the tiny model `name` cannot be built with the installed diffusers, or None."""
    from elbo_t2ialign.core.adapters.chat import missing_release

    installed = missing_release(SINCE[name]) if name in SINCE else None
    return (
        None
        if installed is None
        else f"tiny:{name} needs diffusers >= {SINCE[name]} (installed: {installed})"
    )


def _require(name: str) -> None:
    reason = unavailable(name)
    if reason is not None:
        from elbo_t2ialign.core.adapters.chat import ReleaseError

        raise ReleaseError(reason)


# text positions the tests give each tiny model (max_sequence_length): 16 T5 tokens, more where a
# chat template wraps the prompt (the templates alone take 10 to 14 positions)
TEST_TEXT_LENGTHS = {"flux2": 32, "qwenimage": 32, "zimage": 32}

BUILDERS = {
    "sd": tiny_sd,
    "sdxl": tiny_sdxl,
    "sd3": tiny_sd3,
    "flux": tiny_flux,
    "pixart": tiny_pixart,
    "flux2": tiny_flux2,
    "chroma": tiny_chroma,
    "qwenimage": tiny_qwenimage,
    "zimage": tiny_zimage,
    "sana": tiny_sana,
    "lumina2": tiny_lumina2,
    "cogview4": tiny_cogview4,
    "hunyuanimage": tiny_hunyuanimage,
    "auraflow": tiny_auraflow,
}


TINY_PREFIX = "tiny:"  # model id "tiny:<name>": BUILDERS[<name>]() (the commands accept it as model.id)


def is_tiny(model_id: object) -> bool:
    return str(model_id).startswith(TINY_PREFIX)


def load_tiny(model_id: str):
    """The pipeline of model id "tiny:<name>"; FileNotFoundError (like an unreachable model) naming
    the tiny models there are."""
    name = str(model_id)[len(TINY_PREFIX) :]
    if not is_tiny(model_id) or name not in BUILDERS:
        raise FileNotFoundError(
            f"unknown tiny model {model_id!r}; choose one of {[TINY_PREFIX + k for k in BUILDERS]}"
        )
    return BUILDERS[name]()


def tiny_aligner_from_config(model_cfg, options, device: str = "auto"):
    """`Aligner.from_config` for a model config whose id is "tiny:<name>"."""
    from elbo_t2ialign.core.aligner import Aligner

    return Aligner.from_pipeline(
        load_tiny(model_cfg["id"]),
        device=device,
        dtype=model_cfg.get("dtype") or "auto",
        resolution=model_cfg.get("resolution"),
        max_sequence_length=model_cfg.get("max_sequence_length"),
        options=options,
    )


# ------------------------------------------------ scorers and captioners

# the text and vision towers of the tiny CLIP scorer and BLIP captioner (32-px images)
SMALL_ENCODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
SMALL_VISION = dict(SMALL_ENCODER, image_size=32, patch_size=8)


def tiny_clip(seed: int = 0):
    """(model, tokenizer, image processor) of a random 32-px CLIP built in code, offline."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    tok = build_clip_tokenizer(WORDS)
    text = dict(**SMALL_ENCODER, **_token_fields(tok))
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=SMALL_VISION, projection_dim=16)).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return model, tok, processor


# The shapes world's caption words (`testbed.world.VOCABULARY`, which tests/test_testbed_world.py
# checks this against; this module sits below the testbed and cannot import it): the vocabulary of
# the "tiny-shapes" captioner, whose captions the testbed model's tokenizer reads word by word.
SHAPES_WORDS = (
    "a", "an", "photo", "of", "and",
    "circle", "square", "triangle", "star", "cross", "ring", "diamond", "heart",
)  # fmt: skip


def tiny_blip(seed: int = 0, words: Iterable[str] | None = None):
    """(model, processor) of a random BLIP captioner for 32-px inputs, built in code, offline; its
    vocabulary is `words` (default: the shapes world's words and the tiny models' `WORDS`)."""
    import torch
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    tok = build_bert_tokenizer([*SHAPES_WORDS, *WORDS] if words is None else list(words))
    # BLIP's decoder ends a caption at [SEP]
    text = dict(
        **SMALL_ENCODER,
        **_token_fields(tok) | dict(eos_token_id=tok.sep_token_id),
        encoder_hidden_size=32,
        sep_token_id=tok.sep_token_id,
    )
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(
        BlipConfig(text_config=text, vision_config=SMALL_VISION, projection_dim=16)
    )
    processor = BlipProcessor(
        image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok
    )
    return model.eval(), processor
