"""The time_series builder: offline builds with the documented features, determinism, stored parameters that
reproduce each series, AR coefficients recovered by least squares, FFT frequencies, and stationarity checks."""

import glob
import os

import numpy as np
import pytest

from seqjax.data.builders import time_series as ts
from seqjax.data.builders.seeded import build
from seqjax.data.builders.time_series import TimeSeriesConfig, ar_process, fit_ar, is_stationary

TRUE_AR = (0.5, -0.3, 0.2)


def _shards(path):
    files = glob.glob(f"{path}/**/*.array_record*", recursive=True)
    return {os.path.relpath(p, path): open(p, "rb").read() for p in files}


def _config(kind, **kwargs):
    name = f"{kind}_tiny" + "".join(f"-{k}{v}" for k, v in sorted(kwargs.items()))
    kwargs = {"num_train": 64, "num_test": 8, **kwargs}
    return TimeSeriesConfig(name=name, kind=kind, **kwargs)


def _all(source, split="train"):
    return [source[split][i] for i in range(len(source[split]))]


EXPECTED_FEATURES = {
    "sines": {"series", "amplitude", "frequency", "phase"},
    "mixture": {"series", "num_components", "amplitude", "frequency", "phase"},
    "ar": {"series"},
}


def test_the_registered_configs():
    names = {c.name: c for c in ts.TimeSeries.BUILDER_CONFIGS}
    assert set(names) == set(ts.KINDS)
    assert names["ar"].ar_coefficients == TRUE_AR and is_stationary(names["ar"].ar_coefficients)


@pytest.mark.parametrize("kind", ts.KINDS)
def test_builds_offline_with_the_documented_features(tmp_path, kind):
    cfg = _config(kind, length=96)
    builder = build("time_series", str(tmp_path), cfg)  # how long it takes: benchmarks/input.py --parts builds
    source = builder.as_data_source()
    assert len(source["train"]) == 64 and len(source["test"]) == 8
    for ex in _all(source) + _all(source, "test"):
        assert set(ex) == EXPECTED_FEATURES[kind]
        assert ex["series"].dtype == np.float32 and ex["series"].shape == (96,)
        assert np.all(np.isfinite(ex["series"]))
        if kind == "sines":  # scalars read back as Python floats
            assert cfg.min_amplitude <= ex["amplitude"] <= cfg.max_amplitude
            assert cfg.min_frequency <= ex["frequency"] <= cfg.max_frequency
            assert 0 <= ex["phase"] <= 2 * np.pi
        if kind == "mixture":
            k = int(ex["num_components"])
            assert cfg.min_components <= k <= cfg.max_components
            for key in ("amplitude", "frequency", "phase"):
                assert ex[key].dtype == np.float32 and ex[key].shape == (cfg.max_components,)
                assert np.all(ex[key][k:] == 0)  # padding adds nothing
            assert np.all((ex["frequency"][:k] >= cfg.min_frequency) & (ex["frequency"][:k] <= cfg.max_frequency))
    # Stored examples are the ones the config regenerates (the order on disk is TFDS's shuffle of the keys).
    stored = sorted(ex["series"].tobytes() for ex in _all(source))
    assert stored == sorted(builder.example("train", i)["series"].tobytes() for i in range(64))


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    for d, seed in (("a", 0), ("b", 0), ("c", 1)):
        build("time_series", str(tmp_path / d), _config("mixture", num_train=32, seed=seed))
    sa, sb, sc = (_shards(str(tmp_path / d)) for d in "abc")
    assert sa and sa == sb
    values = lambda shards: [v for _, v in sorted(shards.items())]
    assert len(sa) == len(sc) and all(a != c for a, c in zip(values(sa), values(sc), strict=True))


@pytest.mark.parametrize("kind", ["sines", "mixture"])
def test_stored_parameters_reproduce_the_series(tmp_path, kind):
    """series - sum_k A_k sin(2π f_k t + φ_k) is the Gaussian noise alone: its pooled std is noise_std (64 x 128
    samples: the estimate's relative standard error is ~1%, so 5% is a loose bound) and no residual is an outlier."""
    cfg = _config(kind, noise_std=0.2)
    source = build("time_series", str(tmp_path), cfg).as_data_source()
    residuals = []
    for ex in _all(source):
        k = 1 if kind == "sines" else int(ex["num_components"])
        clean = ts.sines(
            np.atleast_1d(ex["amplitude"])[:k],
            np.atleast_1d(ex["frequency"])[:k],
            np.atleast_1d(ex["phase"])[:k],
            cfg.length,
        )
        residuals.append(ex["series"] - clean)
    residuals = np.concatenate(residuals)
    assert abs(residuals.std() / 0.2 - 1) < 0.05 and abs(residuals.mean()) < 0.01
    assert np.abs(residuals).max() < 6 * 0.2


