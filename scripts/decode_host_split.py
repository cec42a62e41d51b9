"""Where the host time of a decode step goes before its whole-step graph runs (CUDA only).

    python scripts/decode_host_split.py [--context 1048576] [--options JSON] [--out FILE]

The end-to-end benchmark's model (Llama-3.1-8B shapes, random weights, 4 layers, ``infinitehip``
backend, K/V in host memory) decodes three refresh cycles, then two timed ones. Each timed step
notes ``time.perf_counter_ns`` when it starts, when each segment and the whole-step module are
entered and left, around the hooks' checks (``step_lengths``) and the capture check
(``_captured_for``), when the whole-step graph is launched and when the call returns; CUDA events
at the step's start and around the launch give how long the GPU waited for the graph and how
long the graph ran. For the steps that replayed the whole graph it prints the mean time of each
mark from the step's start, and the wall time of the others (refresh steps). The marks cost a
few microseconds each: compare runs of this script with each other.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from ihip_compile.bench.e2e import _sync, build_model, fill_cache
from ihip_compile.config import IHipConfig
from ihip_compile.cuda_graph_segment import GraphedSegment
from ihip_compile.decode_step_replay import StepReplay
from ihip_compile.kernels import step_capture
from ihip_compile.offload import OffloadedCache

MARKS: list[tuple[str, int, torch.cuda.Event | None]] = []


def mark(name: str, event: bool = False) -> None:
    recorded = None
    if event:
        recorded = torch.cuda.Event(enable_timing=True)
        recorded.record()
    MARKS.append((name, time.perf_counter_ns(), recorded))


def _wrap(owner, name: str, label: str) -> None:
    """Mark entering and leaving ``owner.name``."""
    original = getattr(owner, name)

    def wrapped(*args, **kwargs):
        mark(f"{label}_in")
        try:
            return original(*args, **kwargs)
        finally:
            mark(f"{label}_out")

    setattr(owner, name, wrapped)


def _time_whole_replays() -> None:
    original = StepReplay._replay

    def replay(self, args, lengths):
        launch = self.replay

        def timed():
            mark("whole_graph_launch", event=True)
            launch()
            mark("whole_graph_launched", event=True)

        self.replay = timed
        try:
            return original(self, args, lengths)
        finally:
            self.replay = launch

    StepReplay._replay = replay


def _instrument() -> None:
    _wrap(GraphedSegment, "forward", "segment")
    _wrap(StepReplay, "forward", "whole_step")
    _wrap(StepReplay, "_captured_for", "captured_for")
    _wrap(step_capture, "step_lengths", "step_lengths")
    _time_whole_replays()


def _step_record() -> dict:
    t0 = MARKS[0][1]
    events = {name: e for name, _, e in MARKS if e is not None}
    record = {"marks_us": [(name, (t - t0) / 1e3) for name, t, _ in MARKS],
              "gpu_us_total": 1e3 * events["start"].elapsed_time(events["logits_read"])}
    if "whole_graph_launch" in events:
        record["gpu_us_waiting_for_graph"] = 1e3 * events["start"].elapsed_time(
            events["whole_graph_launch"])
        record["gpu_us_graph"] = 1e3 * events["whole_graph_launch"].elapsed_time(
            events["whole_graph_launched"])
    return record


def _summary(steps: list[dict]) -> dict:
    def mean(values):
        return sum(values) / len(values)

    replayed = [s for s in steps if "gpu_us_graph" in s]
    summary = {"steps": len(steps), "replayed": len(replayed)}
    if replayed:
        summary["replayed_wall_us"] = mean([s["marks_us"][-1][1] for s in replayed])
        for key in ("gpu_us_waiting_for_graph", "gpu_us_graph"):
            summary[key] = mean([s[key] for s in replayed])
        names = [n for n, _ in replayed[0]["marks_us"]]
        if all([n for n, _ in s["marks_us"]] == names for s in replayed):
            summary["replayed_marks_us"] = [
                (n, round(mean([s["marks_us"][j][1] for s in replayed]), 1))
                for j, n in enumerate(names)]
    summary["other_wall_us"] = [round(s["marks_us"][-1][1]) for s in steps
                                if "gpu_us_graph" not in s]
    return summary


def main() -> None:
    p = argparse.ArgumentParser(prog="scripts/decode_host_split.py")
    p.add_argument("--context", type=int, default=1 << 20)
    p.add_argument("--options", default="{}", help="infinitehip options as JSON")
    p.add_argument("--out", default="decode_host_split.json")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("scripts/decode_host_split.py needs a CUDA GPU")
    _instrument()
    device, dtype = torch.device("cuda"), torch.bfloat16
    config = IHipConfig.from_options(json.loads(args.options))
    model = build_model(4, device, dtype, tiny=False)
    ours = torch.compile(model, backend="infinitehip", options=config.as_dict())
    cycle = max(config.refresh_intervals)
    cache = OffloadedCache(model.config, max_cache_tokens=args.context + 6 * cycle + 8,
                           dtype=dtype, device=device, ihip_config=config)
    fill_cache(cache, model, args.context, device, dtype)
    token = torch.randint(3, model.config.vocab_size, (1, 1), device=device)
    steps = []
    with torch.no_grad():
        for i in range(5 * cycle):
            _sync(device)
            MARKS.clear()
            mark("start", event=True)
            out = ours(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1)
            mark("returned")
            token = out.logits[:, -1:].argmax(-1)
            mark("logits_read", event=True)
            _sync(device)
            mark("synced")
            if i >= 3 * cycle:
                steps.append(_step_record())
    summary = {"context": args.context, "options": json.loads(args.options),
               "torch": torch.__version__, **_summary(steps)}
    print(json.dumps(summary, indent=1))
    with open(args.out, "w") as f:
        json.dump({"summary": summary, "steps": steps}, f)


if __name__ == "__main__":
    main()
