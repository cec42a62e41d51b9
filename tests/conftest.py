"""Shared fixtures: tiny models are importable as ``models.*``; every test starts with a clean
Dynamo state and an empty list of compiled graphs."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(autouse=True)
def clean_compile_state():
    import torch

    from ihip_compile import capture

    torch.manual_seed(0)
    capture.reset_dynamo()
    backend_module = sys.modules.get("ihip_compile.backend")
    if backend_module is not None:
        backend_module.compiled_graphs.clear()
    yield
    capture.reset_dynamo()
