"""ELBO-weighted sampling on tiny UNet and SD3-like models: steps, determinism, baseline (method.md §7)."""

import pytest
import torch
from conftest import guided_conditionings, tiny_pipeline
from diffusers import DDIMScheduler

from elbo_t2ialign.core.adapters import adapter_for
from elbo_t2ialign.devtools.tiny import tiny_sd
from elbo_t2ialign.generation.sampler import ElboSampler, ddim_step, euler_step, sampling_timesteps

PROMPT = "a photo of a cat and a dog"
PHRASES = ["a cat", "a dog"]


def sampler(family: str, **kwargs) -> ElboSampler:
    ad = adapter_for(tiny_pipeline(family), torch.device("cpu"), torch.float32, 32, max_sequence_length=16)
    return ElboSampler(ad, **{"steps": 2, "strength": 3.0, **kwargs})


def test_sampling_timesteps_match_the_reference_grid():
    steps = sampling_timesteps(1000, 50)
    assert len(steps) == 50 and steps[0] == (999, 979) and steps[1] == (979, 959) and steps[-1] == (19, 0)
    assert sampling_timesteps(1000, 2) == [(999, 499), (499, 0)]
    with pytest.raises(ValueError):
        sampling_timesteps(1000, 0)
    with pytest.raises(ValueError, match="steps_rule must be one of"):
        sampling_timesteps(1000, 7, "leading")


@pytest.mark.parametrize(
    ("steps", "taken"), [(3, 3), (6, 7), (7, 8), (15, 16), (30, 31), (50, 50), (999, 999)]
)
def test_steps_that_do_not_divide_1000_follow_the_reference_range(steps, taken):
    """The reference samples on range(999, 0, -1000 // steps) and steps each t to max(0, t - stride)."""
    stride = 1000 // steps
    reference = [(t, max(0, t - stride)) for t in range(999, 0, -stride)]
    assert sampling_timesteps(1000, steps) == reference
    assert len(reference) == taken  # ceil(999 / stride): one more than asked for 6, 7, 15, 30
    exact = sampling_timesteps(1000, steps, "exact")
    assert len(exact) == steps and [t for t, _ in exact] == [t for t, _ in reference][:steps]
    assert exact[-1][1] == 0


def test_seven_steps_take_eight_unless_exact():
    assert len(sampler("sd", steps=7).sample(PROMPT, PHRASES, seed=0).weights) == 8  # every step weighted
    assert [t for t, _ in sampler("sd", steps=7).timesteps] == [999, 857, 715, 573, 431, 289, 147, 5]
    assert len(sampler("sd", steps=7, steps_rule="exact").sample(PROMPT, PHRASES, seed=0).weights) == 7


def test_ddim_step_equals_diffusers_ddim():
    s = sampler("sd")
    ref = DDIMScheduler.from_config(tiny_pipeline("sd").scheduler.config)
    ref.set_timesteps(50)  # prev timestep of t is t - 1000 // 50
    gen = torch.Generator().manual_seed(0)
    z, eps = torch.randn(2, 1, 4, 16, 16, generator=gen)
    ours = ddim_step(s.adapter.schedule, z, 999, 979, eps)
    theirs = ref.step(eps, 999, z, eta=0.0).prev_sample
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_ddim_on_a_v_prediction_model_equals_diffusers_ddim():
    ad = adapter_for(tiny_sd(prediction_type="v_prediction"), torch.device("cpu"), torch.float32, 32)
    ref = DDIMScheduler.from_config(ad.pipe.scheduler.config)
    ref.set_timesteps(50)
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    cond = ad.encode_prompt("a cat")
    raw = ad.network(z, torch.tensor([999]), cond).float()  # v
    ours = ddim_step(ad.schedule, z, 999, 979, ad.predict(z, torch.tensor([999]), cond))
    torch.testing.assert_close(ours, ref.step(raw, 999, z, eta=0.0).prev_sample, rtol=1e-5, atol=1e-5)


def test_euler_step_uses_shifted_sigmas():
    s = sampler(
        "sd3"
    )  # FlowMatchEulerDiscreteScheduler(shift=3): sigma(t) = 3u / (1 + 2u), u = (t + 1) / 1000
    z, v = torch.ones(1, 4, 2, 2), torch.full((1, 4, 2, 2), 2.0)

    def sigma(t):
        u = (t + 1) / 1000
        return 3 * u / (1 + 2 * u)

    out = euler_step(s.adapter.schedule, z, 999, 499, v)
    torch.testing.assert_close(out, z + (sigma(499) - sigma(999)) * v)


def test_default_guidance_per_model():
    assert (
        sampler("sd").guidance == 7.5 and sampler("sdxl").guidance == 5.0 and sampler("sd3").guidance == 7.0
    )
    assert sampler("sd", guidance=2.0).guidance == 2.0
    with pytest.raises(ValueError, match="flux"):
        sampler("flux")


