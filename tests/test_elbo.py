"""ELBO scoring: batched equals one-at-a-time; targets for every parameterisation match hand algebra."""

import math

import numpy as np
import pytest
import torch
from conftest import FAMILIES, tiny_aligner
from PIL import Image

from elbo_t2ialign.core.adapters.base import cat_cond
from elbo_t2ialign.core.adapters.schedules import DDPMSchedule, EDMSchedule, FlowSchedule
from elbo_t2ialign.core.elbo import elbo_losses


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_elbo_equals_sequential(family):
    ad = tiny_aligner(family).adapter
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(1, *ad.latent_shape, generator=g)
    noise = torch.randn(3, *ad.latent_shape, generator=g)
    ts = [1, 301, 951]
    conds = [ad.encode_prompt(f"a photo of {c}") for c in ("cat", "dog")]
    batched = elbo_losses(ad, z0, conds, ts, noise, batch_size=4)[0].sum(dim=1)
    # one network call per (class, timestep), written out by hand
    hand = torch.zeros(2)
    for i, cond in enumerate(conds):
        for j, t in enumerate(ts):
            tt = torch.tensor([t])
            z_t = ad.schedule.add_noise(z0, noise[j : j + 1], tt)
            pred = ad.predict(z_t, tt, cond)
            hand[i] += ((ad.schedule.target(z0, noise[j : j + 1], tt) - pred) ** 2).mean()
    torch.testing.assert_close(batched, hand, rtol=1e-5, atol=1e-6)
    assert batched[0] != batched[1]  # the prompt matters


def test_ddpm_noising_and_targets_by_hand():
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    ac = torch.cumprod(1 - betas, 0)
    z0, eps, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.tensor([10, 700])
    a = ac[t].sqrt().float().view(-1, 1, 1, 1)
    b = (1 - ac[t]).sqrt().float().view(-1, 1, 1, 1)
    z_t = DDPMSchedule(ac, "epsilon").add_noise(z0, eps, t)
    torch.testing.assert_close(z_t, a * z0 + b * eps)
    # v = a eps - b z0; a v-model that is exactly right gives back eps
    v = a * eps - b * z0
    torch.testing.assert_close(
        DDPMSchedule(ac, "v_prediction").to_target(v, z_t, t), eps, rtol=1e-4, atol=1e-5
    )
    # a sample model that predicts z0 exactly gives back eps
    torch.testing.assert_close(DDPMSchedule(ac, "sample").to_target(z0, z_t, t), eps, rtol=1e-4, atol=1e-4)
    assert torch.equal(DDPMSchedule(ac).target(z0, eps, t), eps)


def test_flow_sigmas_follow_the_scheduler_and_target_is_velocity():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    fs = FlowSchedule.from_scheduler_config(sched.config, image_seq_len=4096, timestep_scale=1.0)
    # the scheduler's training sigmas run from high noise to low; index t counts from low noise
    torch.testing.assert_close(fs.sigmas, sched.sigmas.flip(0).float())
    s = 52 / 1000
    assert math.isclose(float(fs.sigmas[51]), 3 * s / (1 + 2 * s), rel_tol=1e-6)
    z0, eps, t = torch.randn(1, 2, 2, 2), torch.randn(1, 2, 2, 2), torch.tensor([51])
    sig = float(fs.sigmas[51])
    torch.testing.assert_close(fs.add_noise(z0, eps, t), (1 - sig) * z0 + sig * eps)
    torch.testing.assert_close(fs.target(z0, eps, t), eps - z0)
    torch.testing.assert_close(fs.model_timestep(t), torch.tensor([sig * 1000]))


def test_flow_dynamic_shift_matches_flux_formula():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    fs = FlowSchedule.from_scheduler_config(sched.config, image_seq_len=1024, timestep_scale=1e-3)
    m = (1.15 - 0.5) / (4096 - 256)
    mu = 1024 * m + 0.5 - m * 256
    s = 500 / 1000
    expected = math.exp(mu) / (math.exp(mu) + (1 / s - 1))
    assert math.isclose(float(fs.sigmas[499]), expected, rel_tol=1e-6)
    assert math.isclose(float(fs.model_timestep(torch.tensor([499]))), expected, rel_tol=1e-6)


