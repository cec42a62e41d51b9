"""SmolLM2-135M-Instruct, loaded once for the eval tests that run it."""

import pytest


@pytest.fixture(scope="session")
def smollm2():
    from ihip_compile.smollm2 import load_smollm2

    return load_smollm2()
