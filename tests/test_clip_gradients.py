"""The loop's gradient clipping against torch's clip_grad_norm_ (the reference it must equal bit for bit)."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.train.loop import clip_gradients


def _grads(scale: float, seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.zeros(n)) for n in (7, 300, 33)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * scale
    params.append(torch.nn.Parameter(torch.zeros(3)))  # no gradient: skipped by both
    return params


@pytest.mark.parametrize("scale", [1e-3, 0.05, 10.0, math.inf, math.nan])
def test_clip_gradients_equals_torch_bit_for_bit(scale):
    ours, ref = _grads(scale), _grads(scale)
    norm = clip_gradients(ours, 1.0)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref, 1.0)
    assert torch.equal(norm, ref_norm) or (norm.isnan() and ref_norm.isnan())
    for a, b in zip(ours, ref):
        assert (a.grad is None) == (b.grad is None)
        if a.grad is not None:
            assert torch.equal(a.grad.nan_to_num(7.0), b.grad.nan_to_num(7.0))


def test_clip_gradients_scales_only_over_the_bound():
    under, over = _grads(1e-3), _grads(10.0)
    before = [p.grad.clone() for p in under[:3]]
    assert float(clip_gradients(under, 1.0)) < 1.0
    assert all(torch.equal(p.grad, b) for p, b in zip(under[:3], before))  # untouched
    assert float(clip_gradients(over, 1.0)) > 1.0
    clipped = torch.linalg.vector_norm(torch.cat([p.grad for p in over[:3]]))
    assert clipped == pytest.approx(1.0, rel=1e-5)
