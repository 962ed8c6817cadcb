"""Every aggregator of ``robustagg.aggregators`` (docs/aggregators.md), configured for n clients, for ``python -m robustagg bench``.

``make_aggregators(n, layout, root_update, backend)`` returns name -> callable(G) -> [d]. The
settings follow the papers' usual ones scaled to n: f = n // 5 assumed attackers wherever a rule
needs f, SparseFed keeps 1% of the coordinates, and the clipping radii are the norm of
``root_update`` (the server's reference update), so that clipping is active but not degenerate.
SMEA searches all C(n, f) subsets, so it assumes at most ``SMEA_F`` attackers (n subsets: ByzFL's
SMEA, which the peers section times, makes a pass over G per subset); after
``Bucketing(BUCKET_SIZE)`` Krum sees half as many rows and assumes f // 2 of them bad.
"""
from __future__ import annotations

from typing import Callable

import torch

from .. import aggregators as A
from ..layout import Layout

SMEA_F = 1
BUCKET_SIZE = 2


def make_aggregators(n: int, layout: Layout, root_update: torch.Tensor, backend: str | None,
                     seed: int = 0) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """Name -> aggregator for n clients; each takes G (n, d) and returns the [d] aggregate.

    ``layout`` is the model's parameter layout (used by the max-pool amplified rules);
    ``root_update`` ([d]) is FLTrust's server update and sets the clipping radii.
    """
    if n < 7:
        raise ValueError(f"make_aggregators: n={n} is too small; Bulyan with f >= 1 needs n >= 7")
    f = n // 5
    d = root_update.numel()
    radius = float(root_update.double().norm()) or 1.0
    common = {"backend": backend}
    seeded = {"backend": backend, "seed": seed}
    density = {"k_nearest": n // 2, "malicious_frac": f / n, "kernel": 2, "layout": layout, **common}
    theta = max(1, round(0.4 * n))   # Ozdayi et al.: theta = 4 of 10 agents per round
    return {
        "FedAvg": A.FedAvg(**common),
        "CoordinateMedian": A.CoordinateMedian(**common),
        "TrimmedMean": A.TrimmedMean(trim=f, **common),
        "SignSGD": A.SignSGD(**common),
        "NormClipping": A.NormClipping(radius, noise=0.001, **seeded),
        "GeometricMedian": A.GeometricMedian(**common),
        "CenteredClipping": A.CenteredClipping(tau=radius, iters=3, **common),
        "Krum": A.Krum(f, **common),
        "MultiKrum": A.MultiKrum(f, **common),
        "MultiKrumCos": A.MultiKrumCos(f, **common),
        "Bulyan": A.Bulyan(min(f, (n - 3) // 4), **common),
        "DnC": A.DnC(f, niters=1, subsample_dim=10000, c=1.0, **seeded),
        "InvariantAggregator": A.InvariantAggregator(0.2, alpha=0.25, **common),
        "InvariantAggregator.official": A.InvariantAggregator.official(**common),
        "RobustLR": A.RobustLR(theta, **common),
        "RobustLR-median": A.RobustLR(theta, base="median", **common),
        "RobustLR-sign": A.RobustLR(theta, base="sign", **common),
        "RobustLR-clip-noise": A.RobustLR(theta, clip=radius, noise=0.001, **seeded),
        "SparseFed": A.SparseFed(k=max(1, d // 100), rho=0.9, lr=1.0, clip=radius, **common),
        "SignGuard": A.SignGuard(**seeded),
        "SignGuard-sim": A.SignGuard(variant="sim", **seeded),
        "SignGuard-dist": A.SignGuard(variant="dist", **seeded),
        "CosDen": A.CosDen(**density),
        "CosDen-official": A.CosDen(score="official", **density),
        "EuDen": A.EuDen(**density),
        "MgDen": A.MgDen(**density),
        "FLTrust": A.FLTrust(root_update, **common),
        "FLTrustAmp": A.FLTrustAmp(root_update, kernel=2, layout=layout, **common),
        "Meamed": A.Meamed(f, **common),
        "MDA": A.MDA(f, **common),
        "MoNNA": A.MoNNA(f, idx=0, **common),
        "CAF": A.CAF(f, **common),
        "SMEA": A.SMEA(min(f, SMEA_F), **common),
        "NNM+TrimmedMean": A.Pipeline(A.NNM(f), A.TrimmedMean(trim=f), **common),
        "Bucketing+Krum": A.Pipeline(A.Bucketing(BUCKET_SIZE, seed=seed), A.Krum(f // 2), **common),
        "ARC+FedAvg": A.Pipeline(A.ARC(f), A.FedAvg(), **common),
    }
