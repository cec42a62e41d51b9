"""IHipConfig: the one frozen configuration of the infinitehip backend.

Options arrive as ``torch.compile(..., options={...})``, as an ``IHipConfig`` object, or as a JSON
file of the same keys through the CLI. They are validated once, here; every error names the key
and what is allowed. The object is hashable (value types only) so it can key caches and appear in
every report.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

ROPE_REMAP_MODES = ("auto", "always", "off")
SELECTION_SCOPES = ("layer", "kv_head")  # kernels/selection_scope.py
LAYER_POLICIES = ("paper", "calibrated")
PRUNING_ROPE_STYLES = ("relative", "chunk_indexed")

# Decode refresh presets of the InfiniteHiP paper: steps between recomputations of each stage.
REFRESH_PRESETS = {"fast": (16, 8, 4), "default": (32, 16, 8), "long": (96, 24, 8)}


@dataclass(frozen=True)
class Stage:
    """One pruning stage: split candidates into ``chunk_size``-token chunks, keep ``keep_tokens``."""

    chunk_size: int
    keep_tokens: int

    def __post_init__(self) -> None:
        if self.chunk_size < 1 or self.chunk_size & (self.chunk_size - 1):
            raise ValueError(f"stages: chunk_size must be a power of two >= 1, got {self.chunk_size}")
        if self.keep_tokens < self.chunk_size or self.keep_tokens % self.chunk_size:
            raise ValueError(
                f"stages: keep_tokens must be a positive multiple of chunk_size "
                f"({self.chunk_size}), got {self.keep_tokens}"
            )


@dataclass(frozen=True)
class LayerChoice:
    """A calibrated layer's pruning: RoPE style while scoring chunks and budget multiplier."""

    layer: int
    pruning_rope: str
    budget_factor: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise ValueError(f"calibrated_layers: layer must be an index >= 0, got {self.layer!r}")
        if self.pruning_rope not in PRUNING_ROPE_STYLES:
            raise ValueError(
                f"calibrated_layers: pruning_rope must be one of {PRUNING_ROPE_STYLES}, "
                f"got {self.pruning_rope!r} (layer {self.layer})"
            )
        if self.budget_factor not in (1, 2):
            raise ValueError(
                f"calibrated_layers: budget_factor must be 1 or 2, got {self.budget_factor!r} "
                f"(layer {self.layer})"
            )


DEFAULT_STAGES = (Stage(256, 32768), Stage(32, 8192), Stage(8, 2048))
ALL_PASSES = (  # in pipeline order (ihip_compile.pipeline.PASSES)
    "match_attention",
    "match_rope",
    "rewrite_attention",
    "remove_dead_code",
)


