"""``bench attention`` with the kernels' RoPE angle reduction on (as shipped) or replaced by the
identity, to measure what it buys in one process per variant on the same inputs:

    python scripts/angle_reduction_ab.py reduced|unreduced <bench attention arguments>
"""

import sys

import triton

if len(sys.argv) < 2 or sys.argv[1] not in ("reduced", "unreduced"):
    raise SystemExit(__doc__)
if sys.argv[1] == "unreduced":
    from ihip_compile.kernels import _primitives

    @triton.jit
    def _identity(angle):
        return angle

    _primitives.reduce_angle = _identity  # before the first compile: the kernels pick it up

from ihip_compile.bench.attention import main  # noqa: E402

sys.exit(main(sys.argv[2:]))
