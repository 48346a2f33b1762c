"""Attention capture: outputs unchanged, processors restored, maps are the right
probabilities from the right blocks, layers in execution order."""

import pytest
import torch
from conftest import FAMILIES, tiny_aligner

from elbo_t2ialign.core.adapters.base import cat_cond
from elbo_t2ialign.core.capture import (
    CaptureAttnProcessor,
    CaptureFluxAttnProcessor,
    CaptureJointAttnProcessor,
    attend_and_capture,
    attention_processors,
    resize_self,
    stage_index,
)


def _inputs(aligner, n=2, seed=0):
    ad = aligner.adapter
    g = torch.Generator().manual_seed(seed)
    z = torch.randn((n, *ad.latent_shape), generator=g)
    t = torch.tensor([20, 400][:n])
    cond = cat_cond([ad.encode_prompt("a photo of cat, dog")] * n)
    return z, t, cond


def _all_layer_weights(aligner):
    names = [layer.name for layer in aligner.layers]
    return {"cross": {n: 1.0 for n in names}, "self1": {n: 1.0 for n in names}}


@pytest.mark.parametrize("family", FAMILIES)
def test_capture_does_not_change_output_and_restores_processors(family):
    aligner = tiny_aligner(family)
    ad = aligner.adapter
    z, t, cond = _inputs(aligner)
    before = dict(attention_processors(ad.denoiser))
    plain = ad.predict(z, t, cond)
    rec = ad.recorder(_all_layer_weights(aligner), chunk_mb=0.001)  # tiny chunks: many row blocks
    with rec:
        captured = ad.predict(z, t, cond)
        installed = attention_processors(ad.denoiser)
        # every listed layer's (Z-Image's caption-only refiners are not listed: they see no image)
        assert all(
            type(installed[f"{x.name}.processor"]).__name__.startswith("Capture") for x in aligner.layers
        )
    torch.testing.assert_close(captured, plain, rtol=1e-4, atol=1e-5)
    assert {k: id(v) for k, v in attention_processors(ad.denoiser).items()} == {
        k: id(v) for k, v in before.items()
    }

    with pytest.raises(RuntimeError, match="boom"):
        with ad.recorder(_all_layer_weights(aligner)):
            raise RuntimeError("boom")
    assert {k: id(v) for k, v in attention_processors(ad.denoiser).items()} == {
        k: id(v) for k, v in before.items()
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_only_weighted_layers_are_replaced(family):
    aligner = tiny_aligner(family)
    ad = aligner.adapter
    first = aligner.layers[0].name
    before = dict(attention_processors(ad.denoiser))
    with ad.recorder({"cross": {first: 1.0}}):
        now = attention_processors(ad.denoiser)
        replaced = [k for k in now if now[k] is not before[k]]
    assert replaced == [f"{first}.processor"]


@pytest.mark.parametrize("family", FAMILIES)
def test_maps_are_probabilities(family):
    aligner = tiny_aligner(family)
    ad = aligner.adapter
    z, t, cond = _inputs(aligner)
    rec = ad.recorder({}, per_layer=True)
    with rec:
        ad.predict(z, t, cond)
    assert set(rec.layer_sums) == {layer.name for layer in aligner.layers}
    for layer in aligner.layers:
        blocks = rec.layer_sums[layer.name]
        n_img = layer.resolution**2
        row_mass = sum(rec.layer_mean(layer.name, b).sum(dim=1) for b in blocks)
        # each image query's probabilities over all keys (text and image blocks together) sum to 1
        torch.testing.assert_close(row_mass, torch.ones(n_img), rtol=0, atol=1e-5)
        assert all(rec.layer_mean(layer.name, b).min() >= 0 for b in blocks)
        if layer.kind == "cross":
            assert rec.layer_mean(layer.name, "cross").shape == (n_img, ad.text_length)
        if layer.kind == "joint":
            assert rec.layer_mean(layer.name, "cross").shape == (n_img, ad.text_length)
            assert rec.layer_mean(layer.name, "self").shape == (n_img, n_img)


def _call_order(aligner):
    """Order in which attention modules actually run, from forward pre-hooks."""
    ad = aligner.adapter
    modules = dict(ad.denoiser.named_modules())
    seen, hooks = [], []
    for layer in aligner.layers:
        hooks.append(modules[layer.name].register_forward_pre_hook(lambda m, a, n=layer.name: seen.append(n)))
    z, t, cond = _inputs(aligner, n=1)
    ad.predict(z, t, cond)
    for h in hooks:
        h.remove()
    return seen


EXPECTED = {
    # family: (number of layers, kinds, resolutions in execution order)
    "sd": (14, ["self", "cross"] * 7, [16, 16, 8, 8, 8, 8, 8, 8, 8, 8, 16, 16, 16, 16]),
    "sdxl": (22, ["self", "cross"] * 11, [8] * 2 + [4] * 4 + [4] * 4 + [4] * 8 + [8] * 4),
    "sd3": (3, ["joint"] * 3, [8] * 3),
    "flux": (2, ["joint"] * 2, [8] * 2),
    "pixart": (4, ["self", "cross"] * 2, [8] * 4),
    "flux2": (2, ["joint"] * 2, [8] * 2),
    "chroma": (2, ["joint"] * 2, [8] * 2),
    "qwenimage": (2, ["joint"] * 2, [8] * 2),
    "zimage": (2, ["self", "joint"], [8] * 2),  # the caption-only refiner is left out
    "sana": (4, ["self", "cross"] * 2, [16] * 4),
    "lumina2": (3, ["self", "joint", "joint"], [8] * 3),
    "cogview4": (2, ["joint"] * 2, [8] * 2),
    "hunyuanimage": (2, ["joint"] * 2, [8] * 2),
    "auraflow": (2, ["joint"] * 2, [8] * 2),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_layers_in_execution_order_with_kinds_and_stages(family):
    aligner = tiny_aligner(family)
    count, kinds, res = EXPECTED[family]
    assert [layer.name for layer in aligner.layers] == _call_order(aligner)
    assert len(aligner.layers) == count
    assert [layer.kind for layer in aligner.layers] == kinds
    assert [layer.resolution for layer in aligner.layers] == res
    stages = stage_index(aligner.layers)
    expected_stages = [sum(res[i] != res[i - 1] for i in range(1, j + 1)) for j in range(len(res))]
    assert [stages[layer.name] for layer in aligner.layers] == expected_stages


def _hand_probs(q, k, scale):
    """softmax(q k^T * scale), averaged over heads, summed over the batch. q, k: (B, H, S, D)."""
    return torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1).mean(1).sum(0)


class _Sink:
    """Stands in for the recorder: keeps what a processor reports."""

    chunk_mb = 0.0005
    text_length = None
    precision = "float32"

    def __init__(self):
        self.maps = {}

    def add(self, layer, maps, batch):
        self.maps = maps

    def grouping(self):
        return {}


def test_attend_and_capture_matches_sdpa_and_hand_softmax():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 10, 4, generator=g) for _ in range(3))
    out, maps = attend_and_capture(
        q,
        k,
        v,
        scale=0.5,
        image_rows=slice(2, 8),
        blocks={"a": slice(0, 2), "b": slice(2, 10)},
        chunk_mb=1e-4,
    )
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.5)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    probs = _hand_probs(q, k, 0.5)
    torch.testing.assert_close(maps["a"], probs[2:8, 0:2])
    torch.testing.assert_close(maps["b"], probs[2:8, 2:10])


