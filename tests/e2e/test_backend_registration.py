"""How users reach the backend: entry point, options, config objects, package layout."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import ihip_compile
from ihip_compile import IHipConfig, capture


def _run_python(code: str, tmp_path) -> str:
    """Run in a fresh interpreter outside the repository (cwd would shadow the install)."""
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_backends_are_listed_through_the_entry_point():
    names = capture.list_backends()
    assert "infinitehip" in names and "infinitehip_eager" in names


def test_backend_string_works_without_importing_us(tmp_path):
    code = (
        "import sys, torch\n"
        "f = torch.compile(lambda q, k, v: torch.nn.functional.scaled_dot_product_attention("
        "q, k, v, is_causal=True), backend='infinitehip_eager', options={'report_dir': None})\n"
        "q = torch.randn(1, 2, 4, 8)\n"
        "f(q, q, q)\n"
        "import ihip_compile.backend as b\n"
        "print(len(b.compiled_graphs[-1].context.rewrites))\n"
    )
    assert _run_python(code, tmp_path).strip() == "1"


def test_no_top_level_kernels_or_passes_module_from_this_project(tmp_path):
    code = (
        "import importlib.util, ihip_compile.kernels, ihip_compile.passes\n"
        "for name in ('kernels', 'passes'):\n"
        "    spec = importlib.util.find_spec(name)\n"
        "    print(name, None if spec is None else spec.origin)\n"
    )
    for line in _run_python(code, tmp_path).splitlines():
        name, origin = line.split(" ", 1)
        assert origin == "None" or "ihip" not in origin and "/work/" not in origin, line


def test_package_backend_stays_callable_after_submodule_import():
    import ihip_compile.backend as backend_module

    configured = ihip_compile.backend(IHipConfig(dense_below_tokens=16))
    assert configured.config.dense_below_tokens == 16
    assert backend_module.backend({"dense_below_tokens": 32}).config.dense_below_tokens == 32
    assert ihip_compile.backend(dense_below_tokens=64, eager=True).eager


def test_options_dict_reaches_the_passes():
    f = torch.compile(
        lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True),
        backend="infinitehip_eager", options={"dense_below_tokens": 16, "dense_layers": [0]},
    )
    q = torch.randn(1, 2, 4, 8)
    f(q, q, q)
    import ihip_compile.backend as backend_module

    result = backend_module.compiled_graphs[-1]
    assert result.context.config.dense_below_tokens == 16
    (op,) = [n for n in result.gm.graph.nodes if "ihip" in str(n.target)]
    assert op.kwargs["dense_below_tokens"] > 2**40  # layer 0 kept dense by the policy


@pytest.mark.parametrize("options, named", [
    ({"no_such_option": 1}, "no_such_option"),
    ({"dense_below_tokens": -1}, "dense_below_tokens"),
    ({"passes": ["rewrite_everything"]}, "passes"),
    ({"selection_scope": "head"}, "selection_scope"),
])
def test_bad_options_raise_value_error_naming_the_key(options, named):
    f = torch.compile(lambda x: x + 1, backend="infinitehip_eager", options=options)
    with pytest.raises(Exception) as raised:
        f(torch.ones(2))
    error = raised.value
    while error is not None and not isinstance(error, ValueError):
        error = error.__cause__ or error.__context__
    assert isinstance(error, ValueError) and named in str(error)


def test_config_built_directly_takes_the_plain_values_options_take():
    """``IHipConfig(...)`` accepts what ``options=`` accepts (pairs for stages, preset names,
    lists of layers) and names the field when a value has the wrong form."""
    direct = IHipConfig(stages=[(32, 128), (16, 64), (8, 32)], selected_tokens=32,
                        refresh_intervals="fast", wide_layers=[1])
    assert direct == IHipConfig.from_options({"stages": [[32, 128], [16, 64], [8, 32]],
                                              "selected_tokens": 32, "refresh_intervals": "fast",
                                              "wide_layers": [1]})
    assert direct.stages[0].chunk_size == 32 and hash(direct)
    with pytest.raises(ValueError, match="stages must be a list of"):
        IHipConfig(stages=[(32,)])
