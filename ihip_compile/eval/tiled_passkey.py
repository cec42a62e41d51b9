"""Pass-key caches of 16k+ tokens that cost a few hundred tokens of compute, needle anywhere.

A full prefill of a long prompt takes minutes on a CPU, and far longer through the torch
references of the sparse kernels. Pass-key filler is one sentence repeated, so after a few
repeats the model's keys and values for it settle into a steady period. The cache is built as:
    head     intro + two filler sentences, run by the model at positions 0.. (exact);
    body     one steady-state filler period (taken after ~500 tokens of filler context), copied
             to every later period, each copy's keys re-rotated to its own positions (RoPE
             rotations compose, ``rope_delta_ref.rotate_by_delta``);
    needle   the key sentence and two filler sentences, run by the model after the same filler
             context and re-rotated to its place: right after the head, or at ``needle_at``
             (snapped to the filler period) inside the body;
    tail     the question (after ``--question-lead`` filler periods), run by the model (dense
             or through the op) against that cache.
Key positions run 0..S_K-1 and keys are rotated exactly as a transformers cache holds them; only
the body's and the needle's hidden states are approximated (computed in a ~500-token context).

    python -m ihip_compile.eval.tiled_passkey --context 16384 --needle-at 8179,12279 \\
        --preset cpu-small --options '{"first_probe_parts": 64}'

answers the pass key with infinitehip for each needle position and prints, per position,
whether the key was found and in how many layers the question attended every needle block.
``--device cuda`` runs it in bf16 on a GPU, where contexts of 1M tokens fit: the cache costs two
short forwards and one rotation per layer, not a 1M-token prefill.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import dataclass

import torch

from ihip_compile.eval.data import PASSKEY_FILLER, PASSKEY_INTRO, PASSKEY_QUESTION
from ihip_compile.kernels.rope_delta_ref import ROPE_ROTATE_HALF, rotate_by_delta
from ihip_compile.layer_calibration import model_rope

WARMUP_PERIODS = 20
ANSWER_TOKENS = 6  # a space and five digits


@dataclass
class TiledPasskey:
    cache: object  # DynamicCache holding the prompt up to the question
    question: torch.Tensor  # [1, T] ids
    key: str
    needle_at: int  # position of the needle's first token
    needle_tokens: int


@torch.no_grad()
def tiled_passkey_cache(model, tokenizer, total_tokens: int, seed: int,
                        needle_at: int | None = None, question_lead: int = 0) -> TiledPasskey:
    """A ~``total_tokens`` cache with the needle right after the head, or at ``needle_at``;
    ``question_lead`` filler periods go before the question into the tail, so that it ends a
    call of several query blocks, as it ends a real prompt."""
    ids = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    key = str(random.Random(seed).randint(10000, 99999))
    filler = ids(PASSKEY_FILLER)
    period = len(filler)
    head = ids(PASSKEY_INTRO) + filler * 2
    needle = ids(f"The pass key is {key}. Remember it. {key} is the pass key. ") + filler * 2
    question = filler * question_lead + ids(PASSKEY_QUESTION)
    copies = (total_tokens - len(head) - len(needle) - len(question)) // period
    if copies <= WARMUP_PERIODS:
        raise ValueError(f"total_tokens {total_tokens} leaves no room for tiled filler")
    before = 0 if needle_at is None else round((needle_at - len(head)) / period)
    if not 0 <= before <= copies:
        raise ValueError(f"needle_at {needle_at} is outside the filler, allowed: "
                         f"{len(head)}..{len(head) + copies * period}")
    context = ids(PASSKEY_INTRO) + filler * WARMUP_PERIODS
    device = next(model.parameters()).device
    head_cache = model(torch.tensor([head], device=device), use_cache=True).past_key_values
    in_context = model(torch.tensor([context + needle], device=device),
                       use_cache=True).past_key_values
    inv_freq, rotary_dim, layout = model_rope(model)
    if layout != ROPE_ROTATE_HALF:
        raise ValueError("tiled caches support rotate_half RoPE models only")
    steady_at = len(context) - period  # the steady filler period's first position
    needle_pos = len(head) + before * period
    place = _Placer(inv_freq, rotary_dim, layout, period, steady_at)
    from transformers import DynamicCache

    cache = DynamicCache()
    for layer in range(len(head_cache.layers)):
        keys, values = in_context.layers[layer].keys, in_context.layers[layer].values
        period_kv = (keys[:, :, steady_at: len(context)], values[:, :, steady_at: len(context)])
        needle_kv = (keys[:, :, len(context):], values[:, :, len(context):])
        parts = [(head_cache.layers[layer].keys, head_cache.layers[layer].values),
                 place.periods(period_kv, before, len(head)),
                 place.shifted(needle_kv, needle_pos - len(context)),
                 place.periods(period_kv, copies - before, needle_pos + len(needle))]
        cache.update(torch.cat([k for k, _ in parts], 2), torch.cat([v for _, v in parts], 2),
                     layer)
    return TiledPasskey(cache, torch.tensor([question], device=device), key, needle_pos,
                        len(needle) - 2 * period)


@dataclass
class _Placer:
    """Moves keys computed at one place to another by rotating them (values do not move)."""

    inv_freq: torch.Tensor
    rotary_dim: int
    layout: int
    period: int
    steady_at: int

    def shifted(self, kv, delta: int):
        k, v = kv
        return rotate_by_delta(k, torch.tensor(delta, device=k.device), self.inv_freq,
                               self.rotary_dim, self.layout), v

    def periods(self, kv, count: int, first: int):
        """``count`` copies of the steady period, the first at position ``first``."""
        k, v = kv
        shifts = first + self.period * torch.arange(count, device=k.device) - self.steady_at
        k_body = rotate_by_delta(
            k.unsqueeze(2).expand(-1, -1, count, -1, -1), shifts[None, None, :, None],
            self.inv_freq, self.rotary_dim, self.layout,
        ).flatten(2, 3)
        return k_body, v.repeat(1, 1, count, 1)


def _needle_blocks(tiled: TiledPasskey, block: int) -> list[int]:
    """The ``block``-token blocks the key sentence covers."""
    first, last = tiled.needle_at // block, (tiled.needle_at + tiled.needle_tokens - 1) // block
    return list(range(first, last + 1))


def _covering(selections: list[list[int]], tiled: TiledPasskey, block: int) -> int:
    """How many selections hold every block of the key sentence."""
    return sum(set(_needle_blocks(tiled, block)) <= set(blocks) for blocks in selections)


class QuestionSelections:
    """While in use, wraps the attention step after the selection (prefill and decode) to record
    the blocks each prefill call's last query block attends (the question's, one call per layer)
    and, given ``force``, to add those blocks to every selection: a miss that persists then is
    not the selection's."""

    def __init__(self, force: list[int] | None = None):
        self.force, self.blocks = sorted(force or []), []

    def __enter__(self):
        from ihip_compile.kernels import decode_selection_cache, sparse_attention

        self._modules = (sparse_attention, decode_selection_cache)
        self._original = sparse_attention.attend_selected_blocks

        def recording(q, k, v, blocks, *args):
            if self.force:
                blocks = _with_blocks(blocks, self.force)
            if q.shape[2] > 1:
                self.blocks.append(blocks[0, -1].tolist())
            return self._original(q, k, v, blocks, *args)

        for module in self._modules:
            module.attend_selected_blocks = recording
        return self

    def __exit__(self, *exc):
        for module in self._modules:
            module.attend_selected_blocks = self._original


