"""Our op and backend under PyTorch's own tensor parallelism: 2 CPU processes, gloo.

transformers shards the model (``DistributedConfig(tp_size=2)``: q/k/v and MLP up projections by
columns, so each rank holds half of the heads; o and down projections by rows, summed by an
all-reduce). Each rank must run ``torch.ops.ihip.attention`` on its local heads only, and the
greedy tokens and their logits must be those of the same model in one process.

One ``torchrun`` launch runs every tensor-parallel case and one plain process every reference case
(``tp_worker.py``), side by side, so start-up is paid twice in all.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import transformers

from tests.models import tiny_hf

WORKER = Path(__file__).with_name("tp_worker.py")
WORLD_SIZE = 2
LAYERS = 2
HEADS, KV_HEADS = 4, 2  # tiny_hf's GQA shape: 2 query heads and 1 KV head per rank
PROMPT_TOKENS, NEW_TOKENS = 24, 4
# Small enough that the sparse path really selects at 24 tokens: 2 sinks, a 4-token window and
# 4 selected keys out of up to 18 candidates, in two pruning stages.
SPARSE_OP_KWARGS = {
    "dense_below_tokens": 0, "block_size_q": 8, "sink_tokens": 2, "window_tokens": 4,
    "selected_tokens": 4, "stage_chunks": [8, 2], "stage_keeps": [8, 4],
}
# selection_scope="kv_head": one selection per KV head, the scope that shards.
SPARSE_KV_HEAD_KWARGS = {**SPARSE_OP_KWARGS, "per_kv_head": True}

# SmolLM2's head counts (9 query / 3 KV) at a tiny width: they do not split into 2 ranks, so
# tp_plan_for replicates attention and shards only the MLP and the output head.
HEADS9 = transformers.LlamaConfig(
    vocab_size=96, hidden_size=72, intermediate_size=96, num_hidden_layers=LAYERS,
    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=256,
    tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)

TP_CASES = [
    # the user's recipe: model.compile(backend=...) then generate(); default options (dense path
    # at this length), so the result must be the unmodified model's
    {"name": "backend", "backend": "infinitehip_eager"},
    {"name": "op_sparse", "attention": "op", "op_kwargs": SPARSE_OP_KWARGS},
    {"name": "op_sparse_kv_head", "attention": "op", "op_kwargs": SPARSE_KV_HEAD_KWARGS},
    {"name": "heads9_op", "model": "heads9", "attention": "op"},
]
REFERENCE_CASES = [
    {"name": "model", "attention": "sdpa"},
    {"name": "model_fp64", "attention": "sdpa", "dtype": "float64"},
    {"name": "heads9", "model": "heads9", "attention": "sdpa"},
    {"name": "heads9_fp64", "model": "heads9", "attention": "sdpa", "dtype": "float64"},
    {"name": "op_sparse", "attention": "op", "op_kwargs": SPARSE_OP_KWARGS},
    {"name": "op_sparse_kv_head", "attention": "op", "op_kwargs": SPARSE_KV_HEAD_KWARGS},
    # the op called once per half of the heads: what the two ranks compute
    {"name": "op_sparse_by_rank_heads", "attention": "op",
     "op_kwargs": {**SPARSE_OP_KWARGS, "head_groups": WORLD_SIZE}},
]

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(),
    reason="needs torch.distributed with the gloo backend",
)


def _launch(cases, models: Path, out: Path, world_size: int) -> subprocess.Popen:
    args = [str(WORKER), "--models", str(models), "--out", str(out),
            "--cases", json.dumps(cases), "--prompt-tokens", str(PROMPT_TOKENS),
            "--new-tokens", str(NEW_TOKENS)]
    if world_size > 1:
        args = ["-m", "torch.distributed.run", "--standalone",
                f"--nproc-per-node={world_size}", *args]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait(process: subprocess.Popen, what: str, timeout: float) -> None:
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        pytest.fail(f"{what} ran past {timeout} s:\n{output[-4000:]}")
    assert process.returncode == 0, f"{what} failed:\n{output[-4000:]}"


def _run(tmp_path_factory, tp_cases, reference_cases, timeout=600.0):
    root = tmp_path_factory.mktemp("tp")
    models = root / "models"
    tiny_hf.build("llama", seed=0).save_pretrained(models / "llama")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(HEADS9).save_pretrained(models / "heads9")
    tp = _launch(tp_cases, models, root / "tp", WORLD_SIZE)
    one = _launch(reference_cases, models, root / "one", 1)
    _wait(one, "the 1-process reference", timeout)
    _wait(tp, f"the {WORLD_SIZE}-process tensor-parallel run", timeout)

    def load(kind, name):
        ranks = WORLD_SIZE if kind == "tp" else 1
        return [torch.load(root / kind / name / f"rank{r}.pt") for r in range(ranks)]

    return load


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return _run(tmp_path_factory, TP_CASES, REFERENCE_CASES)


def _tolerance(results, model="model") -> float:
    """Data-derived bound for fp32 logits: 3x the 1-process fp32 error against fp64, plus eps.

    Tensor parallelism only reorders sums (row-sharded projections add partial products across
    ranks), so a rank may be off the fp32 reference by its own error plus the reference's.
    """
    fp32, fp64 = results("one", model)[0], results("one", f"{model}_fp64")[0]
    assert torch.equal(fp32["tokens"], fp64["tokens"])
    err = (fp32["logits"].double() - fp64["logits"]).abs().max().item()
    magnitude = max(fp64["logits"].abs().max().item(), 1.0)
    return 3 * err + 8 * torch.finfo(torch.float32).eps * magnitude


def _assert_same_as(ranks, reference, tolerance):
    for r, result in enumerate(ranks):
        assert result["world_size"] == WORLD_SIZE
        assert torch.equal(result["tokens"], reference["tokens"]), (
            f"rank {r}: tokens {result['tokens'].tolist()} != {reference['tokens'].tolist()}"
        )
        err = (result["logits"] - reference["logits"]).abs().max().item()
        assert err <= tolerance, f"rank {r}: logits differ by {err:.3g} > {tolerance:.3g}"


def _assert_local_heads(result):
    """Every op call saw this rank's half of the heads: prefill once, then one token per step."""
    head_dim = tiny_hf._COMMON["hidden_size"] // HEADS
    local = HEADS // WORLD_SIZE
    assert result["local_q_rows"] == local * head_dim, "the model was not sharded"
    assert result["local_kv_heads"] == KV_HEADS // WORLD_SIZE
    expected = [[1, local, PROMPT_TOKENS, head_dim]] * LAYERS
    expected += [[1, local, 1, head_dim]] * LAYERS * (NEW_TOKENS - 1)
    assert result["op_calls"] == expected


