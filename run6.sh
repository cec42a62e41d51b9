#!/usr/bin/env bash
set -u
export PYTHONUNBUFFERED=1
R=/tmp/res6; mkdir -p $R
python3 -m pip install -q --no-deps --no-build-isolation -e . > $R/install.log 2>&1 || { tail $R/install.log; exit 1; }
timeout 150 python3 -m pytest -q tests/offload/test_decode_step_graph.py tests/kernels/test_prune_stage.py tests/offload/test_decode_selection_cache.py tests/kernels/test_exact_probe_option.py tests/kernels/test_positioned_scoring.py > $R/tests.log 2>&1
echo "tests rc $?"; grep -E "FAILED|passed|failed" $R/tests.log | tail -8
prof() { n=$1; shift; timeout 110 python3 scripts/decode_step_profile.py --context 1048576 --cycles 2 --profiler none --out-dir $R/$n "$@" > $R/$n.log 2>&1; echo "$n rc $?"; tail -1 $R/$n.log; }
prof fp8 --fp8
prof default
tar -czf $OUT/res6.tgz -C /tmp res6
