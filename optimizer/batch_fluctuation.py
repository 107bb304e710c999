"""How much the decode batch, and with it each request's ITL, fluctuates under continuous batching.

Why this exists: a mean-value model (ITL = decode_step(mean batch) / (1 - prefill share)) badly
underestimates the ITL *percentile* of a loaded replica, and even its mean. A burst of arrivals
both grows the batch (longer steps) and brings prefills that stall every running sequence; the
slower decode keeps sequences around longer, which grows the batch further. Near saturation
that feedback multiplies the spread several times over.

Linear-noise model, in the replica's own clock of decode steps: a_k requests arrive during step
k (Poisson with mean lambda * tau_k), they run for the next W = output - 1 steps, and

    tau_k = d(N_k) + p * a_{k-1},     N_k = a_{k-1} + ... + a_{k-W}

(decode step at batch N_k, plus the prefill of the previous step's arrivals, which runs first).
Linearised around the mean this is an AR(W) process for the arrivals per step with feedback
gain g = lambda * d'(N) * W from the batch and rho = lambda * p from prefills; it is stable
while D = 1 - g - rho > 0. Three dimensionless numbers depend on (g, rho) only once W is large
(checked: within 5 % for W >= 50 against W = 800):

* J:  Var(decode time of a request) = W * tau * J / lambda          (its ITL spread)
* C:  E[decode time seen by a request] - W * tau = C / lambda     (arrivals come in bursts, so a
      request tends to start its decode in a busy stretch: it sees more than the step average)
* JN: Var(batch) = mean batch * JN                                (JN = 1 for Poisson)

They are integrals over frequency of the AR transfer function, computed once on a (D, share of
feedback from prefill) grid at W = 64 and interpolated.
"""

from __future__ import annotations

from functools import cache

import numpy as np

_W = 64
_D_GRID = np.geomspace(1e-3, 1.0, 49)
_S_GRID = np.linspace(0.0, 1.0, 21)


def _integrals(g: np.ndarray, rho: np.ndarray, w: int = _W) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """J, C, JN at lambda = 1 and mean arrivals per step = 1, by quadrature over frequency."""
    g = np.asarray(g, dtype=float)[..., None]
    rho = np.asarray(rho, dtype=float)[..., None]
    w0 = 2.0 * np.pi / w
    # The spectrum peaks in a band of width ~D/W around 0: a geometric grid resolves it.
    om = np.concatenate([np.geomspace(1e-7 * w0, w0, 300, endpoint=False), np.linspace(w0, np.pi, 900)])
    e1 = np.exp(-1j * om)
    box = (1.0 - np.exp(-1j * om * w)) / (1.0 - e1)  # sum_{i<W} e^{-i om i}
    window = e1 * box  # batch = the last W steps' arrivals
    a = (g / w) * window + rho * e1  # feedback from arrivals to arrivals
    s_x = 1.0 / np.abs(1.0 - a) ** 2  # spectrum of arrivals per step
    f = a * box  # arrivals -> a request's total decode time

    def integral(y):
        return np.trapezoid(y, om, axis=-1) / np.pi

    j = integral(s_x * np.abs(f) ** 2) / w
    c = integral(np.real(f * np.exp(1j * om * w)) * s_x)
    jn = integral(s_x * np.abs(window) ** 2) / w
    return j, c, jn


@cache
def _table() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d, s = np.meshgrid(_D_GRID, _S_GRID, indexing="ij")
    load = 1.0 - d
    j, c, jn = _integrals(load * (1.0 - s), load * s)
    with np.errstate(invalid="ignore", divide="ignore"):
        # Scaled so each is smooth and finite at both ends (0 at no load, ~1/D near D = 0).
        tj = np.where(load > 0, d * j / load**2, 0.0)
        tc = np.where(load > 0, d * c / load, 0.0)
        tn = np.where(load > 0, d * (jn - 1.0) / load, 0.0)
    # At D = 1 (no load) the limits are the values just below it.
    tj[-1], tc[-1], tn[-1] = tj[-2], tc[-2], tn[-2]
    return tj, tc, tn


def fluctuation_factors(g, rho):
    """(J, C, JN) for feedback gains g (batch) and rho (prefill), elementwise; D = 1-g-rho >= 1e-3."""
    g = np.clip(np.asarray(g, dtype=float), 0.0, None)
    rho = np.clip(np.asarray(rho, dtype=float), 0.0, None)
    load = g + rho
    d = np.clip(1.0 - load, _D_GRID[0], 1.0)
    load = 1.0 - d
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(g + rho > 0, rho / np.maximum(g + rho, 1e-300), 0.0)
    x = (np.log(d) - np.log(_D_GRID[0])) / (np.log(_D_GRID[-1]) - np.log(_D_GRID[0])) * (_D_GRID.size - 1)
    y = share * (_S_GRID.size - 1)
    i = np.clip(np.floor(x).astype(np.int64), 0, _D_GRID.size - 2)
    k = np.clip(np.floor(y).astype(np.int64), 0, _S_GRID.size - 2)
    fx, fy = x - i, y - k

    def interp(t):
        return ((1 - fx) * (1 - fy) * t[i, k] + fx * (1 - fy) * t[i + 1, k]
                + (1 - fx) * fy * t[i, k + 1] + fx * fy * t[i + 1, k + 1])

    tj, tc, tn = _table()
    return interp(tj) * load**2 / d, interp(tc) * load / d, 1.0 + interp(tn) * load / d
