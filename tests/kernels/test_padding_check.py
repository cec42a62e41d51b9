"""The padding check is asked once per mask tensor, and never answers for another tensor."""

import torch

from ihip_compile.kernels import padding_check


def test_answer_is_kept_for_the_same_tensor_only(monkeypatch):
    calls = []
    real_all = torch.Tensor.all
    monkeypatch.setattr(torch.Tensor, "all", lambda t, *a: calls.append(1) or real_all(t, *a))
    valid = torch.ones(2, 50, dtype=torch.bool)
    assert padding_check.hides_nothing(valid) and padding_check.hides_nothing(valid)
    assert len(calls) == 1  # the second layer of the forward trusts the first's answer
    valid[1, 3] = False  # written in place: asked again
    assert not padding_check.hides_nothing(valid)
    other = torch.ones(2, 50, dtype=torch.bool)
    other[0, 0] = False
    assert not padding_check.hides_nothing(other)  # another tensor: its own answer
    assert len(calls) == 3
