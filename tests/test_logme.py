"""LogME against a direct, slow implementation of the paper's equations and against answers known in
advance; the ranking's interval, flags and Pareto front on hand-made rows."""

from __future__ import annotations

import numpy as np
import pytest

from featurebank.classifiers.logme import class_evidences, logme
from featurebank.classifiers.ranking import NEGATIVE, NO_GAIN, bootstrap_interval, flag, kendall_tau, pareto_front


def direct_evidence(f: np.ndarray, y: np.ndarray) -> float:
    """Algorithm 1 of You et al. (ICML 2021) written from the equations, with no decomposition shared with
    the implementation under test: A = alpha I + beta F^T F inverted and its log-determinant taken
    directly, gamma = D - alpha tr(A^-1) (= sum_i beta s_i / (alpha + beta s_i)), m = beta A^-1 F^T y."""
    f = f.astype(np.float64)
    n, d = f.shape
    ftf, fty = f.T @ f, f.T @ y
    alpha, beta, eps = 1.0, 1.0, 1e-5
    lam = alpha / beta
    for _ in range(11):
        a_inv = np.linalg.inv(alpha * np.eye(d) + beta * ftf)
        gamma = d - alpha * np.trace(a_inv)
        m = beta * a_inv @ fty
        alpha_de = float(m @ m)
        beta_de = float(((y - f @ m) ** 2).sum())
        alpha = gamma / (alpha_de + eps)
        beta = (n - gamma) / (beta_de + eps)
        new_lam = alpha / beta
        if abs(new_lam - lam) / lam < 0.01:
            break
        lam = new_lam
    _, logdet = np.linalg.slogdet(alpha * np.eye(d) + beta * ftf)
    ev = (d / 2 * np.log(alpha) + n / 2 * np.log(beta) - 0.5 * logdet - beta / 2 * (beta_de + eps)
          - alpha / 2 * (alpha_de + eps) - n / 2 * np.log(2 * np.pi))
    return ev / n


def direct_logme(f, labels) -> float:
    return float(np.mean([direct_evidence(f, (labels == c).astype(np.float64)) for c in range(labels.max() + 1)]))


def clustered(n: int, d: int, classes: int, noise: float, seed: int):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    centres = rng.normal(size=(classes, d)) * 2
    return (centres[y] + noise * rng.normal(size=(n, d))).astype(np.float32), y


@pytest.mark.parametrize("n,d", [(300, 40), (60, 200), (120, 120)])
def test_logme_equals_the_direct_implementation(n, d):
    """More samples than dimensions, fewer, and as many: within 1e-3 per dataset (in fact ~1e-9)."""
    for seed, noise in ((0, 0.5), (1, 3.0)):
        f, y = clustered(n, d, 4, noise, seed)
        assert abs(logme(f, y) - direct_logme(f, y)) <= 1e-3
        assert abs(logme(f, y) - direct_logme(f, y)) <= 1e-6  # the same equations: only rounding differs


def test_evidence_is_the_gaussian_marginal_likelihood_at_its_maximum():
    """The answer known in advance: the evidence of y is the density of N(0, I/beta + F F^T/alpha) at y,
    and the fixed point maximises it (up to the 1 % stopping rule) over alpha and beta."""
    from scipy.stats import multivariate_normal

    f, labels = clustered(80, 6, 2, 1.0, 3)
    f = f.astype(np.float64)
    y = (labels == 1).astype(np.float64)
    n, d = f.shape

    def log_density(alpha, beta):
        return multivariate_normal(np.zeros(n), np.eye(n) / beta + f @ f.T / alpha).logpdf(y) / n

    ev = class_evidences(f, labels)[1]
    best = max(log_density(a, b) for a in np.geomspace(1e-3, 1e3, 61) for b in np.geomspace(1e-2, 1e3, 61))
    assert abs(ev - best) < 2e-3


def test_logme_orders_informative_features_above_noise():
    f, y = clustered(400, 32, 5, 0.5, 7)
    noise = np.random.default_rng(8).normal(size=f.shape).astype(np.float32)
    half = np.hstack([f[:, :4], noise[:, 4:]])  # a little information
    assert logme(f, y) > logme(half, y) > logme(noise, y)


def test_interval_flags_and_front():
    low, high = bootstrap_interval(np.r_[np.ones(90), np.zeros(10)].astype(bool))
    assert low < 0.9 < high and 0.8 < low and high < 0.97
    base = {"ci_low": 0.85, "ci_high": 0.92}
    assert flag({"ci_low": 0.70, "ci_high": 0.80}, base) == NEGATIVE
    assert flag({"ci_low": 0.80, "ci_high": 0.88}, base) == NO_GAIN
    assert flag({"ci_low": 0.93, "ci_high": 0.97}, base) is None
    assert flag({"ci_low": 0.1, "ci_high": 0.2}, None) is None
    assert pareto_front([(10, 0.9), (20, 0.8), (5, 0.85), (30, 0.7), (15, 0.9)]) == [1, 3, 4]
    rows = [{"logme": a, "accuracy": b} for a, b in ((1, 0.5), (2, 0.6), (3, 0.7), (4, 0.8))]
    assert kendall_tau(rows) == pytest.approx(1.0)
    assert kendall_tau(rows[::-1][:2]) is None
