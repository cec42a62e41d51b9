"""The ``infinitehip`` torch.compile backend: rewrite attention, then compile with Inductor.

    torch.compile(model, backend="infinitehip", options={...})   # through the entry point
    torch.compile(model, backend=ihip_compile.backend(config))   # a configured backend object
    model.compile(backend="infinitehip")                         # so that generate() uses it

``infinitehip_eager`` runs the same passes and then the graph as Python (ops run their
references): it tells a pass bug from a compiler bug.
"""

from __future__ import annotations

import collections
import sys
import types
from typing import Any, Callable, Mapping

from ihip_compile import capture
from ihip_compile.config import IHipConfig
from ihip_compile.pipeline import PipelineResult, run_passes
from ihip_compile.traced_model import with_trained_context

# Results of the latest graphs compiled in this process, newest last (tests and tools read them;
# bounded so that a long-running server does not keep every graph alive).
compiled_graphs: collections.deque[PipelineResult] = collections.deque(maxlen=64)


def rewrite(gm, config: IHipConfig, compile_segments: bool = False) -> PipelineResult:
    """Run the passes on ``gm``; a CUDA decode graph is then segmented for CUDA graphs, each
    segment compiled by Inductor when ``compile_segments``."""
    config, trained_context = with_trained_context(config)
    result = run_passes(gm, config)
    result.trained_context = trained_context
    if config.offload_kv:  # DynamicCache K/V to host memory: ihip_compile/offload_graph.py
        from ihip_compile.offload_graph import offload_cache_concats

        offload_cache_concats(result.gm, config)
    result.cuda_graphs = _segment_decode_step(result.gm, config, compile_segments)
    compiled_graphs.append(result)
    if config.report_dir is not None:
        from ihip_compile.report import write_report

        write_report(result, config.report_dir)
    return result


def _segment_decode_step(gm, config: IHipConfig, compile_segments: bool) -> str:
    """Fold a CUDA decode graph's static stretches into CUDA-graph segments; says what it did."""
    if not config.decode_cuda_graphs:
        return "off (decode_cuda_graphs=False)"
    from ihip_compile.cuda_graph_segment import segment_for_cuda_graphs

    return segment_for_cuda_graphs(gm, whole_step=config.decode_step_graph,
                                   compiler=capture.compile_segment if compile_segments else None)


def infinitehip(gm, example_inputs: list, options: Mapping[str, Any] | IHipConfig | None = None):
    config = IHipConfig.from_options(options)
    result = rewrite(gm, config, compile_segments=True)
    if result.cuda_graphs.startswith("on"):
        # A decode step is launch-bound: replayed segments remove the launches, and Inductor,
        # segment by segment, fuses the ~50 small kernels per layer that a replay still runs.
        return result.gm.forward
    return capture.compile_with_inductor(result.gm, example_inputs)


def infinitehip_eager(gm, example_inputs: list,
                      options: Mapping[str, Any] | IHipConfig | None = None):
    config = IHipConfig.from_options(options)
    return rewrite(gm, config).gm.forward


class Backend:
    """A configured backend: ``torch.compile(model, backend=ihip_compile.backend(config))``."""

    def __init__(self, config: IHipConfig, eager: bool = False):
        self.config = config
        self.eager = eager
        self.__name__ = "infinitehip_eager" if eager else "infinitehip"

    def __call__(self, gm, example_inputs: list, options=None):
        config = self.config if options is None else IHipConfig.from_options(
            {**self.config.as_dict(), **options})
        compile_graph = infinitehip_eager if self.eager else infinitehip
        return compile_graph(gm, example_inputs, options=config)

    def __repr__(self) -> str:
        return f"{self.__name__}({self.config!r})"


def backend(config: Mapping[str, Any] | IHipConfig | None = None, *, eager: bool = False,
            **options: Any) -> Callable:
    """Build a backend from a config object, an options dict, or keyword options."""
    if options:
        if config is not None:
            base = IHipConfig.from_options(config).as_dict()
            config = {**base, **options}
        else:
            config = options
    return Backend(IHipConfig.from_options(config), eager=eager)


def keep_generation_masks_in_graph(model) -> None:
    """Static-cache recipe: let the model build its mask inside the compiled graph.

    With a compileable cache (StaticCache), transformers' ``generate()`` turns the 2-D padding
    mask into a [B, 1, S_Q, S_K] mask before calling the model, outside the graph, where the
    passes cannot read it (the site then stays dense). ``create_masks_for_generate`` is the
    model-level hook transformers looks up for that step; returning the 2-D mask leaves the
    model's own in-graph mask code, which the passes replace by the compact description.
    """

    def pass_2d_mask_through(*, attention_mask, **_ignored):
        return attention_mask

    model.create_masks_for_generate = pass_2d_mask_through


class _CallableModule(types.ModuleType):
    """Importing ``ihip_compile.backend`` (the entry point does) rebinds that attribute of the
    package to this module; making the module callable keeps ``ihip_compile.backend(config)``
    working in every import order."""

    def __call__(self, *args: Any, **kwargs: Any) -> Callable:
        return backend(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
