"""Loss balancers (method.md 1.5): DWA weights from raw window averages, EMA normalisation, state."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.distill.balancer import DynamicBalancer, FixedBalancer, ReferenceCodeBalancer, make_balancer
from pipeline.common.errors import PipelineError

torch.set_num_threads(1)


def synthetic(epoch: int, step: int) -> dict[str, torch.Tensor]:
    """'fast' falls 50% per epoch from 10, 'slow' 5% per epoch from 0.01, both with a little step noise."""
    wiggle = 1.0 + 0.05 * math.sin(step)
    return {"fast": torch.tensor(10.0 * 0.5 ** epoch * wiggle, requires_grad=True),
            "slow": torch.tensor(0.01 * 0.95 ** epoch * wiggle, requires_grad=True)}


def run_epochs(bal, epochs, steps=20, on_step=None):
    avgs = []
    for e in range(epochs):
        vals = []
        for s in range(steps):
            losses = synthetic(e, s)
            total, info = bal(losses)
            vals.append({k: v.item() for k, v in losses.items()})
            if on_step:
                on_step(e, s, losses, total, info)
        avgs.append({k: sum(v[k] for v in vals) / steps for k in vals[0]})
        bal.end_window()
    return avgs


def naive_dwa(older, newer, t):
    r = {k: newer[k] / older[k] for k in newer}
    z = sum(math.exp(v / t) for v in r.values())
    return {k: len(r) * math.exp(v / t) / z for k, v in r.items()}


@pytest.mark.parametrize("temperature", [1.0, 0.05])
def test_slower_falling_loss_gets_larger_weight(temperature):
    bal = DynamicBalancer(["fast", "slow"], temperature=temperature)
    seen = []
    avgs = run_epochs(bal, 4, on_step=lambda e, s, ls, t, i: seen.append((e, i["w/fast"], i["w/slow"])))
    # Weights are exactly 1 until two windows have closed (epochs 0 and 1 here).
    assert all(wf == 1.0 and ws == 1.0 for e, wf, ws in seen if e < 2)
    # From epoch 2 on: DWA from the two previous windows' raw averages; slow (rate .95) beats fast (.5),
    # even though 'slow' is 1000x smaller in magnitude.
    for e, wf, ws in seen:
        if e >= 2:
            want = naive_dwa(avgs[e - 2], avgs[e - 1], temperature)
            assert wf == pytest.approx(want["fast"], rel=1e-9) and ws == pytest.approx(want["slow"], rel=1e-9)
            assert ws > wf and wf + ws == pytest.approx(2.0)
    assert [h["window"] for h in bal.history] == [0, 1, 2, 3]
    assert bal.history[0]["weights"] == {"fast": 1.0, "slow": 1.0}
    assert bal.history[1]["weights"]["slow"] > bal.history[1]["weights"]["fast"]
    assert bal.history[1]["avg"]["fast"] == pytest.approx(avgs[1]["fast"])


def test_normalised_losses_are_order_one_and_gradient_is_weight_over_magnitude():
    bal = DynamicBalancer(["fast", "slow"], ema=0.9)
    norms = []

    def check(e, s, losses, total, info):
        norms.extend([info["norm/fast"], info["norm/slow"]])
        if e == 0 and s == 0:  # EMA initialised at the first value -> exactly 1
            assert info["norm/fast"] == pytest.approx(1.0) and info["norm/slow"] == pytest.approx(1.0)
        total.backward()
        for k in losses:  # stop-gradient magnitude: d total / d L_m = w_m / ema_m
            assert losses[k].grad.item() == pytest.approx(info[f"w/{k}"] / info[f"mag/{k}"], rel=1e-6)

    run_epochs(bal, 3, on_step=check)
    # Raw values span 10 .. 0.002; normalised they stay near 1 (EMA lags the 50%/epoch fall a bit).
    assert all(0.4 < v < 1.6 for v in norms)


def test_zero_loss_passes_through_until_positive():
    bal = DynamicBalancer(["cd", "fd"])
    total, info = bal({"cd": torch.tensor(0.0), "fd": torch.tensor(4.0)})
    assert info["norm/cd"] == 0.0 and math.isnan(info["mag/cd"]) and total.item() == pytest.approx(1.0)
    _, info = bal({"cd": torch.tensor(2.0), "fd": torch.tensor(4.0)})
    assert info["mag/cd"] == 2.0 and info["norm/cd"] == pytest.approx(1.0)


def test_non_finite_values_skip_statistics():
    bal = DynamicBalancer(["a", "b"])
    bal({"a": torch.tensor(2.0), "b": torch.tensor(1.0)})
    total, _ = bal({"a": torch.tensor(float("nan")), "b": torch.tensor(1.0)})
    assert math.isnan(total.item())
    assert bal.magnitude["a"] == 2.0
    bal.end_window()
    assert bal.history[-1]["avg"]["a"] == 2.0


def test_window_steps_closes_windows_automatically():
    bal = DynamicBalancer(["fast", "slow"], window_steps=5)
    for s in range(23):
        bal(synthetic(s // 5, s))
    assert len(bal.history) == 4 and [h["step"] for h in bal.history] == [5, 10, 15, 20]
    assert bal.weights["slow"] > bal.weights["fast"]
    bal.end_window()  # closes the partial window of 3 steps
    bal.end_window()  # empty window: no-op
    assert len(bal.history) == 5


def test_state_dict_roundtrip_through_file(tmp_path):
    a = DynamicBalancer(["fast", "slow"], window_steps=7)
    for s in range(17):
        a(synthetic(s // 7, s))
    torch.save(a.state_dict(), tmp_path / "bal.pt")
    b = DynamicBalancer(["fast", "slow"], window_steps=7)
    b.load_state_dict(torch.load(tmp_path / "bal.pt", weights_only=True))
    for s in range(17, 40):
        ta, ia = a(synthetic(s // 7, s))
        tb, ib = b(synthetic(s // 7, s))
        assert ta.item() == tb.item() and ia == ib
    assert a.history == b.history
    with pytest.raises(PipelineError):
        DynamicBalancer(["fast", "other"]).load_state_dict(a.state_dict())
    with pytest.raises(PipelineError):
        ReferenceCodeBalancer(["fast", "slow"]).load_state_dict(a.state_dict())


def test_reference_code_balancer_is_degenerate():
    """Reproduces the defect: rates on max-rescaled losses are equal, so the weights never move."""
    bal = ReferenceCodeBalancer(["fast", "slow"])

    def check(e, s, losses, total, info):
        peak = max(v.item() for v in losses.values())
        for k, v in losses.items():
            assert info[f"scale/{k}"] * v.item() == pytest.approx(peak, rel=1e-6)  # each rescaled to the max
        assert total.item() == pytest.approx(2 * peak, rel=1e-6)

    run_epochs(bal, 4, on_step=check)
    assert all(h["weights"] == {"fast": 1.0, "slow": 1.0} for h in bal.history)
    dyn = DynamicBalancer(["fast", "slow"])
    run_epochs(dyn, 4)
    assert dyn.weights["slow"] > dyn.weights["fast"]  # the fixed version does move


def test_fixed_balancer_and_factory():
    bal = make_balancer("fixed", ["cd", "fd"], weights={"fd": 0.5})
    assert isinstance(bal, FixedBalancer)
    cd, fd = torch.tensor(2.0, requires_grad=True), torch.tensor(3.0, requires_grad=True)
    total, info = bal({"cd": cd, "fd": fd})
    assert total.item() == pytest.approx(2.0 + 1.5) and info == {"w/cd": 1.0, "w/fd": 0.5}
    for _ in range(3):
        bal({"cd": cd, "fd": fd})
        bal.end_window()
    assert bal.weights == {"cd": 1.0, "fd": 0.5}
    assert isinstance(make_balancer("dynamic", ["a"], temperature=2.0), DynamicBalancer)
    assert make_balancer("dynamic", ["a"], temperature=2.0, ema=0.5).beta == 0.5
    assert isinstance(make_balancer("fixed", ["a"], temperature=3.0, ema=0.5), FixedBalancer)  # ignored
    assert isinstance(make_balancer("reference", ["a", "b"]), ReferenceCodeBalancer)
    for bad in (lambda: make_balancer("magic", ["a"]),
                lambda: make_balancer("fixed", ["a"], weights={"b": 1.0}),
                lambda: make_balancer("dynamic", ["a"], weights={"a": 2.0}),
                lambda: make_balancer("dynamic", ["a", "a"]),
                lambda: DynamicBalancer(["a"], temperature=0.0),
                lambda: DynamicBalancer(["a", "b"])({"a": cd})):
        with pytest.raises(PipelineError):
            bad()
