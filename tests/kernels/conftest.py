"""Kernel tests run the Triton kernels through the interpreter on machines without a GPU.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, at collection,
unless a CUDA device is present (then the kernels compile for it, and GPU-only tests run too).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def record_launches(monkeypatch, module, kernel_name: str) -> list[dict]:
    """Replace ``module.kernel_name`` with a recorder: each launch appends its keyword arguments
    (the compile-time ones) to the list returned, and runs nothing."""
    launched = []

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **constexprs):
                launched.append(constexprs)
            return launch

    monkeypatch.setattr(module, kernel_name, Recorder())
    return launched
