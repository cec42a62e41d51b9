#!/usr/bin/env bash
set -u
export PYTHONUNBUFFERED=1
R=/tmp/res4; mkdir -p $R
python3 -m pip install -q --no-deps --no-build-isolation -e . > $R/install.log 2>&1 || { tail $R/install.log; exit 1; }
timeout 330 python3 -m ihip_compile.bench e2e --layers 4 --backend infinitehip_eager --sections decode,capacity --contexts 1048576,524288,131072 --out $R/bench > $R/bench.log 2>&1
echo "bench rc $?"; tail -30 $R/bench.log
timeout 190 python3 -m pytest -q tests/offload tests/kernels/test_attention_op.py tests/e2e/test_static_cache_sparse.py > $R/tests.log 2>&1
echo "tests rc $?"; grep -E "FAILED|passed|failed" $R/tests.log | tail -12
tar -czf $OUT/res4.tgz -C /tmp res4
