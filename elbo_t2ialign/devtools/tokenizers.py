"""Moved to `elbo_t2ialign.tiny.tokenizers`; this name keeps working for tests and scripts."""

from elbo_t2ialign.tiny.tokenizers import *  # noqa: F403