def test_sd3_joint_blocks_are_image_rows_of_one_softmax():
    """[image; text]: cross = image queries x text keys, self = image x image, from one softmax."""
    from diffusers.models.attention_processor import Attention, JointAttnProcessor2_0

    torch.manual_seed(0)
    attn = Attention(
        query_dim=16,
        cross_attention_dim=None,
        added_kv_proj_dim=16,
        dim_head=4,
        heads=4,
        out_dim=16,
        context_pre_only=False,
        bias=True,
        processor=JointAttnProcessor2_0(),
    ).eval()
    x, c = torch.randn(2, 9, 16), torch.randn(2, 5, 16)
    with torch.no_grad():
        ref_x, ref_c = attn(x, encoder_hidden_states=c)
        sink = _Sink()
        attn.set_processor(CaptureJointAttnProcessor(sink, None))
        got_x, got_c = attn(x, encoder_hidden_states=c)

        def heads(t):
            return t.view(2, -1, 4, 4).transpose(1, 2)

        q = torch.cat([heads(attn.to_q(x)), heads(attn.add_q_proj(c))], dim=2)
        k = torch.cat([heads(attn.to_k(x)), heads(attn.add_k_proj(c))], dim=2)
        probs = _hand_probs(q, k, 4**-0.5)
    torch.testing.assert_close(got_x, ref_x, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_c, ref_c, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sink.maps["cross"], probs[:9, 9:])
    torch.testing.assert_close(sink.maps["self"], probs[:9, :9])


