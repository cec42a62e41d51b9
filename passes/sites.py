"""What the passes find and decide, shared by the passes, the pipeline and the reports.

A pass never returns bare booleans: every attention-like node ends up either in ``rewrites``
(with everything the emitted op was given) or in ``skips`` (with the reason it stayed as it was),
so that the report can show both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx

from ihip_compile.config import IHipConfig

# rope_layout values of torch.ops.ihip.attention (kernels/ops.py).
ROPE_NONE, ROPE_ROTATE_HALF, ROPE_INTERLEAVED = 0, 1, 2
ROPE_LAYOUT_NAMES = {
    ROPE_NONE: "none", ROPE_ROTATE_HALF: "rotate_half", ROPE_INTERLEAVED: "interleaved",
}


@dataclass
class RopeSite:
    """How the query of one attention site was rotated."""

    layout: int  # ROPE_* above
    rotary_dim: int  # rotated channels (partial rotary: fewer than the head dim)
    inv_freq: fx.Node | None  # 1-D [rotary_dim / 2] float frequency source, or None
    inv_freq_source: str  # where the frequencies come from, for the report
    # True: ``inv_freq`` is a complex [positions, rotary_dim / 2] table; its angle at position 1
    # is the frequency vector (angles there are below pi, so the angle is exact).
    inv_freq_is_table: bool = False


@dataclass
class MaskDescription:
    """The compact form of a causal mask subgraph (see passes/read_mask.py)."""

    q_indices: fx.Node  # 1-D [S_Q] absolute index of each query
    kv_indices: fx.Node  # 1-D [S_K] absolute index of each key: arange(S_K) + kv_offset
    kv_offset: Any  # int or fx.Node (SymInt)
    window: int  # the model's own sliding window, 0 for none
    padding_source: fx.Node | None  # 2-D bool [B, >= S_K], read at [batch, kv_indices]
    batch_indices: fx.Node | None  # 1-D [B] arange used for that read
    kind: str  # "sdpa_bool" or "additive" (eager: where(mask, 0, min))


@dataclass
class AttentionSite:
    """One attention computation the matcher understood exactly."""

    node: fx.Node  # the node whose value the op replaces (SDPA call or final matmul)
    pattern: str  # "sdpa" or "eager"
    layer: int
    layer_source: str
    q: fx.Node
    k: fx.Node  # without repeat_kv
    v: fx.Node
    scale: float
    softcap: float
    mask: MaskDescription | None  # None: is_causal=True without a mask
    stripped_repeat_kv: bool
    rope: RopeSite | None = None


@dataclass
class Skip:
    node: str
    pattern: str
    layer: int | None
    reason: str


@dataclass
class Rewrite:
    node: str
    op_node: str
    layer: int
    pattern: str
    scale: float
    softcap: float
    model_window: int
    rotary_dim: int
    rope_layout: str
    inv_freq_source: str
    q_positions: str
    kv_valid: str
    stripped_repeat_kv: bool


@dataclass
class PassContext:
    """State that flows through the ordered passes of one graph."""

    config: IHipConfig
    sites: list[AttentionSite] = field(default_factory=list)
    skips: list[Skip] = field(default_factory=list)
    rewrites: list[Rewrite] = field(default_factory=list)
    removed_nodes: list[str] = field(default_factory=list)
