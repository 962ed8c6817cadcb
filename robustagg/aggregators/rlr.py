"""Robust learning rate (seed defense)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import ops
from .base import (Aggregator, Clients, Report, check_choice, check_float, check_int, check_multiplier,
                   make_generator)
from .classic import clip_factor, median_norm_step


@dataclass
class RobustLRReport(Report):
    # fraction of coordinates with |sign_sum| >= theta (lr = +server_lr); None on the fused
    # mean path, where the sign votes never leave the rlr op
    lr_positive_fraction: float | None = None
    clipped: list[int] | None = None


class RobustLR(Aggregator):
    r"""Robust learning rate (Ozdayi et al., AAAI 2021; ``ops.rlr``):
    $\eta_j = +\mathrm{lr}$ if $|\sum_i \operatorname{sign}(g_{ij})| \ge \theta$ else $-\mathrm{lr}$,
    and the output is $\eta \odot \mathrm{base}$.

    * ``base="mean"``: the weighted mean (weights are sample counts); ``"median"``: the
      numpy-style coordinate median; ``"sign"``: ``sign(sign_sum)`` times ``sign_step`` (signSGD).
      Weights only change the mean base.
    * ``sign_step``: the size of the sign base's entries. By default (None) it is the median
      client norm (after clipping) over $\sqrt d$, as in ``SignSGD``, so that the base has about
      the length of a client update; the authors' code adds unit signs (``sign_step=1.0``), a step
      of 1 on every coordinate of the model.
    * ``clip``: each row is clipped to L2 <= clip first (Sun et al. 2019), as in the paper's
      combination with weak DP.
    * ``noise``: N(0, (noise*clip)^2) is added to the base before the lr multiply, as in the
      authors' code; it needs ``clip``.

    ``theta`` is a vote count (0..n). The mean base without noise is one fused ``rlr`` pass.
    The output is the update the server adds, as in the paper, whose updates are model deltas
    (``server_lr=1`` is its value).
    """

    uses_weights = True

    def __init__(self, theta: int, server_lr: float = 1.0, base: str = "mean", clip: float | None = None,
                 noise: float = 0.0, *, sign_step: float | None = None, generator=None, seed=None, **kw):
        super().__init__(**kw)
        self.theta = check_int(self.name, "theta", theta, 0)
        self.server_lr = check_float(self.name, "server_lr", server_lr)
        self.base = check_choice(self.name, "base", base, ("mean", "median", "sign"))
        self.clip = None if clip is None else check_float(self.name, "clip", clip, 0.0, lo_open=True)
        self.noise = check_float(self.name, "noise", noise, 0.0)
        self.sign_step = None if sign_step is None else check_float(self.name, "sign_step", sign_step, 0.0)
        if self.noise > 0 and self.clip is None:
            raise ValueError(f"{self.name}: noise={self.noise} needs clip; the noise std is noise*clip")
        self.generator = make_generator(generator, seed)

    def check_n(self, n):
        if self.theta > n:
            raise ValueError(f"{self.name}: theta={self.theta} votes exceeds n={n} clients; allowed theta in [0, {n}]")

    def aggregate(self, rows: Clients, layout):
        check_multiplier(self.name, "server_lr", self.server_lr, rows.G.dtype)
        scale, clipped, norm = None, None, None
        if self.clip is not None:
            norm = rows.stats().norm
            scale = clip_factor(norm, self.clip)
            clipped = rows.ids(scale < 1)
        self.check_n(rows.n)
        if self.base == "mean" and self.noise == 0:
            out = self.fused_mean(rows, scale)
            return out, RobustLRReport(selected=rows.all_ids(), clipped=clipped)
        if self.base == "mean":
            w = rows.weights_or_ones()
            base = rows.combine(w * (1 if scale is None else scale) / w.sum())
            votes = rows.run(ops.sign_sum)
        elif self.base == "median":
            votes = rows.run(ops.sign_sum)   # screens the rows before the median reads them
            G = rows.G if scale is None else rows.clip_rows(self.clip)
            base = ops.median(G, rows=rows.selection, nonfinite="propagate", backend=self.backend)
        else:
            # a positive clip factor never changes a sign
            votes = rows.run(ops.sign_sum)
            base = torch.sign(votes).to(rows.G.dtype) * self.sign_size(rows, norm)
        if self.noise > 0:
            base = base + rows.gaussian(self.noise * self.clip, base, self.generator)
        positive = votes.abs() >= self.theta
        lr = torch.full_like(base, self.server_lr)  # in base's dtype: a float64 round keeps a float64 lr
        lr = torch.where(positive, lr, -lr)
        return lr * base, RobustLRReport(selected=rows.all_ids(), clipped=clipped,
                                         lr_positive_fraction=rows.fraction(positive))

    def sign_size(self, rows: Clients, norm: torch.Tensor | None) -> float:
        """The sign base's step: ``sign_step``, else the median clipped norm over sqrt(d)."""
        if self.sign_step is not None:
            return check_multiplier(self.name, "sign_step", self.sign_step, rows.G.dtype)
        if norm is None:
            norm = rows.stats().norm
        if self.clip is not None:
            norm = norm.clamp_max(self.clip)
        return median_norm_step(norm, rows.d)

    def fused_mean(self, rows: Clients, scale):
        """One rlr pass. Clipping scales rows by a positive factor, which keeps their signs, so the
        clipped mean is rlr with weights w_i*scale_i, times sum(w*scale)/sum(w)."""
        if scale is None:
            return rows.run(ops.rlr, self.theta, weights=rows.weights_by_row, server_lr=self.server_lr)
        w = rows.weights_or_ones()
        ws = w * scale
        out = ops.rlr(rows.G, self.theta, weights=rows.spread(ws), server_lr=self.server_lr, rows=rows.selection,
                      nonfinite="propagate", backend=self.backend)
        return out * float(ws.sum() / w.sum())
