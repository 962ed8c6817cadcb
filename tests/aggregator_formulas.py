"""What the aggregator tests share: seeded inputs, the float64 comparison, and the plainly written
float64 paper formulas that more than one test file uses (test_aggregators_*.py, test_adversarial.py).
A formula that one file alone uses lives in that file."""
import math

import torch
from conftest import DEVICE, RESOLUTION


def rand_G(n, d, seed=0, dtype=torch.float64, shift=0.5):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g, dtype=torch.float64) + shift).to(dtype).to(DEVICE)


def close(actual, expected, dtype=torch.float64, scale=1.0):
    atol, rtol = RESOLUTION[dtype]
    torch.testing.assert_close(actual.detach().cpu().double(), expected.detach().cpu().double(),
                               atol=atol * scale, rtol=rtol * scale)


def X64(G):
    return G.detach().cpu().double()


def T(rows):
    return torch.tensor(rows, dtype=torch.float64, device=DEVICE)


# ---------------------------------------------------------------- float64 paper formulas

def fedavg_ref(G, w=None):
    w = torch.ones(G.shape[0], dtype=torch.float64) if w is None else torch.as_tensor(w, dtype=torch.float64)
    return (w[:, None] * G).sum(0) / w.sum()


def trimmed_ref(G, trim):
    return G.sort(0).values[trim:G.shape[0] - trim].mean(0)


def clipped(G, c):
    norm = G.norm(dim=1, keepdim=True)
    return torch.where(norm > c, G * c / norm, G)


def median_norm_step_ref(X):
    """The default sign step: the lower median of the row norms over sqrt(d)."""
    norms = sorted(X.norm(dim=1).tolist())
    return norms[(len(norms) - 1) // 2] / math.sqrt(X.shape[1])


def geomed_ref(G, w=None, nu=1e-6, max_iter=100, tol=1e-7):
    alpha = torch.ones(G.shape[0], dtype=torch.float64) if w is None else torch.as_tensor(w, dtype=torch.float64)
    z = (alpha[:, None] * G).sum(0) / alpha.sum()
    for it in range(1, max_iter + 1):
        beta = alpha / (G - z).norm(dim=1).clamp_min(nu)
        new = (beta[:, None] * G).sum(0) / beta.sum()
        done = (new - z).norm() <= tol * z.norm()
        z = new
        if done:
            return z, it
    return z, max_iter


def centered_clipping_ref(G, tau, iters, center):
    v = center.clone()
    for _ in range(iters):
        diff = G - v
        norm = diff.norm(dim=1, keepdim=True)
        v = v + (diff * torch.where(norm > tau, tau / norm, torch.ones_like(norm))).mean(0)
    return v
