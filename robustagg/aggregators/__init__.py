"""Robust aggregation rules built from ``robustagg.ops`` (docs/aggregators.md).

Seed defenses: InvariantAggregator, RobustLR, SparseFed, SignGuard, CosDen / EuDen / MgDen,
FLTrust / FLTrustAmp. Baselines: FedAvg, CoordinateMedian, TrimmedMean, Krum, MultiKrum,
MultiKrumCos, Bulyan, SignSGD, NormClipping, GeometricMedian, CenteredClipping, DnC.

Every aggregator is called as ``agg(updates, weights=None)`` and leaves a dataclass in
``agg.last_report`` (see ``base.Aggregator``).
"""
from .amplifier import CosDen, DensityReport, EuDen, FLTrust, FLTrustAmp, FLTrustReport, MgDen
from .base import Aggregator, Report
from .classic import (CenteredClipping, CenteredClippingReport, ClippingReport, CoordinateMedian, FedAvg,
                      GeometricMedian, GeometricMedianReport, NormClipping, SignSGD, TrimmedMean,
                      TrimmedMeanReport)
from .dnc import DnC, DnCReport
from .invariant import InvariantAggregator, InvariantReport
from .krum import Bulyan, BulyanReport, Krum, KrumReport, MultiKrum, MultiKrumCos
from .rlr import RobustLR, RobustLRReport
from .signguard import SignGuard, SignGuardReport
from .sparsefed import SparseFed, SparseFedReport

__all__ = [
    "Aggregator", "Report",
    "InvariantAggregator", "RobustLR", "SparseFed", "SignGuard", "CosDen", "EuDen", "MgDen", "FLTrust", "FLTrustAmp",
    "FedAvg", "CoordinateMedian", "TrimmedMean", "Krum", "MultiKrum", "MultiKrumCos", "Bulyan", "SignSGD",
    "NormClipping", "GeometricMedian", "CenteredClipping", "DnC",
    "InvariantReport", "RobustLRReport", "SparseFedReport", "SignGuardReport", "DensityReport", "FLTrustReport",
    "TrimmedMeanReport", "KrumReport", "BulyanReport", "ClippingReport", "GeometricMedianReport",
    "CenteredClippingReport", "DnCReport",
]
