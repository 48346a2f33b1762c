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


# transformers >= 5 without torchvision: importing `<Model>ImageProcessor` (diffusers' pipeline modules
# import CLIPImageProcessor and SiglipImageProcessor for components this package never runs) falls
# back to `<Model>ImageProcessorPil` and logs this notice, once per class, on every command
TORCHVISION_FALLBACK = re.compile(
    r"`\w+ImageProcessor` requires torchvision \(not installed\); falling back to"
)


class _TorchvisionFallbackFilter:
    """Drops transformers' torchvision fallback notice and nothing else (the PIL processor it falls
    back to is the one every earlier release used)."""

    def filter(self, record) -> bool:
        return not TORCHVISION_FALLBACK.search(record.getMessage())


def quiet_torchvision_fallback() -> None:
    """Install `_TorchvisionFallbackFilter` on the logger that emits the notice (idempotent; transformers
    need not be imported yet: its loggers are the standard library's)."""
    import logging

    logger = logging.getLogger("transformers.utils.import_utils")
    if not any(isinstance(f, _TorchvisionFallbackFilter) for f in logger.filters):
        logger.addFilter(_TorchvisionFallbackFilter())
