"""Graph reports for the tiny test models (``python -m ihip_compile report``).

The models are built from configs in the repository's ``tests/models`` (random weights, no
downloads); each is compiled once with a left-padded batch of two prompts, and the report of that
forward graph is written under ``<out>/<model>/``. The golden copies in ``reports/graphs`` come
from here, so a change in what the passes do shows up as a reviewable diff.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch

GOLDEN_MODELS = ("llama", "gemma2", "phi3", "gpt_fast")
_TESTS_DIR = Path(__file__).resolve().parents[1] / "tests"


def available_models() -> tuple[str, ...]:
    return (*_tiny_hf().FAMILIES, "gpt_fast")


def _tiny_hf():
    if not (_TESTS_DIR / "models").is_dir():
        raise ValueError(
            f"tiny models not found: {_TESTS_DIR / 'models'} (needs a source checkout)"
        )
    if str(_TESTS_DIR) not in sys.path:
        sys.path.insert(0, str(_TESTS_DIR))
    from models import tiny_hf

    return tiny_hf


def _call(name: str):
    """(model, inputs) for one forward call of the named tiny model."""
    tiny_hf = _tiny_hf()
    generator = torch.Generator().manual_seed(0)
    if name == "gpt_fast":
        from models import tiny_gpt_fast

        model = tiny_gpt_fast.build()
        ids = torch.randint(0, model.args.vocab_size, (2, 10), generator=generator)
        return model, (ids,), {}
    if name not in tiny_hf.FAMILIES:
        raise ValueError(f"unknown model {name!r}; allowed: {list(available_models())}")
    model = tiny_hf.build(name)
    ids = torch.randint(3, tiny_hf.VOCAB, (2, 10), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return model, (ids,), {"attention_mask": mask}


def stack_versions() -> dict[str, str]:
    """The versions that decide the traced graph text (golden reports hold for these only)."""
    import transformers

    return {"torch": ".".join(torch.__version__.split(".")[:2]),
            "transformers": transformers.__version__}


def write_model_report(name: str, out_dir: str | Path) -> Path:
    """Compile ``name`` with reports on; return the directory holding graph_00.md/.json."""
    from ihip_compile import capture, report
    from ihip_compile.backend import backend

    target = Path(out_dir) / name
    if target.exists():
        shutil.rmtree(target)
    model, args, kwargs = _call(name)
    capture.reset_dynamo()
    report.reset_numbering(str(target))
    with torch.no_grad():
        torch.compile(model, backend=backend(report_dir=str(target), eager=True))(*args, **kwargs)
    capture.reset_dynamo()
    return target