def test_a_schedule_without_a_deterministic_sampler_is_a_clear_error():
    from diffusers import EDMDPMSolverMultistepScheduler

    from elbo_t2ialign.core.adapters.schedules import EDMSchedule

    ad = adapter_for(tiny_pipeline("sd"), torch.device("cpu"), torch.float32, 32)
    ad.schedule = EDMSchedule(EDMDPMSolverMultistepScheduler())  # as Playground v2.5's UNet has
    with pytest.raises(ValueError, match="no deterministic sampler for the EDMSchedule noise schedule"):
        ElboSampler(ad)


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_two_step_generation_is_deterministic(family):
    s = sampler(family)
    a, b = s.sample(PROMPT, PHRASES, seed=4307), s.sample(PROMPT, PHRASES, seed=4307)
    assert (
        torch.equal(a.latent, b.latent) and a.weights == b.weights and a.image.tobytes() == b.image.tobytes()
    )
    assert not torch.equal(a.latent, s.sample(PROMPT, PHRASES, seed=4308).latent)
    assert a.image.size == (32, 32) and len(a.weights) == 2 and len(a.distances) == 2
    for w in a.weights:  # two phrases: the closer one keeps 1, the other gets the full strength
        assert sorted(w) == [1.0, 3.0]


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_baseline_differs_only_where_weights_differ_from_one(family, monkeypatch):
    s = sampler(family)
    guided = []  # the conditioning of every guided (cond, uncond) call
    original = s.adapter.predict

    def spy(z_t, t, cond):
        if z_t.shape[0] == 2:
            guided.append({k: v.clone() for k, v in cond.items()})
        return original(z_t, t, cond)

    monkeypatch.setattr(s.adapter, "predict", spy)
    weighted = s.sample(PROMPT, PHRASES, seed=1)
    base = s.sample(PROMPT, PHRASES, seed=1, weighted=False)
    assert not torch.equal(weighted.latent, base.latent)
    assert base.weights == [[1.0, 1.0]] * 2 and base.distances == []
    positions = {"sd": [[4, 5], [7, 8]], "sd3": [[4, 5, 80, 81], [7, 8, 83, 84]]}[family]
    for step in range(2):
        w, b = guided[step], guided[2 + step]
        changed = (w["encoder_hidden_states"] != b["encoder_hidden_states"]).any(dim=-1)  # (2, L)
        expected = sorted(
            p for pos, x in zip(positions, weighted.weights[step], strict=True) if x != 1 for p in pos
        )
        assert changed[0].nonzero().flatten().tolist() == expected  # the prompt's row
        assert not changed[1].any()  # the empty negative prompt
        assert all(torch.equal(w[k], b[k]) for k in w if k != "encoder_hidden_states")  # pooled, time ids


def test_phrase_predictions_run_as_one_batch(monkeypatch):
    s = sampler("sdxl", steps=2)
    sizes = []
    original = s.adapter.predict
    monkeypatch.setattr(s.adapter, "predict", lambda z, t, c: sizes.append(z.shape[0]) or original(z, t, c))
    s.sample("a cat and a dog on a sofa", ["a cat", "a dog", "a sofa"], seed=0)
    assert sizes == [4, 2, 4, 2]  # (full + 3 phrases), then (weighted prompt, empty prompt), per step


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_all_ones_weights_reproduce_the_baseline_exactly(family):
    s = sampler(family)
    base = s.sample(PROMPT, PHRASES, seed=7, weighted=False).latent
    assert torch.equal(s.sample(PROMPT, ["a cat"], seed=7).latent, base)  # one phrase: weights 1
    assert torch.equal(sampler(family, strength=1.0).sample(PROMPT, PHRASES, seed=7).latent, base)
    assert torch.equal(sampler(family, elbo_steps=0).sample(PROMPT, PHRASES, seed=7).latent, base)


def test_strength_below_one_weights_as_compel_downweights(monkeypatch):
    """Strength 0.8: the neglected phrase gets 0.8, and the guided conditioning is Compel's for "(..)0.8"."""
    from compel import Compel

    from elbo_t2ialign.generation.weighting import compel_syntax

    s = sampler("sd", strength=0.8)
    guided = guided_conditionings(s, monkeypatch)
    r = s.sample(PROMPT, PHRASES, seed=2)
    compel = Compel(tokenizer=s.adapter.pipe.tokenizer, text_encoder=s.adapter.pipe.text_encoder)
    for step, weights in enumerate(r.weights):
        assert sorted(weights) == [0.8, 1.0]
        theirs = compel(compel_syntax(PROMPT, PHRASES, weights))
        torch.testing.assert_close(guided[step]["encoder_hidden_states"][:1], theirs, rtol=0, atol=1e-6)


def test_weights_return_to_one_after_elbo_steps():
    """The reference: steps after `elbo_steps` use weight 1, i.e. the plain prompt."""
    s = sampler("sd", steps=3, elbo_steps=1)
    r = s.sample(PROMPT, PHRASES, seed=3)
    assert len(r.distances) == 1 and r.weights[0] != [1.0] * len(PHRASES)
    assert r.weights[1] == r.weights[2] == [1.0] * len(PHRASES)
    held = sampler("sd", steps=3, elbo_steps=1, after_elbo_steps="hold").sample(PROMPT, PHRASES, seed=3)
    assert held.weights[1] == held.weights[2] == held.weights[0] == r.weights[0]
    assert not torch.equal(held.latent, r.latent)
    with pytest.raises(ValueError, match="after_elbo_steps must be 'reset' or 'hold'"):
        sampler("sd", after_elbo_steps="keep")
