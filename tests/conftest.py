"""Shared fixtures: tiny pipelines of every family, built once per session, CPU only."""

import os
import tempfile

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# label caches and file digests of test runs go to a throwaway folder, not ~/.cache
os.environ.setdefault("ELBO_T2IALIGN_CACHE", tempfile.mkdtemp(prefix="elbo-t2ialign-test-cache-"))
# Tiny models gain nothing from threads, and on a loaded 2-core machine OpenMP threads that
# spin against another process make them 100x slower. Subprocesses inherit the variable.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)

from elbo_t2ialign.devtools.tiny import BUILDERS, TEST_TEXT_LENGTHS, unavailable  # noqa: E402


def needs(*names: str):
    """Skip mark for a test of tiny families the installed diffusers predates, with the release needed."""
    reasons = [r for r in map(unavailable, names) if r]
    return pytest.mark.skipif(bool(reasons), reason="; ".join(reasons))


def family_param(name: str):
    return pytest.param(name, marks=needs(name))


# every tiny family; those the installed diffusers predates are skipped, saying which release they need
FAMILIES = [family_param(name) for name in BUILDERS]
_CACHE = {}


def tiny_pipeline(family: str):
    """One shared random-weight pipeline per family (weights never change in tests)."""
    if family not in _CACHE:
        _CACHE[family] = BUILDERS[family]()
    return _CACHE[family]


def tiny_aligner(family: str, **options):
    from elbo_t2ialign import Aligner

    # T5 text kept short (16 tokens) in tests, chat-template text a little longer; ignored by CLIP-only families
    return Aligner.from_pipeline(
        tiny_pipeline(family),
        device="cpu",
        resolution=32,
        max_sequence_length=TEST_TEXT_LENGTHS.get(family, 16),
        **options,
    )


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


def guided_conditionings(sampler, monkeypatch) -> list[dict]:
    """The conditionings of the guided (batch-2) predictions an ElboSampler makes, one per step."""
    seen = []
    original = sampler.adapter.predict
    monkeypatch.setattr(
        sampler.adapter,
        "predict",
        lambda z, t, c: (seen.append(c) if z.shape[0] == 2 else None) or original(z, t, c),
    )
    return seen
