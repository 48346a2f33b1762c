"""The captured attention is the model's own, for every tiny family in `BUILDERS`.

For each family the denoiser runs twice on the same inputs (two samples, two timesteps, one prompt):
1. with the diffusers processors its attention modules come with (the reference), while
   `torch.nn.functional.scaled_dot_product_attention` is wrapped to record, per captured attention
   module, the query, key, value, mask and scale that diffusers' own processor passes it and the
   output it gets back (every diffusers processor of these families ends in that call on CPU:
   directly, or through `attention_dispatch.dispatch_attention_fn`'s native backend);
2. with capture on in every layer (`AttentionRecorder`, per-layer sums, tiny chunks), while the
   recorder's `probe` keeps the per-head probabilities each capture processor computes.

It then asserts, per family and layer:
(a) the denoiser's output with capture equals its output with diffusers' processors
    (float32, `rtol=1e-4, atol=1e-5`);
(b) the captured probabilities are softmax(Q K^T * scale + mask) of the reference's own Q, K and mask,
    computed here directly from them (`atol=1e-5`), and, multiplied with the reference's values, give
    the reference's attention output for the captured query rows (`rtol=1e-4, atol=1e-5`); the
    image -> text map the recorder keeps is their head mean over the text columns (`atol=1e-5`).
The largest differences are printed (`pytest -s`), one line per family.

What a new family needs to be covered: an adapter (registered in `core/adapters/__init__.py`) and a
tiny builder in `devtools/tiny.BUILDERS`; nothing here. Its capture processor computes the attention
through `_CaptureBase.attend(query, key, value, scale=, image_rows=, blocks=, mask=)` (core/capture.py),
which hands every chunk of per-head probabilities to the recorder's `probe` as
`probe(layer, probs (B, H, rows, Sk), first_row, blocks)`; the query, key and value it passes must be
the ones the diffusers processor passes to SDPA (same layout, same key order), with `blocks` naming the
text ("cross") and image ("self") key columns. A processor whose family computes some attention
without SDPA (e.g. a linear attention) does not capture that layer, so the test has nothing to match
it with. Each captured layer must run exactly once per denoiser call.
"""

from collections import defaultdict

import pytest
import torch
from conftest import FAMILIES, tiny_aligner

from elbo_t2ialign.core.adapters.base import cat_cond

OUT_TOL = dict(rtol=1e-4, atol=1e-5)
PROB_ATOL = 1e-5


