"""Replace each matched attention site with ``torch.ops.ihip.attention``.

Matches   the AttentionSite list of match_attention (with RoPE from match_rope).
Emits     ihip.attention(q, k, v, q_positions, kv_valid, inv_freq, layer=, scale=, softcap=,
                         model_window=, rotary_dim=, rope_layout=, **sparse_args_for_layer(...))
          q_positions = key index of each query: q_indices - kv_offset from the mask, or
                        arange(S_Q) for is_causal=True (S_Q == S_K there)
          kv_valid    = padding_2d[batch[:, None], kv_indices[None, :]]  ([B, S_K] bool) or None,
                        one node shared by the sites of one mask (the op checks it once: a sync)
          inv_freq    = the traced frequency vector, angle(table[1]) for complex tables, or None
          K/V are the tensors before repeat_kv. The old mask and repeat_kv nodes lose their users
          here and are removed by remove_dead_code.
Skips     none of its own: every site it receives was matched exactly.
Order     after match_attention and match_rope, before remove_dead_code.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

import ihip_compile.kernels.ops  # noqa: F401  (registers torch.ops.ihip)
from ihip_compile.layer_policy import sparse_args_for_layer
from ihip_compile.passes.sites import (
    ROPE_LAYOUT_NAMES, ROPE_NONE, AttentionSite, PassContext, Rewrite,
)


def rewrite_attention(gm: fx.GraphModule, context: PassContext) -> PassResult:
    graph = gm.graph
    shared_kv_valid: dict[tuple, fx.Node] = {}
    for site in context.sites:
        with graph.inserting_before(site.node):
            q_positions, positions_text = _q_positions(graph, site)
            kv_valid, valid_text = _kv_valid(graph, site, shared_kv_valid)
            inv_freq = _inv_freq(graph, site)
            rope = site.rope
            window = site.mask.window if site.mask is not None else 0
            kwargs = dict(
                layer=site.layer,
                scale=site.scale,
                softcap=site.softcap,
                model_window=window,
                rotary_dim=rope.rotary_dim if rope else 0,
                rope_layout=rope.layout if rope else ROPE_NONE,
                **sparse_args_for_layer(context.config, site.layer),
            )
            op = graph.call_function(
                torch.ops.ihip.attention.default,
                (site.q, site.k, site.v, q_positions, kv_valid, inv_freq),
                kwargs,
            )
        op.meta.update({k: v for k, v in site.node.meta.items() if k != "example_value"})
        site.node.replace_all_uses_with(op)
        graph.erase_node(site.node)
        context.rewrites.append(Rewrite(
            node=site.node.name, op_node=op.name, layer=site.layer, pattern=site.pattern,
            scale=site.scale, softcap=site.softcap, model_window=window,
            rotary_dim=kwargs["rotary_dim"], rope_layout=ROPE_LAYOUT_NAMES[kwargs["rope_layout"]],
            inv_freq_source=rope.inv_freq_source if rope else "no RoPE found on the query",
            q_positions=positions_text, kv_valid=valid_text,
            stripped_repeat_kv=site.stripped_repeat_kv,
        ))
    graph.lint()
    gm.recompile()
    return PassResult(gm, bool(context.sites))


def _q_positions(graph: fx.Graph, site: AttentionSite) -> tuple[fx.Node, str]:
    mask = site.mask
    if mask is None:  # is_causal=True, S_Q == S_K: query i is key i
        s_q = graph.call_method("size", (site.q, 2))
        device = graph.call_function(getattr, (site.q, "device"))
        node = graph.call_function(torch.arange, (s_q,), {"device": device})
        return node, "arange(S_Q) (is_causal=True, S_Q == S_K)"
    if isinstance(mask.kv_offset, int) and mask.kv_offset == 0:
        return mask.q_indices, f"{mask.q_indices.name} (mask query indices)"
    node = graph.call_function(operator.sub, (mask.q_indices, mask.kv_offset))
    offset = getattr(mask.kv_offset, "name", mask.kv_offset)
    return node, f"{mask.q_indices.name} - {offset} (mask query indices - key offset)"


def _kv_valid(graph: fx.Graph, site: AttentionSite,
              shared: dict[tuple, fx.Node]) -> tuple[fx.Node | None, str]:
    """The site's [B, S_K] validity, built once per mask (sites come in graph order, so the
    first site's node precedes the others)."""
    mask = site.mask
    if mask is None or mask.padding_source is None:
        return None, "None (no padding mask)"
    key = (mask.padding_source, mask.batch_indices, mask.kv_indices)
    if key not in shared:
        rows = graph.call_function(operator.getitem, (mask.batch_indices, (slice(None), None)))
        cols = graph.call_function(operator.getitem, (mask.kv_indices, (None, slice(None))))
        shared[key] = graph.call_function(operator.getitem, (mask.padding_source, (rows, cols)))
    return shared[key], f"{mask.padding_source.name}[batch, {mask.kv_indices.name}]"


def _inv_freq(graph: fx.Graph, site: AttentionSite) -> fx.Node | None:
    rope = site.rope
    if rope is None or rope.inv_freq is None:
        return None
    if rope.inv_freq_is_table:
        row = graph.call_function(operator.getitem, (rope.inv_freq, 1))
        return graph.call_function(torch.angle, (row,))
    return rope.inv_freq
