#!/usr/bin/env bash
set -u
export PYTHONUNBUFFERED=1
R=/tmp/res5; mkdir -p $R
python3 -m pip install -q --no-deps --no-build-isolation -e . > $R/install.log 2>&1 || { tail $R/install.log; exit 1; }
timeout 150 python3 -m pytest -q tests/offload/test_decode_step_graph.py tests/kernels/test_bank_kv_decode.py tests/offload/test_decode_selection_cache.py tests/offload/test_append_step_graph.py tests/e2e/test_decode_without_host_sync.py > $R/tests.log 2>&1
echo "tests rc $?"; grep -E "FAILED|passed|failed" $R/tests.log | tail -8
prof() { n=$1; shift; timeout 110 python3 scripts/decode_step_profile.py --context 1048576 --cycles 2 --profiler none --out-dir $R/$n "$@" > $R/$n.log 2>&1; echo "$n rc $?"; tail -1 $R/$n.log; }
prof default
prof pruning128k --options '{"pruning_cache_tokens": 131072}'
prof fp8 --fp8
tar -czf $OUT/res5.tgz -C /tmp res5
