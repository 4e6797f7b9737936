"""`time_series`: synthetic real-valued series whose generating parameters are known, so that a model's fit or
forecast can be checked against the truth. Time steps are t = 0..length-1; frequencies are in cycles per step.

Configs (`kind`):

- sines: x_t = A sin(2π f t + φ) + ε_t, with A ~ U[min_amplitude, max_amplitude], f ~ U[min_frequency,
  max_frequency], φ ~ U[0, 2π) drawn per series and ε_t ~ N(0, noise_std²). Features: "series" [length] float32,
  and the series' true "amplitude", "frequency", "phase" (float32 scalars).
- mixture: the sum of K ~ U{min_components..max_components} such sines, each with its own A, f, φ, plus the same
  noise. Features: "series", "num_components" (int32 scalar) and "amplitude", "frequency", "phase" of shape
  [max_components] float32, whose first K entries are the components (the rest are 0, which adds nothing).
- ar: the AR(p) process x_t = a_1 x_{t-1} + ... + a_p x_{t-p} + ε_t, ε_t ~ N(0, noise_std²), with the
  coefficients `ar_coefficients` held in the config (they must be stationary: `is_stationary`). Each series starts
  from zeros and runs `burn_in` steps (None: enough for the start to be forgotten, see `default_burn_in`) before the
  `length` stored steps, so a stored series is a draw from the stationary distribution. Features: "series" only;
  `fit_ar` recovers the coefficients by least squares.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import tensorflow_datasets as tfds

from seqjax.data.builders.seeded import SeededBuilder, SeededConfig

KINDS = ("sines", "mixture", "ar")
UNIT_CIRCLE_TOLERANCE = 1e-8  # a root this close to the unit circle counts as on it (np.roots has rounding error)


def characteristic_roots(coefficients) -> np.ndarray:
    """The roots z of the AR characteristic polynomial 1 - a_1 z - ... - a_p z^p (empty for p = 0 or all zeros)."""
    a = np.asarray(coefficients, np.float64).reshape(-1)
    # np.roots wants the highest degree first: -a_p z^p - ... - a_1 z + 1 (leading zeros are dropped by np.roots).
    return np.roots(np.concatenate([-a[::-1], [1.0]]))


def is_stationary(coefficients) -> bool:
    """Whether AR coefficients (a_1, ..., a_p) define a stationary process: every root of 1 - a_1 z - ... - a_p z^p
    lies strictly outside the unit circle (by more than UNIT_CIRCLE_TOLERANCE, so that a unit root computed as
    1 + 1e-16 is not taken for stationary). No coefficients (white noise) is stationary."""
    return bool(np.all(np.abs(characteristic_roots(coefficients)) > 1.0 + UNIT_CIRCLE_TOLERANCE))


def _check_stationary(coefficients) -> None:
    if not is_stationary(coefficients):
        moduli = np.abs(characteristic_roots(coefficients))
        raise ValueError(
            f"AR coefficients {tuple(float(c) for c in np.asarray(coefficients).reshape(-1))} are not stationary: "
            f"the characteristic polynomial 1 - a_1 z - ... - a_p z^p has a root of modulus {moduli.min():.6g}, "
            "and every root must lie outside the unit circle"
        )


def default_burn_in(coefficients, tolerance: float = 1e-8) -> int:
    """Steps after which the start's influence has decayed below `tolerance`: the start is forgotten at the rate
    r = max |1/root| < 1 per step, so ceil(log(tolerance) / log(r)) steps, and at least 100."""
    _check_stationary(coefficients)
    roots = characteristic_roots(coefficients)
    rate = float(np.max(1.0 / np.abs(roots))) if roots.size else 0.0
    if rate <= 0.0:
        return 100
    return max(100, math.ceil(math.log(tolerance) / math.log(rate)))


def ar_process(
    coefficients, length: int, noise_std: float, rng: np.random.Generator, burn_in: int | None = None
) -> np.ndarray:
    """One series [length] (float64) of the AR(p) process x_t = sum_i a_i x_{t-i} + N(0, noise_std²), started from
    zeros and run `burn_in` steps first (None: `default_burn_in`). Raises ValueError if it is not stationary."""
    a = np.asarray(coefficients, np.float64).reshape(-1)
    _check_stationary(a)
    if burn_in is None:
        burn_in = default_burn_in(a)
    if length < 0 or burn_in < 0:
        raise ValueError(f"ar_process needs length >= 0 and burn_in >= 0, got {length}, {burn_in}")
    p = a.size
    total = burn_in + length
    noise = rng.normal(0.0, noise_std, size=total)
    x = np.zeros(p + total)  # p leading zeros are the start
    reversed_a = a[::-1]  # x[t-p..t-1] · (a_p..a_1)
    for t in range(total):
        x[p + t] = reversed_a @ x[t : t + p] + noise[t]
    return x[p + burn_in :]


def fit_ar(series: np.ndarray, p: int) -> np.ndarray:
    """Least-squares AR(p) coefficients (a_1, ..., a_p) of one series [T] or a batch [N, T] (pooled, no intercept:
    the processes here have mean 0): minimises sum_t (x_t - sum_i a_i x_{t-i})² over t = p..T-1 of every series."""
    x = np.asarray(series, np.float64)
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2 or p < 1 or x.shape[1] <= p:
        raise ValueError(f"fit_ar needs series [T] or [N, T] with T > p >= 1, got shape {np.shape(series)}, p={p}")
    steps = x.shape[1]
    design = np.stack([x[:, p - i : steps - i] for i in range(1, p + 1)], axis=-1).reshape(-1, p)  # lags 1..p
    target = x[:, p:].reshape(-1)
    coefficients, *_ = np.linalg.lstsq(design, target, rcond=None)
    return coefficients


def sines(amplitude, frequency, phase, length: int) -> np.ndarray:
    """sum_k A_k sin(2π f_k t + φ_k) at t = 0..length-1 (float64); scalars or matching arrays of components."""
    t = np.arange(length)
    a, f, ph = (np.atleast_1d(np.asarray(v, np.float64)) for v in (amplitude, frequency, phase))
    return np.sum(a[:, None] * np.sin(2 * np.pi * f[:, None] * t + ph[:, None]), axis=0)


@dataclasses.dataclass(eq=False)
class TimeSeriesConfig(SeededConfig):
    """`kind` one of KINDS (see the module docstring); `length` stored steps per series; `noise_std` the observation
    noise (sines, mixture) or the innovation noise (ar)."""

    kind: str = "sines"
    length: int = 128
    noise_std: float = 0.1
    min_amplitude: float = 0.5
    max_amplitude: float = 2.0
    min_frequency: float = 1 / 32
    max_frequency: float = 1 / 4
    min_components: int = 2
    max_components: int = 3
    ar_coefficients: tuple[float, ...] = (0.5, -0.3, 0.2)
    burn_in: int | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"TimeSeriesConfig.kind={self.kind!r} is unknown; use one of {KINDS}")
        if self.length < 1 or self.noise_std < 0:
            raise ValueError(
                f"TimeSeriesConfig needs length >= 1 and noise_std >= 0, got {self.length}, {self.noise_std}"
            )
        if not 0 <= self.min_amplitude <= self.max_amplitude:
            raise ValueError("TimeSeriesConfig needs 0 <= min_amplitude <= max_amplitude")
        if not 0 < self.min_frequency <= self.max_frequency <= 0.5:
            raise ValueError("TimeSeriesConfig needs 0 < min_frequency <= max_frequency <= 0.5 (cycles per step)")
        if not 1 <= self.min_components <= self.max_components:
            raise ValueError("TimeSeriesConfig needs 1 <= min_components <= max_components")
        self.ar_coefficients = tuple(float(c) for c in self.ar_coefficients)
        if self.kind == "ar":
            _check_stationary(self.ar_coefficients)
            if self.burn_in is not None and self.burn_in < 0:
                raise ValueError(f"TimeSeriesConfig.burn_in={self.burn_in} must be >= 0 (or None)")


class TimeSeries(SeededBuilder):
    """Synthetic series with known parameters; one config per kind (see the module docstring)."""

    BUILDER_CONFIGS = [  # noqa: RUF012
        TimeSeriesConfig(name="sines", kind="sines", description="Noisy sines with their amplitude, frequency, phase."),
        TimeSeriesConfig(name="mixture", kind="mixture", description="Sums of 2-3 noisy sines with their parameters."),
        TimeSeriesConfig(name="ar", kind="ar", noise_std=1.0, description="AR(3) with coefficients (0.5, -0.3, 0.2)."),
    ]
    DESCRIPTION = __doc__

    def _features(self):
        cfg = self.builder_config
        series = {"series": tfds.features.Tensor(shape=(cfg.length,), dtype=np.float32)}
        if cfg.kind == "sines":
            scalar = lambda: tfds.features.Tensor(shape=(), dtype=np.float32)
            return tfds.features.FeaturesDict(
                {**series, "amplitude": scalar(), "frequency": scalar(), "phase": scalar()}
            )
        if cfg.kind == "mixture":
            vector = lambda: tfds.features.Tensor(shape=(cfg.max_components,), dtype=np.float32)
            return tfds.features.FeaturesDict(
                {
                    **series,
                    "num_components": tfds.features.Tensor(shape=(), dtype=np.int32),
                    "amplitude": vector(),
                    "frequency": vector(),
                    "phase": vector(),
                }
            )
        return tfds.features.FeaturesDict(series)

    def _example(self, rng: np.random.Generator, index: int) -> dict:
        cfg = self.builder_config
        if cfg.kind == "ar":
            x = ar_process(cfg.ar_coefficients, cfg.length, cfg.noise_std, rng, burn_in=cfg.burn_in)
            return {"series": x.astype(np.float32)}
        k = 1 if cfg.kind == "sines" else int(rng.integers(cfg.min_components, cfg.max_components + 1))
        amplitude = rng.uniform(cfg.min_amplitude, cfg.max_amplitude, size=k)
        frequency = rng.uniform(cfg.min_frequency, cfg.max_frequency, size=k)
        phase = rng.uniform(0.0, 2 * np.pi, size=k)
        # The stored parameters are float32; the series is computed from exactly those values.
        amplitude, frequency, phase = (v.astype(np.float32) for v in (amplitude, frequency, phase))
        x = sines(amplitude, frequency, phase, cfg.length) + rng.normal(0.0, cfg.noise_std, size=cfg.length)
        if cfg.kind == "sines":
            return {
                "series": x.astype(np.float32),
                "amplitude": amplitude[0],
                "frequency": frequency[0],
                "phase": phase[0],
            }
        pad = lambda v: np.pad(v, (0, cfg.max_components - k))
        return {
            "series": x.astype(np.float32),
            "num_components": np.int32(k),
            "amplitude": pad(amplitude),
            "frequency": pad(frequency),
            "phase": pad(phase),
        }


__all__ = [
    "KINDS",
    "TimeSeries",
    "TimeSeriesConfig",
    "ar_process",
    "characteristic_roots",
    "default_burn_in",
    "fit_ar",
    "is_stationary",
    "sines",
]
