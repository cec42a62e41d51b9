"""Helpers for end-to-end checks: what the backend compiled, and what the op received."""

from __future__ import annotations

import torch
import torch.fx as fx

import ihip_compile.backend as backend_module
from ihip_compile.config import IHipConfig

ATTENTION_OP = torch.ops.ihip.attention.default


def compiled_results():
    return list(backend_module.compiled_graphs)


def op_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is ATTENTION_OP]


def max_abs_error(reference: torch.Tensor, other: torch.Tensor, rows=None) -> float:
    if rows is not None:
        reference, other = reference[rows], other[rows]
    return (reference.double() - other.double()).abs().max().item()


def fp32_tolerance(reference: torch.Tensor) -> float:
    """Data-derived: a few hundred fp32 ulps of the largest logit (reduction order differs)."""
    return 256 * torch.finfo(torch.float32).eps * max(1.0, reference.abs().max().item())


class OpRecorder:
    """A backend that applies the passes and runs the graph in an interpreter, recording every
    call of ``torch.ops.ihip.attention`` (inputs as tensors, keyword scalars as given)."""

    def __init__(self, config: IHipConfig | None = None):
        self.config = config or IHipConfig()
        self.calls: list[dict] = []

    def __call__(self, gm, example_inputs):
        rewritten = backend_module.rewrite(gm, self.config).gm
        recorder = self

        class _Recording(fx.Interpreter):
            def call_function(self, target, args, kwargs):
                if target is ATTENTION_OP:
                    names = ("q", "k", "v", "q_positions", "kv_valid", "inv_freq")
                    recorder.calls.append({**dict(zip(names, args)), **kwargs})
                return super().call_function(target, args, kwargs)

        def run(*inputs):
            return _Recording(rewritten).run(*inputs)

        return run
