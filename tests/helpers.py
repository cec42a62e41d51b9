"""The one tolerance rule of the test suite, derived from the data (flash-attention's 2x rule
with attention-gym's fp64 reference):

    err(kernel) <= 2 * err(reference in the test dtype) + eps

where errors are max absolute differences from the reference run in fp64 on the same inputs, and
eps is a few units in the last place of the test dtype at the output's magnitude (it only matters
when the low-precision reference happens to be exact, as fp32 references often are).
"""

from __future__ import annotations

import torch


def to_fp64(value):
    """Floating tensors -> fp64 (other values unchanged), for the fp64 stick."""
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.double()
    return value


def assert_matches_reference(out, reference, *args, ulps: float = 8.0, **kwargs):
    """Check ``out`` (a kernel's result) against ``reference(*args, **kwargs)`` by the 2x rule.

    ``reference`` is called on the inputs as they are (the low-precision reference) and on fp64
    copies of their floating tensors (the stick). Returns the three errors for reports.
    """
    ref_low = reference(*args, **kwargs)
    ref_64 = reference(*[to_fp64(a) for a in args],
                       **{k: to_fp64(v) if k != "inv_freq" else v for k, v in kwargs.items()})
    finite = torch.isfinite(ref_64)
    assert torch.equal(torch.isfinite(out.double()), finite), "kernel and reference disagree on -inf"
    out64, low64, ref64 = out.double()[finite], ref_low.double()[finite], ref_64[finite]
    err_kernel = (out64 - ref64).abs().max().item() if ref64.numel() else 0.0
    err_low = (low64 - ref64).abs().max().item() if ref64.numel() else 0.0
    magnitude = max(ref64.abs().max().item() if ref64.numel() else 0.0, 1.0)
    eps = ulps * torch.finfo(out.dtype).eps * magnitude
    assert err_kernel <= 2 * err_low + eps, (
        f"kernel error {err_kernel:.3g} > 2 x reference error {err_low:.3g} + eps {eps:.3g}"
    )
    return err_kernel, err_low, eps
