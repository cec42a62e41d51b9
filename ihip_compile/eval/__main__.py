"""``python -m ihip_compile.eval``: see the package docstring; ``--help`` lists the flags."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ihip_compile.config import IHipConfig
from ihip_compile.eval import report, run
from ihip_compile.eval.paths import PATHS, ModelRunner
from ihip_compile.layer_policy import with_model_facts

# Budgets scaled down so that a CPU run reaches the sparse path (and remapping) at a few
# thousand tokens; the GPU runs use the paper's defaults.
CPU_SMALL = {
    "dense_below_tokens": 1024, "block_size_q": 64, "sink_tokens": 64,
    "sliding_window_tokens": 256, "selected_tokens": 256,
    "stages": [[64, 2048], [16, 512], [8, 256]], "refresh_intervals": [4, 2, 1],
}
PRESETS = {"paper": {}, "cpu-small": CPU_SMALL}


def tokens(text: str) -> int:
    """'2k' -> 2048, '1m' -> 1048576, '3000' -> 3000."""
    text = text.strip().lower()
    scale = {"k": 1024, "m": 1024 * 1024}.get(text[-1:], 1)
    try:
        return int(float(text[:-1] if scale > 1 else text) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a token count: {text!r} (e.g. 2k, 1m, 3000)")


def token_list(text: str) -> list[int]:
    return [tokens(t) for t in text.split(",") if t.strip()]


def float_list(text: str) -> list[float]:
    return [float(t) for t in text.split(",") if t.strip()]


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ihip_compile.eval", description=__doc__)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--lengths", type=token_list, default=None,
                   help="perplexity lengths; default 2k,4k,8k,32k,128k on cuda, 2k,4k on cpu")
    p.add_argument("--passkey-lengths", type=token_list, default=None,
                   help="default: the perplexity lengths")
    p.add_argument("--depths", type=float_list, default=None,
                   help="passkey depths in [0, 1]; default 0,0.25,0.5,0.75,1 (cpu: 0,0.5,1)")
    p.add_argument("--samples", type=int, default=None, help="passkeys per (length, depth)")
    p.add_argument("--tasks", default="perplexity,passkey")
    p.add_argument("--modes", default="dense,infinitehip")
    p.add_argument("--path", choices=PATHS, default="backend",
                   help="backend: torch.compile with our backend; interface: the op directly")
    p.add_argument("--eager", action="store_true",
                   help="with --path backend: run the rewritten graph without Inductor")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="option preset: paper (defaults; cuda default) or cpu-small (cpu default)")
    p.add_argument("--options", default="{}", help="JSON of IHipConfig options over the preset")
    p.add_argument("--calibrate", action="store_true",
                   help="layer_policy='calibrated', measured on --calibrate-tokens of essay")
    p.add_argument("--calibrate-tokens", type=tokens, default=None)
    p.add_argument("--out", type=Path, default=Path("reports/eval"))
    args = p.parse_args(argv)
    gpu = args.device.startswith("cuda")
    args.dtype = getattr(torch, args.dtype or ("bfloat16" if gpu else "float32"))
    args.lengths = args.lengths or token_list("2k,4k,8k,32k,128k" if gpu else "2k,4k")
    args.passkey_lengths = args.passkey_lengths or args.lengths
    args.depths = args.depths or ([0, 0.25, 0.5, 0.75, 1.0] if gpu else [0.0, 0.5, 1.0])
    args.samples = args.samples or (2 if gpu else 1)
    args.preset = args.preset or ("paper" if gpu else "cpu-small")
    args.tasks = [t for t in args.tasks.split(",") if t]
    args.modes = [m for m in args.modes.split(",") if m]
    for task in args.tasks:
        if task not in ("perplexity", "passkey"):
            raise SystemExit(f"--tasks: unknown task {task!r}; allowed: perplexity, passkey")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    from ihip_compile.smollm2 import load_smollm2

    model, tokenizer = load_smollm2(dtype=args.dtype, device=args.device)
    options = {**PRESETS[args.preset], **json.loads(args.options)}
    config = with_model_facts(IHipConfig.from_options(options), model)
    if args.calibrate:
        from ihip_compile.eval.data import essay_tokens, text_window
        from ihip_compile.layer_calibration import calibrate

        length = args.calibrate_tokens or 2 * (
            config.sink_tokens + config.sliding_window_tokens + config.selected_tokens)
        # the essays' last tokens: away from the eval windows, which start at the beginning
        text = essay_tokens(tokenizer)
        sample = text_window(text[-min(length, text.numel()):], length).to(args.device)
        config = calibrate(model, sample, config)
    runner = ModelRunner(model, config, path=args.path, eager=args.eager)
    results = {
        "model": "SmolLM2-135M-Instruct", "device": args.device, "dtype": str(args.dtype),
        "path": args.path + (" (eager)" if args.eager else ""), "modes": args.modes,
        "config": config.as_dict(), "torch": torch.__version__,
    }
    # Results are written after each task, so a run cut short keeps what it measured.
    if "perplexity" in args.tasks:
        results["perplexity"] = run.perplexity(runner, tokenizer, args.lengths, args.modes,
                                               args.device)
        report.write(results, args.out)
    if "passkey" in args.tasks:
        results["passkey"] = run.passkey(runner, tokenizer, args.passkey_lengths, args.depths,
                                         args.samples, args.modes, args.device)
    print(report.table(results))
    for path in report.write(results, args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