def test_backend_rewrites_every_layer_on_each_rank(results):
    for result in results("tp", "backend"):
        assert result["graphs"], "the backend compiled no graph"
        for graph in result["graphs"]:
            assert graph["rewritten_layers"] == list(range(LAYERS)), graph["skips"]
        _assert_local_heads(result)


def test_backend_under_tensor_parallel_matches_one_process(results):
    _assert_same_as(results("tp", "backend"), results("one", "model")[0], _tolerance(results))


def test_sparse_op_runs_on_local_heads(results):
    for result in results("tp", "op_sparse"):
        _assert_local_heads(result)


def test_sparse_op_per_rank_equals_op_on_that_ranks_heads(results):
    """Nothing crosses ranks: each rank's sparse attention is the op on its own heads."""
    reference = results("one", "op_sparse_by_rank_heads")[0]
    _assert_same_as(results("tp", "op_sparse"), reference, _tolerance(results))


def test_attention_is_replicated_when_heads_do_not_divide(results):
    """9 query / 3 KV heads on 2 ranks: the op sees all heads, the MLP is still sharded."""
    for result in results("tp", "heads9_op"):
        assert result["local_kv_heads"] == HEADS9.num_key_value_heads
        assert result["local_mlp_rows"] == HEADS9.intermediate_size // WORLD_SIZE
        head_dim = HEADS9.hidden_size // HEADS9.num_attention_heads
        assert result["op_calls"][0] == [1, HEADS9.num_attention_heads, PROMPT_TOKENS, head_dim]
        assert len(result["op_calls"]) == LAYERS * NEW_TOKENS
    _assert_same_as(results("tp", "heads9_op"), results("one", "heads9")[0],
                    _tolerance(results, "heads9"))


def test_per_kv_head_sparse_op_under_tensor_parallel_matches_one_process(results):
    """Selection per KV head: sharding heads changes nothing on the sparse path either."""
    _assert_same_as(results("tp", "op_sparse_kv_head"), results("one", "op_sparse_kv_head")[0],
                    _tolerance(results))


def test_per_layer_sparse_op_under_tensor_parallel_selects_from_local_heads(results):
    """The default scope selects from all heads' scores, so a rank holding half of them selects
    differently from one process: the setting really selects, and the scope matters here."""
    reference = results("one", "op_sparse")[0]
    for result in results("tp", "op_sparse"):
        assert not torch.equal(result["logits"], reference["logits"])


# Minutes on 2 CPU cores (Inductor's C++ compile on every rank, or a whole benchmark run).
slow = pytest.mark.skipif(
    os.environ.get("IHIP_SLOW_TESTS") != "1", reason="slow on CPU; IHIP_SLOW_TESTS=1 runs it"
)


@pytest.mark.slow
@slow
def test_inductor_backend_under_tensor_parallel_matches_one_process(tmp_path_factory):
    slow_results = _run(
        tmp_path_factory, [{"name": "backend", "backend": "infinitehip"}], REFERENCE_CASES[:2],
        timeout=1800.0,
    )
    for result in slow_results("tp", "backend"):
        _assert_local_heads(result)
    _assert_same_as(slow_results("tp", "backend"), slow_results("one", "model")[0],
                    _tolerance(slow_results))


@pytest.mark.slow
@slow
def test_tp_benchmark_gives_the_same_tokens_on_one_and_two_processes(tmp_path):
    """The GPU benchmark's CPU smoke run, dense path: both sections agree token for token."""
    args = ["--tiny", "--backend", "infinitehip_eager", "--out", str(tmp_path / "out"),
            "--model-cache", str(tmp_path / "models"), "--options",
            json.dumps({"dense_below_tokens": 1 << 20})]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    for launcher in ([], ["-m", "torch.distributed.run", "--standalone",
                          f"--nproc-per-node={WORLD_SIZE}"]):
        done = subprocess.run([sys.executable, *launcher, "-m", "ihip_compile.bench", "tp", *args],
                              env=env, capture_output=True, text=True, timeout=1800)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    one, two = (json.loads((tmp_path / "out" / f"tp_{n}gpu_tiny.json").read_text())
                for n in (1, WORLD_SIZE))
    assert two["tp_size"] == WORLD_SIZE and two["local_kv_heads"] == one["local_kv_heads"] // 2
    for section in ("tokens", "decode"):
        assert [r["tokens"] for r in one[section]] == [r["tokens"] for r in two[section]]