def test_sines_dominant_fft_frequency_is_the_stored_frequency(tmp_path):
    """The peak of |FFT| (zero-padded 16x, so the grid is 1/16 of a bin) lies within a quarter of a bin (1/length)
    of the stored frequency; a one-bin mistake would fail. Measured over 2000 draws the worst error is ~0.07 bin."""
    cfg = _config("sines", noise_std=0.1)
    source = build("time_series", str(tmp_path), cfg).as_data_source()
    n_fft = 16 * cfg.length
    for ex in _all(source) + _all(source, "test"):
        x = ex["series"].astype(np.float64)
        peak = np.argmax(np.abs(np.fft.rfft(x - x.mean(), n=n_fft))) / n_fft
        assert abs(peak - ex["frequency"]) < 0.25 / cfg.length, (peak, ex["frequency"])


def test_ar_coefficients_are_recovered_by_least_squares(tmp_path):
    """64 series x 256 steps of AR(3) give ~16k regression rows; the OLS standard error of each coefficient,
    sqrt(σ² (X'X)^-1_ii), is ~0.008, so 0.05 is > 5 standard errors (asserted below, not just claimed)."""
    cfg = _config("ar", length=256, noise_std=1.0)
    source = build("time_series", str(tmp_path), cfg).as_data_source()
    x = np.stack([ex["series"] for ex in _all(source)]).astype(np.float64)
    assert x.shape == (64, 256)
    fitted = fit_ar(x, 3)
    assert np.max(np.abs(fitted - np.array(TRUE_AR))) < 0.05, fitted
    # The tolerance is > 5 standard errors of the estimator.
    design = np.stack([x[:, 3 - i : 256 - i] for i in (1, 2, 3)], -1).reshape(-1, 3)
    resid = x[:, 3:].reshape(-1) - design @ fitted
    se = np.sqrt(resid.var() * np.diag(np.linalg.inv(design.T @ design)))
    assert 5 * se.max() < 0.05 and abs(resid.std() - 1.0) < 0.05
    # ...and it discriminates: the sign-flipped coefficients are far outside it,
    assert np.max(np.abs(fitted + np.array(TRUE_AR))) > 0.5
    # a process with other stationary coefficients (the flipped ones have a unit root) is not taken for the true one,
    rng = np.random.default_rng(7)
    other = np.stack([ar_process((-0.5, 0.3, -0.1), 256, 1.0, rng) for _ in range(64)])
    assert np.max(np.abs(fit_ar(other, 3) - np.array(TRUE_AR))) > 0.5
    # and over-fitting the order finds ~0 for the lags the process does not have.
    fitted5 = fit_ar(x, 5)
    assert np.max(np.abs(fitted5[:3] - np.array(TRUE_AR))) < 0.05 and np.max(np.abs(fitted5[3:])) < 0.05


def test_fit_ar_is_exact_on_noiseless_data():
    x = np.zeros(50)
    x[:2] = (1.0, -0.5)
    for t in range(2, 50):
        x[t] = 0.6 * x[t - 1] - 0.2 * x[t - 2]
    np.testing.assert_allclose(fit_ar(x, 2), [0.6, -0.2], atol=1e-10)
    with pytest.raises(ValueError, match="T > p"):
        fit_ar(np.zeros(3), 3)


def test_burn_in_gives_the_stationary_variance():
    """AR(1), a = 0.9: the stationary variance is σ²/(1 - a²) = 5.26; from a zero start without burn-in the first
    value has variance σ² = 1. Over 2000 series the variance's relative standard error is ~3%, so 15% is loose."""
    rng = np.random.default_rng(0)
    first = np.array([ar_process((0.9,), 1, 1.0, rng)[0] for _ in range(2000)])
    assert abs(first.var() / (1 / (1 - 0.81)) - 1) < 0.15
    cold = np.array([ar_process((0.9,), 1, 1.0, rng, burn_in=0)[0] for _ in range(2000)])
    assert abs(cold.var() - 1.0) < 0.15  # what no burn-in would store
    assert ts.default_burn_in((0.9,)) >= np.log(1e-8) / np.log(0.9)


def test_stationarity():
    # AR(1): |a| < 1. AR(2): the triangle a2 + a1 < 1, a2 - a1 < 1, |a2| < 1 (an independent characterisation).
    for a in (-1.5, -1.0, -0.99, 0.0, 0.5, 0.99, 1.0, 1.2):
        assert is_stationary((a,)) == (abs(a) < 1), a
    grid = np.linspace(-2.1, 2.1, 29)
    for a1 in grid:
        for a2 in grid:
            triangle = a2 + a1 < 1 and a2 - a1 < 1 and abs(a2) < 1
            if min(abs(a2 + a1 - 1), abs(a2 - a1 - 1), abs(abs(a2) - 1)) > 1e-9:  # off the boundary
                assert is_stationary((a1, a2)) == triangle, (a1, a2)
    assert is_stationary(TRUE_AR) and is_stationary(()) and not is_stationary((0.5, 0.6))
    assert not is_stationary(-np.array(TRUE_AR))  # 1 + 0.5z - 0.3z² + 0.2z³ vanishes at z = -1: a unit root
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="not stationary"):
        ar_process((0.5, 0.6), 10, 1.0, rng)
    with pytest.raises(ValueError, match="not stationary"):
        TimeSeriesConfig(name="bad", kind="ar", ar_coefficients=(1.0,))
    with pytest.raises(ValueError, match="kind='walk'"):
        TimeSeriesConfig(name="bad", kind="walk")
