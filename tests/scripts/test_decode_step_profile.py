"""``scripts/decode_step_profile.py --profiler trace``: how it splits an attention call's host
time between the torch ops it runs and the Python between them (the trace itself needs CUDA)."""

import importlib.util
import os

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "decode_step_profile.py")


def _script():
    spec = importlib.util.spec_from_file_location("decode_step_profile", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _op(name, ts, dur, cat="cpu_op"):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}


def test_an_attention_call_counts_its_outermost_ops_and_leaves_the_rest_to_python():
    events = [
        _op("aten::add", 0, 5),  # before the call: not counted
        _op("ihip::attention", 10, 100),
        _op("aten::where", 20, 10),
        _op("aten::empty", 22, 2),  # inside where: not an outermost op
        _op("aten::sort", 40, 20),
        _op("cudaLaunchKernel", 45, 3, cat="cuda_runtime"),  # not a CPU op
        _op("ihip::attention", 200, 50),
        _op("aten::copy_", 210, 5),
    ]
    first, second = _script()._attention_calls(events)
    assert first == {"ms": 0.1, "ops": 2, "ops_ms": 0.03}
    assert second == {"ms": 0.05, "ops": 1, "ops_ms": 0.005}
