"""LogME: the evidence of a linear model of the labels given frozen features (You et al., "LogME:
Practical Assessment of Pre-trained Models for Transfer Learning", ICML 2021; reference code in the
``thuml/LogME`` repository, ``LogME._fit_icml``).

For features F [N, D] and each class c, with y the one-hot column of c, the model is
y = F w + noise, w ~ N(0, 1/alpha I), noise ~ N(0, 1/beta I). Its evidence (the marginal likelihood
p(y | F, alpha, beta), the Gaussian density of y under N(0, 1/beta I + 1/alpha F F^T)) is

    L(alpha, beta) = D/2 log alpha + N/2 log beta - 1/2 log|A| - beta/2 ||F m - y||^2 - alpha/2 ||m||^2
                     - N/2 log 2 pi,     A = alpha I + beta F^T F,  m = beta A^-1 F^T y.

Algorithm 1 of the paper maximises it by fixed-point updates from alpha = beta = 1:
gamma = sum_i beta s_i / (alpha + beta s_i) (s_i the eigenvalues of F^T F), alpha <- gamma / ||m||^2,
beta <- (N - gamma) / ||F m - y||^2, until alpha / beta changes by less than 1 % (at most 11 rounds,
the denominators kept off zero by 1e-5, as the reference code does). LogME is the mean over classes of
the maximised evidence divided by N. Features are used as given (no scaling), in float64.

This implementation takes the thin SVD of F instead of the eigen-decomposition of the D x D matrix
F^T F (the same eigenvalues: s_i = sigma_i^2, with D - rank(F) zeros), so it costs O(N D min(N, D))
whichever of N and D is larger; the tests check it against a direct, slow implementation of the
equations above (inverse and log-determinant of A) and against the Gaussian density of y.
"""

from __future__ import annotations

import numpy as np

EPSILON = 1e-5
MAX_ROUNDS = 11
TOLERANCE = 0.01


def logme(features: np.ndarray, labels: np.ndarray) -> float:
    """LogME of ``features`` [N, D] for integer class ``labels`` [N] (0..C-1): the mean over classes of
    the maximised evidence per sample. Higher is better; comparable between feature sets of one dataset."""
    return float(np.mean(class_evidences(features, labels)))


def class_evidences(features: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The maximised evidence per sample of each class's one-vs-rest target (LogME is their mean)."""
    f = np.asarray(features, np.float64)
    y = np.asarray(labels)
    if f.ndim != 2 or len(f) != len(y) or len(f) == 0:
        raise ValueError(f"logme needs features [N, D] and N labels, got {f.shape} and {y.shape}")
    n, d = f.shape
    u, sv, _ = np.linalg.svd(f, full_matrices=False)
    keep = sv > 1e-10 * max(1.0, float(sv[0]) if len(sv) else 1.0)
    u, sv = u[:, keep], sv[keep]
    s = sv ** 2  # the nonzero eigenvalues of F^T F; the other d - len(s) are zero
    zeros = d - len(s)
    out = []
    for c in range(int(y.max()) + 1):
        target = (y == c).astype(np.float64)
        out.append(_evidence(target, u, sv, s, zeros, n, d))
    return np.asarray(out)


def _evidence(y: np.ndarray, u: np.ndarray, sv: np.ndarray, s: np.ndarray, zeros: int, n: int, d: int) -> float:
    """Algorithm 1 for one target, in the eigenbasis of F^T F: with F = U diag(sv) V^T, F^T y has
    coordinates t = sv * U^T y along V (nothing along the null space), m = V (beta t / (alpha + beta s)),
    F m = U (sv beta t / (alpha + beta s))."""
    uy = u.T @ y
    t = sv * uy
    outside = max(0.0, float(y @ y) - float(uy @ uy))  # ||y||^2 outside the span of F's columns
    alpha, beta = 1.0, 1.0
    lam = alpha / beta
    for _ in range(MAX_ROUNDS):
        gamma = float((s / (s + lam)).sum())
        mk = t * beta / (alpha + beta * s)  # m's coordinates
        alpha_de = float((mk * mk).sum())
        fm = sv * mk  # F m's coordinates along U
        beta_de = outside + float(((uy - fm) ** 2).sum())  # ||F m - y||^2
        alpha = gamma / (alpha_de + EPSILON)
        beta = (n - gamma) / (beta_de + EPSILON)
        new_lam = alpha / beta
        if abs(new_lam - lam) / lam < TOLERANCE:
            break
        lam = new_lam
    logdet = float(np.log(alpha + beta * s).sum()) + zeros * np.log(alpha)
    evidence = (d / 2.0 * np.log(alpha) + n / 2.0 * np.log(beta) - 0.5 * logdet
                - beta / 2.0 * (beta_de + EPSILON) - alpha / 2.0 * (alpha_de + EPSILON) - n / 2.0 * np.log(2 * np.pi))
    return float(evidence / n)