@dataclass(frozen=True, kw_only=True)
class IHipConfig:
    # --- when to stay dense -------------------------------------------------------------------
    dense_below_tokens: int = 8192
    dense_layers: frozenset[int] = frozenset()
    # --- selection ----------------------------------------------------------------------------
    block_size_q: int = 64
    sink_tokens: int = 256
    sliding_window_tokens: int = 1024
    selected_tokens: int = 2048
    stages: tuple[Stage, ...] = DEFAULT_STAGES
    wide_layers: frozenset[int] = frozenset({0, 1, 2})
    # Parts of each chunk probed in a stage's first step (2: the paper's plain halving). More parts
    # find isolated needles more often but make stage recomputation slower. A decode step probes
    # at least one key in 8 of the first stage's chunks whatever this says
    # (kernels/block_selection.DECODE_KEYS_PER_PROBE), unless its keys are in host memory; so do
    # the blocks holding a prompt's last queries, each selected again on its own.
    first_probe_parts: int = 8
    # Selections for at most this many query blocks (decode steps, short prompts, the blocks of
    # a prompt's last queries selected again) score every key of each candidate chunk (exact
    # chunk maxima) where the keys are in device memory: isolated needles are found far more
    # often, for a dearer decode refresh. 0: never.
    exact_probe_query_blocks: int = 0
    # Neighbouring query blocks of a prefill that share the first pruning stage (one probe search
    # of the whole cache for all of them, their queries pooled as many times more); each block
    # runs the later stages on its own. 1: every block runs every stage.
    first_stage_query_blocks: int = 1
    # One block selection per layer (all heads' scores) or per KV head (its query heads' scores;
    # invariant under tensor-parallel head sharding, more selection work at prefill).
    selection_scope: str = "layer"
    # --- decode -------------------------------------------------------------------------------
    refresh_intervals: tuple[int, ...] = REFRESH_PRESETS["default"]
    # Replay a CUDA decode step's static work (the model's own layers between attention calls)
    # as CUDA graphs: a decode step is launch-bound (ihip_compile/cuda_graph_segment.py).
    decode_cuda_graphs: bool = True
    # With them, and the KV in host memory: a decode step between refreshes, from the embedding
    # to the logits, replayed as one CUDA graph (ihip_compile/decode_step_replay.py).
    decode_step_graph: bool = True
    # --- RoPE beyond the training window -------------------------------------------------------
    rope_remap: str = "auto"
    trained_context_tokens: int | None = None
    # --- per-layer policy (ihip_compile.layer_policy) ------------------------------------------
    layer_policy: str = "paper"
    calibrated_layers: tuple[LayerChoice, ...] = ()
    # --- offload ------------------------------------------------------------------------------
    offload_kv: bool = False
    # Tokens per layer held on the GPU: the attention bank (K and V of recently attended
    # blocks) and the pruning bank (keys the later pruning stages score; None: twice the
    # attention bank's). A decode step attends ~3.4k tokens; a refresh's stage 1 scores the
    # 32768 that stage 0 keeps, in the pruning bank's slots when they all fit, and room for two
    # refreshes' worth lets the next one find most of them there (reports/bench/bank_key_scoring/).
    gpu_cache_tokens: int = 32768
    pruning_cache_tokens: int | None = None
    # Keep a second copy of each layer's keys in float8_e4m3fn for the pruning stages (stage 0's
    # probes in host memory, the pruning bank) when the K/V are stored in 16 bits: a decode
    # refresh reads half the bytes over PCIe, for a quarter more host memory; the attention
    # still reads the stored keys and values (kernels/kv_store.py).
    fp8_pruning_keys: bool = False
    # --- pipeline and reports -----------------------------------------------------------------
    passes: tuple[str, ...] = ALL_PASSES
    report_dir: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        # Plain values (a list of pairs for stages, a preset name...) as from_options takes them.
        for f in dataclasses.fields(self):
            if f.name != "extra":
                object.__setattr__(self, f.name, _coerce(f.name, getattr(self, f.name)))
        _check_int(self, "dense_below_tokens", minimum=0)
        _check_int(self, "block_size_q", minimum=1)
        _check_int(self, "sink_tokens", minimum=0)
        _check_int(self, "sliding_window_tokens", minimum=0)
        _check_int(self, "selected_tokens", minimum=0)
        _check_int(self, "gpu_cache_tokens", minimum=1)
        if self.pruning_cache_tokens is not None:
            _check_int(self, "pruning_cache_tokens", minimum=1)
        _check_int(self, "exact_probe_query_blocks", minimum=0)
        for name in ("decode_cuda_graphs", "decode_step_graph", "fp8_pruning_keys"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        shared = self.first_stage_query_blocks
        if isinstance(shared, bool) or not isinstance(shared, int) or shared < 1 or \
                shared & (shared - 1):
            raise ValueError(f"first_stage_query_blocks must be a power of two >= 1, got "
                             f"{shared!r}")
        parts = self.first_probe_parts
        if (isinstance(parts, bool) or not isinstance(parts, int) or parts < 2
                or parts & (parts - 1)):
            raise ValueError(f"first_probe_parts must be a power of two >= 2, got {parts!r}")
        if self.trained_context_tokens is not None:
            _check_int(self, "trained_context_tokens", minimum=1)
        if self.block_size_q & (self.block_size_q - 1):
            raise ValueError(f"block_size_q must be a power of two, got {self.block_size_q}")
        if not self.stages:
            raise ValueError("stages must name at least one (chunk_size, keep_tokens) stage")
        for earlier, later in zip(self.stages, self.stages[1:]):
            if later.chunk_size > earlier.chunk_size or later.keep_tokens > earlier.keep_tokens:
                raise ValueError(
                    "stages must shrink: each stage's chunk_size and keep_tokens at most the "
                    f"previous one's, got {earlier} then {later}"
                )
        if self.selected_tokens % self.block_size_k:
            raise ValueError(
                f"selected_tokens must be a multiple of the last stage's chunk_size "
                f"({self.block_size_k}), got {self.selected_tokens}"
            )
        if len(self.refresh_intervals) != len(self.stages) or min(self.refresh_intervals) < 1:
            raise ValueError(
                f"refresh_intervals needs one positive interval per stage ({len(self.stages)}), "
                f"or a preset name in {sorted(REFRESH_PRESETS)}; got {self.refresh_intervals}"
            )
        if self.rope_remap not in ROPE_REMAP_MODES:
            raise ValueError(f"rope_remap must be one of {ROPE_REMAP_MODES}, got {self.rope_remap!r}")
        if self.selection_scope not in SELECTION_SCOPES:
            raise ValueError(f"selection_scope must be one of {SELECTION_SCOPES}, got "
                             f"{self.selection_scope!r}")
        _check_layer_policy(self)
        unknown = [name for name in self.passes if name not in ALL_PASSES]
        if unknown:
            raise ValueError(f"passes: unknown pass names {unknown}; allowed: {list(ALL_PASSES)}")
        for name in ("dense_layers", "wide_layers"):
            if any(not isinstance(i, int) or i < 0 for i in getattr(self, name)):
                raise ValueError(f"{name} must hold layer indices >= 0, got {getattr(self, name)}")

    # --- derived values -----------------------------------------------------------------------
    def pruning_bank_tokens(self, attention_bank_tokens: int | None = None) -> int:
        """Tokens per layer of the pruning bank: ``pruning_cache_tokens``, else twice the
        attention bank's (``attention_bank_tokens``, by default ``gpu_cache_tokens``)."""
        return self.pruning_cache_tokens or 2 * (attention_bank_tokens or self.gpu_cache_tokens)

    @property
    def block_size_k(self) -> int:
        """Tokens per final selected block: the last stage's chunk size."""
        return self.stages[-1].chunk_size

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-able view, sorted keys (used by reports and the CLI)."""
        out = {}
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if f.name == "stages":
                value = [[s.chunk_size, s.keep_tokens] for s in value]
            elif f.name == "calibrated_layers":
                value = [[c.layer, c.pruning_rope, c.budget_factor] for c in value]
            elif isinstance(value, (frozenset, tuple)):
                value = sorted(value) if isinstance(value, frozenset) else list(value)
            out[f.name] = value
        return dict(sorted(out.items()))

    # --- constructors -------------------------------------------------------------------------
    @classmethod
    def from_options(cls, options: Mapping[str, Any] | IHipConfig | None) -> IHipConfig:
        """Build from ``torch.compile(options=...)``; unknown keys raise ``ValueError``."""
        if options is None:
            return cls()
        if isinstance(options, IHipConfig):
            return options
        if not isinstance(options, Mapping):
            raise ValueError(f"options must be a dict or IHipConfig, got {type(options).__name__}")
        allowed = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise ValueError(f"unknown option(s) {unknown}; allowed: {sorted(allowed)}")
        return cls(**options)

    @classmethod
    def from_json(cls, path: str) -> IHipConfig:
        with open(path) as f:
            return cls.from_options(json.load(f))

    @classmethod
    def from_env(cls, base: IHipConfig | None = None) -> IHipConfig:
        """Apply ``IHIP_<OPTION>`` environment variables (JSON values) on top of ``base``.

        Example: ``IHIP_DENSE_BELOW_TOKENS=16384``, ``IHIP_REPORT_DIR='"reports/x"'`` (a bare
        string that is not valid JSON is taken as a string).
        """
        base = base or cls()
        updates = {}
        for f in dataclasses.fields(cls):
            raw = os.environ.get(f"IHIP_{f.name.upper()}")
            if raw is None or f.name == "extra":
                continue
            try:
                updates[f.name] = json.loads(raw)
            except json.JSONDecodeError:
                updates[f.name] = raw
        if not updates:
            return base
        merged = {**base.as_dict(), **updates}
        return cls.from_options(merged)


def _check_int(config: IHipConfig, name: str, minimum: int) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_layer_policy(config: IHipConfig) -> None:
    if config.layer_policy not in LAYER_POLICIES:
        raise ValueError(
            f"layer_policy must be one of {LAYER_POLICIES}, got {config.layer_policy!r}"
        )
    choices = config.calibrated_layers
    if not isinstance(choices, tuple) or any(not isinstance(c, LayerChoice) for c in choices):
        raise ValueError(
            "calibrated_layers must be a tuple of LayerChoice (or, as an option, a list of "
            f"[layer, pruning_rope, budget_factor]), got {choices!r}"
        )
    if config.layer_policy == "calibrated" and not choices:
        raise ValueError(
            "layer_policy='calibrated' needs calibrated_layers: build the config with "
            "ihip_compile.layer_policy.calibrate(model, input_ids, config)"
        )
    if config.layer_policy == "paper" and choices:
        raise ValueError("calibrated_layers is only used with layer_policy='calibrated'")
    layers = [c.layer for c in choices]
    if len(set(layers)) != len(layers):
        raise ValueError(f"calibrated_layers names a layer twice: {sorted(layers)}")


def _coerce(name: str, value: Any) -> Any:
    """Turn JSON-style values (lists, preset names) into the dataclass's value types."""
    if name == "stages":
        try:
            return tuple(s if isinstance(s, Stage) else Stage(*s) for s in value)
        except TypeError as e:
            raise ValueError(
                f"stages must be a list of (chunk_size, keep_tokens) pairs, got {value!r}"
            ) from e
    if name == "calibrated_layers":
        try:
            return tuple(
                c if isinstance(c, LayerChoice)
                else LayerChoice(**c) if isinstance(c, Mapping) else LayerChoice(*c)
                for c in value
            )
        except TypeError as e:
            raise ValueError(
                "calibrated_layers must be a list of [layer, pruning_rope, budget_factor], "
                f"got {value!r}"
            ) from e
    if name == "refresh_intervals" and isinstance(value, str):
        if value not in REFRESH_PRESETS:
            raise ValueError(
                f"refresh_intervals preset must be one of {sorted(REFRESH_PRESETS)}, got {value!r}"
            )
        return REFRESH_PRESETS[value]
    if name in ("dense_layers", "wide_layers"):
        return frozenset(value)
    if name in ("refresh_intervals", "passes"):
        return tuple(value)
    return value
