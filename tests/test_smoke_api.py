"""The public API exists, exports every op of docs/ops.md, and the backend table is honest."""
import torch

import robustagg
from robustagg import ops


def test_every_spec_op_is_exported():
    names = ["sign_sum", "sign_agreement", "order_mean", "trimmed_mean", "median", "invariant", "rlr",
             "client_stats", "clip_rows", "topk_ef_step", "topk_abs", "maxpool_amplify",
             "pairwise_sqdist", "pairwise_cosine"]
    for name in names:
        assert callable(getattr(robustagg, name)), name
        assert getattr(robustagg, name) is getattr(ops, name)


def test_available_backends_reports_each_backend():
    table = robustagg.available_backends()
    assert set(table) == {"cpu", "cuda", "triton", "torch"}
    assert table["torch"] == "available"
    assert table["cpu"] == "available", table["cpu"]
    if not torch.cuda.is_available():
        assert table["cuda"] != "available"
