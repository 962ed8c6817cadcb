"""Robust aggregation rules built from ``robustagg.ops`` (docs/aggregators.md).

Seed defenses: InvariantAggregator, RobustLR, SparseFed, SignGuard, CosDen / EuDen / MgDen,
FLTrust / FLTrustAmp. Baselines: FedAvg, CoordinateMedian, TrimmedMean, Krum, MultiKrum,
MultiKrumCos, Bulyan, SignSGD, NormClipping, GeometricMedian, CenteredClipping, DnC. Subset and
neighbourhood rules: Meamed, MDA, MoNNA. Pre-aggregators NNM, Bucketing, ARC, composed with a
final rule by Pipeline(*pre, aggregator).

Every aggregator is called as ``agg(updates, weights=None)`` and leaves a dataclass in
``agg.last_report`` (see ``base.Aggregator``).
"""
from .amplifier import CosDen, DensityReport, EuDen, FLTrust, FLTrustAmp, FLTrustReport, MgDen
from .base import Aggregator, Report
from .classic import (CenteredClipping, CenteredClippingReport, ClippingReport, CoordinateMedian, FedAvg,
                      GeometricMedian, GeometricMedianReport, Meamed, MeamedReport, NormClipping, SignSGD,
                      TrimmedMean, TrimmedMeanReport)
from .dnc import DnC, DnCReport
from .invariant import InvariantAggregator, InvariantReport
from .krum import Bulyan, BulyanReport, Krum, KrumReport, MultiKrum, MultiKrumCos
from .pipeline import (ARC, NNM, ARCReport, Bucketing, BucketingReport, NNMReport, Pipeline, PipelineReport,
                       PreAggregator)
from .rlr import RobustLR, RobustLRReport
from .signguard import SignGuard, SignGuardReport
from .sparsefed import SparseFed, SparseFedReport
from .spectral import CAF, SMEA, CAFReport, SMEAReport
from .subsets import MDA, MDAReport, MoNNA

__all__ = [
    "Aggregator", "Report",
    "InvariantAggregator", "RobustLR", "SparseFed", "SignGuard", "CosDen", "EuDen", "MgDen", "FLTrust", "FLTrustAmp",
    "FedAvg", "CoordinateMedian", "TrimmedMean", "Krum", "MultiKrum", "MultiKrumCos", "Bulyan", "SignSGD",
    "NormClipping", "GeometricMedian", "CenteredClipping", "DnC",
    "Meamed", "MDA", "MoNNA", "MeamedReport", "MDAReport",
    "InvariantReport", "RobustLRReport", "SparseFedReport", "SignGuardReport", "DensityReport", "FLTrustReport",
    "TrimmedMeanReport", "KrumReport", "BulyanReport", "ClippingReport", "GeometricMedianReport",
    "CenteredClippingReport", "DnCReport",
    "CAF", "SMEA", "CAFReport", "SMEAReport",
    "Pipeline", "PreAggregator", "NNM", "Bucketing", "ARC", "PipelineReport", "NNMReport", "BucketingReport",
    "ARCReport",
]
