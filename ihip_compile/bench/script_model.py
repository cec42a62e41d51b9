"""The end-to-end benchmark's model as the profiling scripts under ``scripts/`` build it: their
shared arguments, and the model compiled with the backend those arguments name."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

import torch

from ihip_compile.bench.e2e import build_model
from ihip_compile.config import IHipConfig


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """``--context``, ``--layers``, ``--backend``, ``--options`` and ``--fp8``."""
    p.add_argument("--context", type=int, default=1 << 20)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--backend", default="infinitehip_eager",
                   choices=["infinitehip", "infinitehip_eager"])
    p.add_argument("--options", default="{}", help="infinitehip options as JSON")
    p.add_argument("--fp8", action="store_true",
                   help="store the offloaded K/V as float8_e4m3fn")


@dataclass
class ScriptModel:
    config: IHipConfig
    model: torch.nn.Module  # uncompiled
    ours: torch.nn.Module  # compiled with ``--backend``
    storage_dtype: torch.dtype | None  # of an OffloadedCache (None: the model's dtype)


def compiled_model(args: argparse.Namespace, device, dtype) -> ScriptModel:
    """The benchmark's model (Llama-3.1-8B shapes, random weights, ``args.layers`` layers)."""
    config = IHipConfig.from_options(json.loads(args.options))
    model = build_model(args.layers, device, dtype, tiny=False)
    ours = torch.compile(model, backend=args.backend, options=config.as_dict())
    return ScriptModel(config, model, ours, torch.float8_e4m3fn if args.fp8 else None)