def _inputs(ad, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn((2, *ad.latent_shape), generator=g)
    t = torch.tensor([20, 400])
    return z, t, cat_cond([ad.encode_prompt("a photo of cat, dog")] * 2)


def _reference_run(ad, names, z, t, cond, monkeypatch):
    """The denoiser's output with its own processors, and per captured module the SDPA calls made
    inside it: (query, key, value, mask, scale, output), as diffusers' processor made them."""
    modules = dict(ad.denoiser.named_modules())
    calls, current, hooks = defaultdict(list), [], []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        out = sdpa(
            query,
            key,
            value,
            attn_mask=attn_mask,
            dropout_p=dropout_p,
            is_causal=is_causal,
            scale=scale,
            **kw,
        )
        if current:
            assert dropout_p == 0.0 and not is_causal
            calls[current[-1]].append((query, key, value, attn_mask, scale, out))
        return out

    for name in names:
        hooks.append(modules[name].register_forward_pre_hook(lambda m, a, n=name: current.append(n)))
        hooks.append(modules[name].register_forward_hook(lambda m, a, o: current.pop() and None))
    try:
        with monkeypatch.context() as m:
            m.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
            plain = ad.predict(z, t, cond)
    finally:
        for h in hooks:
            h.remove()
    return plain, calls


def _reference_probs(query, key, mask, scale):
    """softmax(Q K^T * scale + mask) per head, computed directly. (B, H, Sq, Sk) float64."""
    q, k = query.double(), key.double()
    if k.shape[1] != q.shape[1]:  # grouped-query attention: each key head serves several query heads
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if mask is not None:
        scores = (
            scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.double()
        )
    return scores.softmax(dim=-1)


DIFFERENCES = {}


def own_attention_differences(aligner, monkeypatch) -> dict[str, float]:
    """Runs the comparison (the module docstring) on `aligner`'s model; asserts (a) and (b) within the
    tolerances and returns the largest differences found."""
    ad = aligner.adapter
    names = [layer.name for layer in aligner.layers]
    z, t, cond = _inputs(ad)
    plain, calls = _reference_run(ad, names, z, t, cond, monkeypatch)

    probes = defaultdict(list)
    rec = ad.recorder(
        {"cross": dict.fromkeys(names, 1.0), "self1": dict.fromkeys(names, 1.0)},
        per_layer=True,
        chunk_mb=0.002,
    )
    rec.probe = lambda layer, probs, lo, blocks: probes[layer.name].append((probs.clone(), lo, blocks))
    with rec:
        captured = ad.predict(z, t, cond)

    # (a) the same output
    torch.testing.assert_close(captured, plain, **OUT_TOL)
    worst = {"output": (captured - plain).abs().max().item(), "probs": 0.0, "P@V": 0.0, "map": 0.0}

    # linear (kernel) attention makes no softmax and no SDPA call: Sana's is checked against its own
    # ReLU kernel in tests/test_lm_families.py
    linear = set(getattr(ad, "linear_attention_layers", list)())
    names = [n for n in names if n not in linear]
    assert set(probes) == set(names), "every captured layer reports its probabilities"
    for name in names:
        assert len(calls[name]) == 1, f"{name}: diffusers' processor made {len(calls[name])} SDPA calls"
        query, key, value, mask, scale, out = calls[name][0]
        chunks = sorted(probes[name], key=lambda c: c[1])
        blocks = chunks[0][2]
        first = chunks[0][1]
        probs = torch.cat([c[0] for c in chunks], dim=2).double()  # (B, H, rows, Sk)
        rows = slice(first, first + probs.shape[2])
        assert [c[1] for c in chunks] == list(
            torch.tensor([c[0].shape[2] for c in chunks]).cumsum(0).sub(chunks[0][0].shape[2]).add(first)
        ), f"{name}: the chunks cover the image rows once, in order"
        # the blocks split the keys: every key column in exactly one block
        sk = key.shape[2]
        covered = sorted(i for blk in blocks.values() for i in range(sk)[blk])
        assert covered == list(range(sk)), f"{name}: blocks {blocks} do not partition {sk} keys"

        # (b) the model's own probabilities, and times the model's own values its own output
        ref = _reference_probs(query, key, mask, scale)[:, :, rows]
        d_probs = (probs - ref).abs().max().item()
        assert d_probs < PROB_ATOL, f"{name}: probabilities differ from softmax(QK^T) by {d_probs:.2e}"
        v = value.double()
        if v.shape[1] != probs.shape[1]:
            v = v.repeat_interleave(probs.shape[1] // v.shape[1], dim=1)
        product = sum(probs[..., blk] @ v[:, :, blk] for blk in blocks.values())
        torch.testing.assert_close(product, out[:, :, rows].double(), **OUT_TOL)
        d_pv = (product - out[:, :, rows].double()).abs().max().item()
        # the recorded image -> text map: head mean, batch sum of the text columns
        if "cross" in blocks:
            recorded = rec.layer_sums[name]["cross"].double()
            expected = probs[..., blocks["cross"]].mean(1).sum(0)
            # a family whose text block varies with the prompt pads the map with zero columns
            assert recorded.shape[1] >= expected.shape[1] and not recorded[:, expected.shape[1] :].any()
            d_map = (recorded[:, : expected.shape[1]] - expected).abs().max().item()
            assert d_map < PROB_ATOL, f"{name}: the recorded cross map is not the probabilities' head mean"
            worst["map"] = max(worst["map"], d_map)
        worst["probs"] = max(worst["probs"], d_probs)
        worst["P@V"] = max(worst["P@V"], d_pv)
    return worst


@pytest.mark.parametrize("family", FAMILIES)
def test_captured_attention_is_the_models_own(family, monkeypatch):
    aligner = tiny_aligner(family)
    names = [layer.name for layer in aligner.layers]
    worst = DIFFERENCES[family] = own_attention_differences(aligner, monkeypatch)
    print(
        f"\n{family:12s} layers {len(names):2d}  max |output diff| {worst['output']:.1e}  "
        f"max |P - softmax| {worst['probs']:.1e}  max |P V - O| {worst['P@V']:.1e}  "
        f"max |map - mean P| {worst['map']:.1e}"
    )
