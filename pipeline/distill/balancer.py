"""Loss balancers: turn ``{name: raw loss}`` into one objective (docs/method.md 1.5).

All balancers share one interface, so the trainer does not care which one is configured::

    bal = make_balancer("dynamic", crit.names, temperature=1.0, window_steps=None)
    total, info = bal(losses)     # every step; info: floats to log (weights, normalised losses, ...)
    total.backward()
    bal.end_window()              # at every epoch end (or pass window_steps=N to close windows itself)
    bal.history                   # one record per closed window: {"window", "step", "avg", "weights"}
    ckpt["balancer"] = bal.state_dict();  bal.load_state_dict(ckpt["balancer"])

Kinds:
    * ``dynamic`` - ``DynamicBalancer``: method.md 1.5 (EMA magnitude normalisation + DWA weights).
    * ``fixed`` - ``FixedBalancer``: plain weighted sum of the raw losses (weights default to 1).
    * ``reference`` - ``ReferenceCodeBalancer``: the reference code's degenerate behaviour, for the
      ablation only (method.md 1.5, "known defect").

Non-finite loss values (an fp16 overflow step the grad scaler will skip) are left out of every running
statistic; the returned total still carries the NaN/inf so the trainer sees it.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
from torch import Tensor

from pipeline.common.errors import PipelineError

_EPS = 1e-12


class _WindowedBalancer:
    """Shared plumbing: name checks, raw window averages, window closing and the weights history."""

    kind = ""

    def __init__(self, names: Sequence[str], window_steps: int | None = None,
                 temperature: float = 1.0) -> None:
        names = tuple(names)
        if not names or len(set(names)) != len(names):
            raise PipelineError(f"balancer needs distinct loss names, got {list(names)}")
        if window_steps is not None and window_steps <= 0:
            raise PipelineError(f"balancer window_steps must be a positive step count, got {window_steps}")
        if temperature <= 0:
            raise PipelineError(f"balancer temperature must be > 0, got {temperature}")
        self.names = names
        self.window_steps = window_steps
        self.temperature = float(temperature)
        self.weights = {n: 1.0 for n in names}
        self.step = 0
        self._win_sum = {n: 0.0 for n in names}
        self._win_count = {n: 0 for n in names}
        self.prev_avgs: list[dict[str, float]] = []  # averages of the last two closed windows, oldest first
        self.history: list[dict] = []

    def _check(self, losses: Mapping[str, Tensor]) -> None:
        if set(losses) != set(self.names):
            raise PipelineError(f"balancer was set up for losses {sorted(self.names)}, got {sorted(losses)}")

    def _values(self, losses: Mapping[str, Tensor]) -> dict[str, float]:
        """Detached float values, fetched with one device sync for all losses."""
        self._check(losses)
        vals = torch.stack([losses[n].detach().float().reshape(()) for n in self.names]).tolist()
        return dict(zip(self.names, vals))

    def _track(self, name: str, value: float) -> None:
        if math.isfinite(value):
            self._win_sum[name] += value
            self._win_count[name] += 1

    def _tick(self) -> None:
        self.step += 1
        if self.window_steps is not None and self.step % self.window_steps == 0:
            self.end_window()

    def end_window(self) -> None:
        """Close the current window: store its raw averages, update weights, append a history record.

        A window in which no finite value was seen for some loss is ignored (calling twice in a row is a
        no-op), so an empty epoch cannot produce a 0/0 rate.
        """
        if any(self._win_count[n] == 0 for n in self.names):
            return
        avg = {n: self._win_sum[n] / self._win_count[n] for n in self.names}
        self.prev_avgs = (self.prev_avgs + [self._window_value(avg)])[-2:]
        self._win_sum = {n: 0.0 for n in self.names}
        self._win_count = {n: 0 for n in self.names}
        if len(self.prev_avgs) == 2:
            self.weights = self._dwa(self.prev_avgs[0], self.prev_avgs[1])
        self.history.append({"window": len(self.history), "step": self.step, "avg": avg,
                             "weights": dict(self.weights)})

    def _window_value(self, avg: dict[str, float]) -> dict[str, float]:
        """What the descent rates are computed on (raw averages; the reference code differs)."""
        return avg

    def _dwa(self, older: dict[str, float], newer: dict[str, float]) -> dict[str, float]:
        """w_m = M softmax(r / T), r_m = Lbar_m(t-1) / Lbar_m(t-2) (method.md 1.5 step 2)."""
        rates = torch.tensor([newer[n] / max(older[n], _EPS) for n in self.names], dtype=torch.float64)
        w = len(self.names) * torch.softmax(rates / self.temperature, dim=0)
        return {n: float(v) for n, v in zip(self.names, w)}

    def state_dict(self) -> dict:
        return {"kind": self.kind, "names": list(self.names), "window_steps": self.window_steps,
                "temperature": self.temperature,
                "weights": dict(self.weights), "step": self.step, "win_sum": dict(self._win_sum),
                "win_count": dict(self._win_count), "prev_avgs": [dict(a) for a in self.prev_avgs],
                "history": [dict(h) for h in self.history]}

    def load_state_dict(self, sd: Mapping) -> None:
        if sd.get("kind") != self.kind or list(sd.get("names", [])) != list(self.names):
            raise PipelineError(f"balancer checkpoint is {sd.get('kind')!r} over {sd.get('names')}, but this "
                                f"run uses {self.kind!r} over {list(self.names)}")
        self.window_steps = sd["window_steps"]
        self.temperature = float(sd["temperature"])
        self.weights = dict(sd["weights"])
        self.step = int(sd["step"])
        self._win_sum, self._win_count = dict(sd["win_sum"]), dict(sd["win_count"])
        self.prev_avgs = [dict(a) for a in sd["prev_avgs"]]
        self.history = [dict(h) for h in sd["history"]]


class DynamicBalancer(_WindowedBalancer):
    """DSMD balancer, method.md 1.5: ``L = sum_m w_m * L_m / ema_m``.

    * ``ema_m``: stop-gradient EMA of loss m's own raw value (``ema <- beta * ema + (1 - beta) * L``),
      initialised at its first positive finite value and updated *before* dividing, so the first step's
      normalised loss is exactly 1. A loss that is still 0 (e.g. CD before the queue holds anything) is
      passed through un-normalised until it first becomes positive.
    * ``w_m``: DWA weights from the raw window averages of the previous two windows; 1 until two windows
      have closed, then fixed for the whole next window. Weights sum to M.
    """

    kind = "dynamic"

    def __init__(self, names: Sequence[str], temperature: float = 1.0, window_steps: int | None = None,
                 ema: float = 0.99) -> None:
        super().__init__(names, window_steps, temperature)
        if not 0.0 <= ema < 1.0:
            raise PipelineError(f"balancer ema decay must be in [0, 1), got {ema}")
        self.beta = float(ema)
        self.magnitude: dict[str, float | None] = {n: None for n in self.names}

    def __call__(self, losses: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        values = self._values(losses)
        total: Tensor | float = 0.0
        info: dict[str, float] = {}
        for n in self.names:
            value = values[n]
            self._track(n, value)
            mag = self.magnitude[n]
            if math.isfinite(value) and value > _EPS:
                mag = value if mag is None else self.beta * mag + (1.0 - self.beta) * value
                self.magnitude[n] = mag
            scale = 1.0 / mag if mag is not None else 1.0
            total = total + self.weights[n] * scale * losses[n].float()
            info[f"w/{n}"] = self.weights[n]
            info[f"norm/{n}"] = value * scale
            info[f"mag/{n}"] = mag if mag is not None else float("nan")
        self._tick()
        return total, info

    def state_dict(self) -> dict:
        return {**super().state_dict(), "beta": self.beta, "magnitude": dict(self.magnitude)}

    def load_state_dict(self, sd: Mapping) -> None:
        super().load_state_dict(sd)
        self.beta = float(sd["beta"])
        self.magnitude = dict(sd["magnitude"])


class FixedBalancer(_WindowedBalancer):
    """Plain weighted sum ``L = sum_m w_m * L_m`` with constant weights (window averages still logged)."""

    kind = "fixed"

    def __init__(self, weights: Mapping[str, float], window_steps: int | None = None) -> None:
        super().__init__(list(weights), window_steps)
        self.weights = {n: float(w) for n, w in weights.items()}
        self._fixed = dict(self.weights)

    def _dwa(self, older: dict[str, float], newer: dict[str, float]) -> dict[str, float]:
        return dict(self._fixed)

    def __call__(self, losses: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        values = self._values(losses)
        total: Tensor | float = 0.0
        for n in self.names:
            self._track(n, values[n])
            total = total + self.weights[n] * losses[n].float()
        self._tick()
        return total, {f"w/{n}": self.weights[n] for n in self.names}


class ReferenceCodeBalancer(_WindowedBalancer):
    """Ablation only: the reference implementation's behaviour, defect included (method.md 1.5).

    Every step each loss is rescaled by the stop-gradient factor ``max_k L_k / L_m`` (so all equal the
    largest), and the DWA rates are computed on window averages of those *rescaled* values. Those are
    identical across losses, so the softmax is uniform and every weight stays 1: what remains is the
    per-step ``max / L_m`` rescaling.
    """

    kind = "reference"

    def __init__(self, names: Sequence[str], temperature: float = 1.0,
                 window_steps: int | None = None) -> None:
        super().__init__(names, window_steps, temperature)
        self._win_peak_sum, self._win_peak_count = 0.0, 0  # running sum of the per-step max loss

    def _window_value(self, avg: dict[str, float]) -> dict[str, float]:
        # The rescaled losses all equal the per-step maximum, so their window averages are the average
        # of that maximum for every loss.
        peak = self._win_peak_sum / max(self._win_peak_count, 1)
        self._win_peak_sum, self._win_peak_count = 0.0, 0
        return {n: peak for n in self.names}

    def __call__(self, losses: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        values = self._values(losses)
        finite = [v for v in values.values() if math.isfinite(v)]
        peak = max(finite) if finite else float("nan")
        if len(finite) == len(values):
            self._win_peak_sum += peak
            self._win_peak_count += 1
        total: Tensor | float = 0.0
        info: dict[str, float] = {}
        for n in self.names:
            self._track(n, values[n])
            scale = peak / max(values[n], _EPS) if math.isfinite(peak) else 1.0
            total = total + self.weights[n] * scale * losses[n].float()
            info[f"w/{n}"] = self.weights[n]
            info[f"scale/{n}"] = scale
        self._tick()
        return total, info

    def state_dict(self) -> dict:
        return {**super().state_dict(), "win_peak": [self._win_peak_sum, self._win_peak_count]}

    def load_state_dict(self, sd: Mapping) -> None:
        super().load_state_dict(sd)
        self._win_peak_sum, self._win_peak_count = float(sd["win_peak"][0]), int(sd["win_peak"][1])


Balancer = DynamicBalancer | FixedBalancer | ReferenceCodeBalancer
BALANCER_KINDS = ("dynamic", "fixed", "reference")


def make_balancer(
    kind: str,
    names: Sequence[str],
    *,
    temperature: float = 1.0,
    window_steps: int | None = None,
    ema: float = 0.99,
    weights: Mapping[str, float] | None = None,
) -> Balancer:
    """Build a balancer by name from the union of all balancer options (so a config can pass them all).

    Args:
        kind: ``dynamic`` | ``fixed`` | ``reference``.
        names: the loss names it will receive (``MultiscaleDistillLoss.names``).
        temperature: DWA temperature T (dynamic, reference; paper: 1).
        window_steps: close a window every N steps; None = only on ``end_window()`` (epoch end).
        ema: decay of the magnitude EMA (dynamic).
        weights: {name: w} for ``fixed`` (missing names get 1); giving them to another kind is an error,
            as they would be silently ignored.
    """
    if kind not in BALANCER_KINDS:
        raise PipelineError(f"unknown balancer kind {kind!r}; choose one of {', '.join(BALANCER_KINDS)}")
    if kind != "fixed" and weights:
        raise PipelineError(f"loss weights are only used by the 'fixed' balancer, not {kind!r}")
    if kind == "dynamic":
        return DynamicBalancer(names, temperature=temperature, window_steps=window_steps, ema=ema)
    if kind == "reference":
        return ReferenceCodeBalancer(names, temperature=temperature, window_steps=window_steps)
    given = dict(weights or {})
    unknown = set(given) - set(names)
    if unknown:
        raise PipelineError(f"fixed balancer weights name unknown losses {sorted(unknown)}; "
                            f"enabled: {list(names)}")
    return FixedBalancer({n: float(given.get(n, 1.0)) for n in names}, window_steps=window_steps)
