"""The padding check is asked once per mask tensor, and never answers for another tensor."""

import pytest
import torch

from ihip_compile.kernels import padding_check


def test_answer_is_kept_for_the_same_tensor_only(monkeypatch):
    calls = []
    real_cumprod = torch.Tensor.cumprod
    monkeypatch.setattr(torch.Tensor, "cumprod",
                        lambda t, *a: calls.append(1) or real_cumprod(t, *a))
    valid = torch.ones(2, 50, dtype=torch.bool)
    assert padding_check.hides_nothing(valid) and padding_check.hides_nothing(valid)
    assert len(calls) == 1  # the second layer of the forward trusts the first's answer
    valid[1, 3] = False  # written in place: asked again
    assert not padding_check.hides_nothing(valid)
    other = torch.ones(2, 50, dtype=torch.bool)
    other[0, 0] = False
    assert not padding_check.hides_nothing(other)  # another tensor: its own answer
    assert len(calls) == 3


def _rows(*lengths_and_holes, width=12):
    valid = torch.zeros(len(lengths_and_holes), width, dtype=torch.bool)
    for row, (length, hole) in enumerate(lengths_and_holes):
        valid[row, :length] = True
        if hole is not None:
            valid[row, hole] = not valid[row, hole]
    return valid


@pytest.mark.parametrize("rows,expected", [
    (((12, None), (12, None)), 12),  # hides nothing
    (((7, None), (7, None)), 7),  # a static cache's unused slots
    (((7, None), (6, None)), None),  # rows of different lengths
    (((7, None), (7, 2)), None),  # a hole: padding inside the row
    (((7, None), (7, 9)), None),  # a valid key after the unused slots
    (((0, None), (0, None)), None),  # nothing valid
])
def test_valid_prefix(rows, expected):
    assert padding_check.valid_prefix(_rows(*rows)) == expected