def test_edm_epsilon_recovered_through_preconditioning():
    from diffusers import EDMDPMSolverMultistepScheduler

    sched = EDMDPMSolverMultistepScheduler(
        sigma_min=0.002,
        sigma_max=80.0,
        sigma_data=0.5,
        sigma_schedule="exponential",
        prediction_type="epsilon",
    )
    es = EDMSchedule(sched)
    assert math.isclose(float(es.sigmas[0]), 0.002, rel_tol=1e-5)
    assert math.isclose(float(es.sigmas[-1]), 80.0, rel_tol=1e-5)
    z0, eps, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.tensor([100, 800])
    z = es.add_noise(z0, eps, t)
    sig = es.sigmas[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(z, z0 + sig * eps)
    # the network output F for which the preconditioned denoiser returns z0 exactly
    c_skip = 0.25 / (sig**2 + 0.25)
    c_out = sig * 0.5 / (sig**2 + 0.25).sqrt()
    perfect = (z0 - c_skip * z) / c_out
    torch.testing.assert_close(es.to_target(perfect, z, t), eps, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(es.model_timestep(t), 0.25 * torch.log(es.sigmas[t]))


def _losses_with_a_copy_per_batch(adapter, z0, conds, timesteps, noise, batch_size):
    """The loop as it was before the losses stayed on the device: one host copy per batch."""
    pairs = [(i, j) for i in range(len(conds)) for j in range(len(timesteps))]
    ts = torch.tensor(timesteps, dtype=torch.long)
    out = torch.zeros(len(pairs))
    for lo in range(0, len(pairs), batch_size):
        rows = pairs[lo : lo + batch_size]
        idx_t = torch.tensor([j for _, j in rows])
        eps, t = noise[idx_t], ts[idx_t]
        z_t = adapter.schedule.add_noise(z0, eps, t)
        pred = adapter.predict(z_t, t, cat_cond([conds[i] for i, _ in rows]))
        out[lo : lo + len(rows)] = (
            ((adapter.schedule.target(z0, eps, t) - pred) ** 2).flatten(1).mean(1).cpu()
        )
    return out.view(len(conds), len(timesteps)).sum(dim=1)


@pytest.mark.parametrize("family", FAMILIES)
def test_one_host_copy_and_the_same_maps_as_a_copy_per_batch(family, monkeypatch):
    """Losses stay on the device until the end: one `.cpu()` whatever the number of batches, losses
    bit-equal to the per-batch-copy loop, and heatmaps equal to that loop's within 1e-6."""
    aligner = tiny_aligner(family)
    ad = aligner.adapter
    image = Image.fromarray((np.random.RandomState(3).rand(32, 32, 3) * 255).astype(np.uint8))
    z0 = ad.encode_image(image)
    noise = torch.randn(4, *z0.shape[1:], generator=torch.Generator().manual_seed(1))
    conds = [ad.encode_prompt(f"a photo of {w}") for w in ("cat", "dog", "bird")]
    ts = [11, 261, 511, 901]

    copies = []
    original = torch.Tensor.cpu
    monkeypatch.setattr(
        torch.Tensor, "cpu", lambda self, *a, **k: copies.append(1) or original(self, *a, **k)
    )
    losses = elbo_losses(ad, z0, conds, ts, noise, batch_size=5)[0].sum(dim=1)  # 12 pairs: 3 batches
    assert len(copies) == 1
    monkeypatch.undo()
    assert torch.equal(losses, _losses_with_a_copy_per_batch(ad, z0, conds, ts, noise, 5))

    classes = ["cat", "dog", "bird"]
    new = aligner.heatmaps(image, classes, seed=7)
    monkeypatch.setattr(
        aligner,
        "_elbo_losses",
        lambda z, cs, t, n, batch: _losses_with_a_copy_per_batch(ad, z, cs, t, n, batch).tolist(),
    )
    old = aligner.heatmaps(image, classes, seed=7)
    assert new.losses == old.losses and new.tau == old.tau
    for name in classes:
        np.testing.assert_allclose(new.heatmaps[name], old.heatmaps[name], atol=1e-6, rtol=0)
        np.testing.assert_allclose(
            new.baseline_heatmaps[name], old.baseline_heatmaps[name], atol=1e-6, rtol=0
        )


def _oom_above(limit: int):
    """A step that runs out of memory on slices longer than `limit`, recording the slices that ran."""
    ran = []

    def step(rows: slice) -> None:
        if rows.stop - rows.start > limit:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        ran.append((rows.start, rows.stop))

    return step, ran


def test_run_batched_halves_on_out_of_memory_and_keeps_finished_slices():
    from elbo_t2ialign.core.elbo import run_batched

    step, ran = _oom_above(2)
    assert run_batched(7, 8, step) == 2  # 8 -> 4 -> 2
    assert ran == [(0, 2), (2, 4), (4, 6), (6, 7)]
    step, ran = _oom_above(3)
    assert run_batched(7, 3, step) == 3 and ran == [(0, 3), (3, 6), (6, 7)]
    step, _ = _oom_above(0)
    with pytest.raises(RuntimeError, match="out of memory"):  # not even one row fits
        run_batched(3, 4, step)

    def broken(rows: slice) -> None:
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):  # other errors are not retried
        run_batched(3, 4, broken)


def test_collection_and_elbo_restart_smaller_after_out_of_memory(monkeypatch):
    """Every network call above one sample runs out of memory: the maps and losses are those of a
    run at batch size 1, and the aligner keeps batch size 1 for later calls."""
    image = Image.fromarray((np.random.RandomState(0).rand(16, 16, 3) * 255).astype(np.uint8))
    opts = {"elbo_timesteps": [1, 501], "collect_timesteps": [20, 120, 220]}
    reference = tiny_aligner("sd", batch_size=1, **opts).heatmaps(image, ["cat", "dog"], seed=2)
    aligner = tiny_aligner("sd", batch_size=4, **opts)
    original = aligner.adapter.predict

    def predict(z_t, t, cond):
        if z_t.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return original(z_t, t, cond)

    monkeypatch.setattr(aligner.adapter, "predict", predict)
    res = aligner.heatmaps(image, ["cat", "dog"], seed=2)
    assert aligner._fitted_batch == 1
    assert res.losses == reference.losses
    for name in ("cat", "dog"):
        np.testing.assert_array_equal(res.heatmaps[name], reference.heatmaps[name])