def test_flux_blocks_are_text_first_with_rope():
    """FLUX: [text; image]; the image rows start after the text, keys split the other way round."""
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    torch.manual_seed(0)
    try:
        from diffusers.models.transformers.transformer_flux import FluxAttention
    except (
        ImportError
    ):  # diffusers 0.33/0.34: the generic Attention with FLUX's processor, as its blocks build it
        from diffusers.models.attention_processor import Attention, FluxAttnProcessor2_0

        attn = Attention(
            query_dim=16,
            heads=2,
            dim_head=8,
            out_dim=16,
            added_kv_proj_dim=16,
            context_pre_only=False,
            bias=True,
            qk_norm="rms_norm",
            eps=1e-6,
            processor=FluxAttnProcessor2_0(),
        ).eval()
    else:
        attn = FluxAttention(
            query_dim=16, heads=2, dim_head=8, added_kv_proj_dim=16, context_pre_only=False, bias=True
        ).eval()
    n_txt, n_img = 3, 4
    x, c = torch.randn(1, n_img, 16), torch.randn(1, n_txt, 16)
    ids = torch.cat(
        [
            torch.zeros(n_txt, 3),
            torch.stack([torch.zeros(4), torch.arange(4.0) // 2, torch.arange(4.0) % 2], 1),
        ]
    )
    rope = FluxPosEmbed(theta=10000, axes_dim=[2, 2, 4])(ids)
    with torch.no_grad():
        ref_x, ref_c = attn(x, encoder_hidden_states=c, image_rotary_emb=rope)
        sink = _Sink()
        attn.set_processor(CaptureFluxAttnProcessor(sink, None))
        got_x, got_c = attn(x, encoder_hidden_states=c, image_rotary_emb=rope)

        def heads(t):
            return t.unflatten(-1, (-1, 8))

        q = torch.cat([attn.norm_added_q(heads(attn.add_q_proj(c))), attn.norm_q(heads(attn.to_q(x)))], 1)
        k = torch.cat([attn.norm_added_k(heads(attn.add_k_proj(c))), attn.norm_k(heads(attn.to_k(x)))], 1)
        q, k = (apply_rotary_emb(t.transpose(1, 2), rope) for t in (q, k))  # (B, H, S, D)
        probs = _hand_probs(q, k, 8**-0.5)
    torch.testing.assert_close(got_x, ref_x, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_c, ref_c, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sink.maps["cross"], probs[n_txt:, :n_txt])
    torch.testing.assert_close(sink.maps["self"], probs[n_txt:, n_txt:])


def test_cross_attention_processor_with_padding_mask():
    """PixArt-style cross-attention with an additive padding bias: padded keys get no mass."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    torch.manual_seed(0)
    attn = Attention(query_dim=16, cross_attention_dim=8, heads=2, dim_head=8, processor=AttnProcessor2_0())
    x, c = torch.randn(1, 6, 16), torch.randn(1, 5, 8)
    bias = torch.tensor([[[0.0, 0.0, 0.0, -10000.0, -10000.0]]])
    with torch.no_grad():
        ref = attn(x, encoder_hidden_states=c, attention_mask=bias)
        sink = _Sink()
        attn.set_processor(CaptureAttnProcessor(sink, None))
        got = attn(x, encoder_hidden_states=c, attention_mask=bias)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert sink.maps["cross"][:, 3:].abs().max() < 1e-6
    torch.testing.assert_close(sink.maps["cross"].sum(1), torch.ones(6))


def test_resize_self_repeats_query_rows_and_resizes_keys():
    g = torch.Generator().manual_seed(0)
    m = torch.rand(4, 4, generator=g)  # r = 2
    big = resize_self(m, 2, 4)  # (16, 16)
    keys = torch.nn.functional.interpolate(
        m.reshape(1, 4, 2, 2), size=(4, 4), mode="bilinear", align_corners=False
    ).reshape(4, 16)
    for qi in range(4):
        for qj in range(4):
            torch.testing.assert_close(big[qi * 4 + qj], keys[(qi // 2) * 2 + qj // 2])


def test_running_sums_do_not_grow_with_timesteps():
    """Memory is flat in the number of collection timesteps: same tensors, same sizes."""
    aligner = tiny_aligner("sd")
    sizes = []
    for n_steps in (2, 6):
        rec = aligner._collect(
            aligner.adapter.encode_image(_image()),
            "a photo of cat, dog",
            torch.randn(n_steps, 4, 16, 16),
            aligner.options.replace(collect_timesteps=list(range(20, 20 * n_steps + 1, 20))),
            aligner._weights,
        )
        sizes.append({k: v.numel() for k, v in rec.sums.items()})
        assert set(rec.samples.values()) == {n_steps}
    assert sizes[0] == sizes[1]


def _image():
    import numpy as np
    from PIL import Image

    return Image.fromarray((np.random.RandomState(0).rand(24, 24, 3) * 255).astype("uint8"))


def test_processors_are_the_users_own_after_any_sequence_of_calls(monkeypatch):
    """Every ordered pair of: a normal call, a call that raises inside the capture, a nested
    recorder, the same recorder entered twice, an entry that fails half way, an exit without an
    entry. Recorders refuse a second entry, so the user's processors come back every time."""
    import itertools

    from diffusers.models.attention_processor import AttnProcessor
    from PIL import Image

    from elbo_t2ialign import Aligner
    from elbo_t2ialign.core import capture
    from elbo_t2ialign.devtools.tiny import tiny_sd

    # a pipeline of its own: the shared tiny one must keep its processors for the other tests
    aligner = Aligner.from_pipeline(
        tiny_sd(), device="cpu", resolution=32, elbo_timesteps=[1, 501], collect_timesteps=[20]
    )
    ad = aligner.adapter
    own = {name: AttnProcessor() for name in attention_processors(ad.denoiser)}  # the user's, one per layer
    ad.denoiser.set_attn_processor(dict(own))  # (diffusers empties the dict it is given)
    image = Image.new("RGB", (32, 32), (90, 30, 200))
    weights = _all_layer_weights(aligner)

    def normal():
        aligner.heatmaps(image, ["cat", "dog"])

    def raising():
        def boom(self, layer, maps, batch):
            raise RuntimeError("boom inside the capture")

        with monkeypatch.context() as m:
            m.setattr(capture.AttentionRecorder, "add", boom)
            with pytest.raises(RuntimeError, match="boom inside the capture"):
                aligner.heatmaps(image, ["cat", "dog"])

    def nested():
        with ad.recorder(weights):
            with pytest.raises(RuntimeError, match="already active on this denoiser"):
                aligner.heatmaps(image, ["cat", "dog"])  # the aligner's own recorder is refused
            assert all(
                type(p).__name__.startswith("Capture") for p in attention_processors(ad.denoiser).values()
            )

    def twice():
        rec = ad.recorder(weights)
        with rec:
            with pytest.raises(RuntimeError, match="cannot be entered twice"):
                rec.__enter__()

    def failed_entry():
        rec = ad.recorder(weights)
        rec.on_active = lambda active: (_ for _ in ()).throw(RuntimeError("entry fails"))
        with pytest.raises(RuntimeError, match="entry fails"):
            with rec:
                raise AssertionError("not reached")
        rec.__exit__(None, None, None)  # an exit after a failed entry changes nothing

    def exit_only():
        ad.recorder(weights).__exit__(None, None, None)

    calls = [normal, raising, nested, twice, failed_entry, exit_only]
    for sequence in itertools.product(calls, repeat=2):
        for call in sequence:
            call()
            now = attention_processors(ad.denoiser)
            assert {k: id(v) for k, v in now.items()} == {k: id(v) for k, v in own.items()}, [
                c.__name__ for c in sequence
            ]
    assert ad._capturing == 0  # every entry that counted was matched by an exit


# SHA-256 (first 16 hex digits) of the source of each diffusers processor's __call__ that a capture
# processor repeats, in the releases it was read against (diffusers 0.33.1 and 0.42.1). A release
# that changes one fails here: read the new source, carry the change into elbo_t2ialign/core/capture.py
# if it changes the computation, and add the new digest.
FOLLOWED = {
    "CaptureAttnProcessor": (
        "diffusers.models.attention_processor:AttnProcessor2_0",
        {"8728fd0441991a1b", "bf23ea5ae4040427"},
    ),
    "CaptureJointAttnProcessor": (
        "diffusers.models.attention_processor:JointAttnProcessor2_0",
        {"a5b6f8c32e6311df", "392b6bf56c8505d1"},
    ),
    "CaptureFluxAttnProcessor": (
        "diffusers.models.transformers.transformer_flux:FluxAttnProcessor",  # 0.33: FluxAttnProcessor2_0
        {"236dd95645f14c0d", "d5b36134887ebe45"},
    ),
    "CaptureSanaCrossProcessor": (
        "diffusers.models.transformers.sana_transformer:SanaAttnProcessor2_0",
        {"01f4c3d5e7e6912b", "6a918a076d11ed30"},
    ),
    "CaptureSanaLinearProcessor": (
        "diffusers.models.attention_processor:SanaLinearAttnProcessor2_0",
        {"e75ae1143d56a89d", "c02c02e8a72102d3"},
    ),
    "CaptureLumina2AttnProcessor": (
        "diffusers.models.transformers.transformer_lumina2:Lumina2AttnProcessor2_0",
        {"e24c0e3b1ba3c4f3", "ba403b33102ba67a"},
    ),
    "CaptureCogView4AttnProcessor": (  # 0.33.1 differs in the mask it builds, which no pipeline passes
        "diffusers.models.transformers.transformer_cogview4:CogView4AttnProcessor",
        {"f0c45c2f94b39a75", "e9a16e51d1953319"},
    ),
    "CaptureAuraFlowAttnProcessor": (  # 0.33.1 norms text keys with norm_added_q: the same parameter-free norm
        "diffusers.models.attention_processor:AuraFlowAttnProcessor2_0",
        {"3605c2b39cd53127", "350824aedfae368f"},
    ),
    "CaptureHunyuanImageAttnProcessor": (  # diffusers >= 0.36 only
        "diffusers.models.transformers.transformer_hunyuanimage:HunyuanImageAttnProcessor",
        {"03b77a4e7b05bf70"},
    ),
}


@pytest.mark.parametrize("ours", sorted(FOLLOWED))
def test_followed_diffusers_processors_are_the_ones_read(ours):
    import hashlib
    import importlib
    import inspect

    import diffusers

    where, known = FOLLOWED[ours]
    module, name = where.split(":")
    try:
        followed = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):  # diffusers 0.33/0.34 keep FLUX's processor with the others
        if ours != "CaptureFluxAttnProcessor":
            pytest.skip(f"{where} is not in diffusers {diffusers.__version__}")
        followed = importlib.import_module("diffusers.models.attention_processor").FluxAttnProcessor2_0
    digest = hashlib.sha256(inspect.getsource(followed.__call__).encode()).hexdigest()[:16]
    assert digest in known, (
        f"diffusers {diffusers.__version__} changed {followed.__qualname__}.__call__ (digest {digest}), "
        f"which {ours} repeats: compare them and update capture.py and this table"
    )


# the same for the newer families' capture processors (in their adapter modules), read in diffusers
# 0.42.1 only; on a release before a family's first supported one the check is skipped
FOLLOWED_NEWER = {
    "CaptureFlux2AttnProcessor": (
        "diffusers.models.transformers.transformer_flux2:Flux2AttnProcessor",
        "0.36.0",
        {"2106c36979e28f30"},
    ),
    "CaptureFlux2ParallelAttnProcessor": (
        "diffusers.models.transformers.transformer_flux2:Flux2ParallelSelfAttnProcessor",
        "0.36.0",
        {"18a20dca47451835"},
    ),
    "CaptureQwenImageAttnProcessor": (
        "diffusers.models.transformers.transformer_qwenimage:QwenDoubleStreamAttnProcessor2_0",
        "0.37.0",
        {"e6dfad13458f15b3"},
    ),
    "CaptureZImageAttnProcessor": (
        "diffusers.models.transformers.transformer_z_image:ZSingleStreamAttnProcessor",
        "0.36.0",
        {"f8f65d350a617957"},
    ),
}


@pytest.mark.parametrize("ours", sorted(FOLLOWED_NEWER))
def test_followed_diffusers_processors_of_the_newer_families(ours):
    import hashlib
    import importlib
    import inspect

    import diffusers

    from elbo_t2ialign.core.adapters.chat import missing_release

    where, since, known = FOLLOWED_NEWER[ours]
    if missing_release(since):
        pytest.skip(f"{ours} needs diffusers >= {since} (installed: {diffusers.__version__})")
    module, name = where.split(":")
    followed = getattr(importlib.import_module(module), name)
    digest = hashlib.sha256(inspect.getsource(followed.__call__).encode()).hexdigest()[:16]
    assert digest in known, (
        f"diffusers {diffusers.__version__} changed {followed.__qualname__}.__call__ (digest {digest}), "
        f"which {ours} repeats: compare them, update its adapter module and this table"
    )