def _with_blocks(blocks: torch.Tensor, force: list[int]) -> torch.Tensor:
    """Selections [..., TOPK] (sorted, -1 last) with ``force`` added; the earliest other blocks
    make room where a row is full."""
    rows = []
    for row in blocks.reshape(-1, blocks.shape[-1]).tolist():
        others = [b for b in row if b >= 0 and b not in force]
        others = others[max(0, len(others) + len(force) - len(row)):]
        merged = sorted(others + force)
        rows.append(merged + [-1] * (len(row) - len(merged)))
    return torch.tensor(rows, dtype=blocks.dtype, device=blocks.device).view(blocks.shape)


def _parse(argv):
    from ihip_compile.eval.__main__ import PRESETS

    p = argparse.ArgumentParser(prog="python -m ihip_compile.eval.tiled_passkey",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, default=16384)
    p.add_argument("--needle-at", default="8179", help="comma-separated token positions")
    p.add_argument("--preset", default="cpu-small", choices=sorted(PRESETS))
    p.add_argument("--options", default="{}", help="extra infinitehip options as JSON")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", default=None, help="write the rows as JSON to this file")
    p.add_argument("--device", default="cpu", help="cpu (fp32) or cuda (bf16)")
    p.add_argument("--question-lead", type=int, default=0,
                   help="filler periods run before the question in its call, so that the "
                        "question ends a call of several query blocks, as in a real prompt")
    p.add_argument("--attend-needle", action="store_true",
                   help="add the key sentence's blocks to every selection (tells selection "
                        "misses from other misses)")
    args = p.parse_args(argv)
    args.options = {**PRESETS[args.preset], **json.loads(args.options)}
    args.needle_at = [int(x) for x in args.needle_at.split(",") if x]
    return args


def main(argv=None) -> int:
    from ihip_compile.config import IHipConfig
    from ihip_compile.eval.paths import ModelRunner, greedy_answer
    from ihip_compile.eval.run import answer_has_key
    from ihip_compile.layer_policy import with_model_facts
    from ihip_compile.smollm2 import load_smollm2

    argv = sys.argv[1:] if argv is None else argv
    args = _parse(argv)
    dtype = torch.bfloat16 if torch.device(args.device).type == "cuda" else torch.float32
    model, tokenizer = load_smollm2(dtype=dtype, device=args.device)
    config = with_model_facts(IHipConfig.from_options(args.options), model)
    runner = ModelRunner(model, config, path="interface")
    rows = []
    for position in args.needle_at:
        tiled = tiled_passkey_cache(model, tokenizer, args.context, args.seed, position,
                                    args.question_lead)
        context = tiled.cache.get_seq_length()
        block = config.stages[-1].chunk_size
        needle = _needle_blocks(tiled, block) if args.attend_needle else None
        with QuestionSelections(needle) as seen:
            new = greedy_answer(runner.forward("infinitehip"), tiled.question, ANSWER_TOKENS,
                                cache=tiled.cache)
        answer = tokenizer.decode(new)
        layers = model.config.num_hidden_layers
        rows.append({"context": context, "needle_at": tiled.needle_at, "answer": answer,
                     "found": answer_has_key(answer, tiled.key),
                     "layers_attending_whole_needle": _covering(seen.blocks[:layers], tiled,
                                                                block),
                     "layers": layers})
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"command": "python -m ihip_compile.eval.tiled_passkey", "argv": argv,
                       "device": args.device, "attend_needle": args.attend_needle,
                       "question_lead": args.question_lead,
                       "options": args.options, "rows": rows}, f,
                      indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
