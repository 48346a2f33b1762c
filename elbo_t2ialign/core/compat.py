"""Names that differ between the diffusers and transformers releases this package supports
(pyproject.toml: diffusers >= 0.33.1, transformers >= 4.51.3), kept in one place."""

from __future__ import annotations

import re
from functools import cache
from importlib.metadata import version

# the first releases whose from_pretrained takes `dtype=`; older ones take only `torch_dtype=`,
# which the newer ones still accept with a deprecation warning
DTYPE_KEYWORD_SINCE = {"diffusers": (0, 40), "transformers": (4, 56)}


def release(text: str) -> tuple[int, ...]:
    """The numeric release of a version string: "0.40.0.dev0" -> (0, 40, 0), "2.13.0+cpu" -> (2, 13, 0)."""
    match = re.match(r"\d+(?:\.\d+)*", text)
    return tuple(int(part) for part in match.group(0).split(".")) if match else ()


@cache
def dtype_keyword(library: str) -> str:
    """The keyword of `from_pretrained` that sets the weights' dtype in the installed `library`."""
    return "dtype" if release(version(library)) >= DTYPE_KEYWORD_SINCE[library] else "torch_dtype"
