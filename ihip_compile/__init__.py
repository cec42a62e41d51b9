"""infinitehip: a torch.compile backend that rewrites attention into InfiniteHiP sparse attention.

    fast = torch.compile(model, backend="infinitehip", options={...})

The backend is found through the ``torch_dynamo_backends`` entry point, so no import of this package
is needed for that. Public names are loaded on first use, keeping ``import ihip_compile`` light.
"""

import importlib

from ihip_compile.config import IHipConfig, Stage

_LAZY = {
    "backend": "ihip_compile.backend",
    "hip_attention": "ihip_compile.attention",
    "select_blocks": "ihip_compile.attention",
    "OffloadedCache": "ihip_compile.offload",
}

__all__ = ["IHipConfig", "Stage", *_LAZY]


def __getattr__(name: str):
    if name == "backend":
        # The module itself: it is callable (``ihip_compile.backend(config)``), and importing it
        # as a submodule (the entry point does) binds this same object.
        value = importlib.import_module("ihip_compile.backend")
        globals()[name] = value
        return value
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ihip_compile' has no attribute {name!r}")
