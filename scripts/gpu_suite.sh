#!/usr/bin/env bash
# One GPU session's work in one command: install offline, then each named section under its own
# time limit, logs and JSON results under $OUT (or ./gpu-out).
#   scripts/gpu_suite.sh tests:150 eval:300 bench-attention bench-e2e demo
# A section may carry its own time limit in seconds after a colon (default IHIP_SECTION_SECONDS).
# Sections: tests (GPU kernel and end-to-end tests), eval (SmolLM2 perplexity and passkey, dense vs
# infinitehip), bench-attention, bench-e2e, demo (the README's main job on the GPU).
set -uo pipefail
out=${OUT:-gpu-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$out/install.log" 2>&1 \
  || { cat "$out/install.log"; exit 1; }
limit_default=${IHIP_SECTION_SECONDS:-300}
status=0
for item in "$@"; do
  section=${item%%:*}
  limit=${limit_default}
  [ "$section" = "$item" ] || limit=${item#*:}
  echo "== $section (limit ${limit}s)"
  case "$section" in
    tests) cmd=(python3 -m pytest -q -x tests/kernels tests/offload tests/e2e/test_smollm2.py
                tests/e2e/test_decode_cuda_graphs.py
                tests/e2e/test_decode_without_host_sync.py) ;;
    eval) cmd=(python3 -m ihip_compile.eval --device cuda ${IHIP_EVAL_ARGS:-} --out "$out/eval") ;;
    bench-attention) cmd=(python3 -m ihip_compile.bench attention ${IHIP_BENCH_ARGS:-} --out "$out/bench") ;;
    bench-e2e) cmd=(python3 -m ihip_compile.bench e2e ${IHIP_E2E_ARGS:-} --out "$out/bench") ;;
    demo) cmd=(python3 -m ihip_compile demo --device cuda ${IHIP_DEMO_ARGS:-}) ;;
    *) echo "unknown section: $section"; exit 2 ;;
  esac
  timeout "$limit" "${cmd[@]}" 2>&1 | tee "$out/$section.log" | tail -40
  rc=${PIPESTATUS[0]}
  echo "== $section exit $rc"
  [ "$rc" -eq 0 ] || status=1
done
exit $status
