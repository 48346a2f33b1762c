"""Moved to `elbo_t2ialign.tiny.models` (models built in code are used by the library's "tiny" model
ids, so they live below it); this name keeps working for tests and scripts."""

from elbo_t2ialign.tiny.models import *  # noqa: F403
from elbo_t2ialign.tiny.models import BUILDERS, SHAPES_WORDS, WORDS  # noqa: F401
