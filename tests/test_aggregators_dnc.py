"""DnC (robustagg/aggregators/dnc.py): the column sample, and the filter against the SVD written out
in float64."""
import pytest
import torch
from aggregator_formulas import X64, close, rand_G

from robustagg import aggregators as A
from robustagg.aggregators.dnc import sample_columns


@pytest.mark.parametrize("d,b", [(10, 10), (10, 3), (1000, 50), (100000, 1000)])
def test_dnc_column_sample_is_distinct_sorted_and_in_range(d, b):
    cols = sample_columns(d, b, torch.Generator().manual_seed(0))
    assert cols.numel() == min(b, d) and bool((cols[1:] > cols[:-1]).all()) and 0 <= cols[0] and cols[-1] < d


def test_dnc_column_sample_is_uniform():
    counts = torch.zeros(40)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2000):
        counts[sample_columns(40, 5, gen)] += 1
    # each column is picked with probability 5/40: 250 expected per column, sd ~ 15
    assert float(counts.min()) > 190 and float(counts.max()) < 310


def test_dnc_matches_svd_filtering():
    G = rand_G(12, 200, seed=5)
    G[3] += 4.0
    agg = A.DnC(f=2, niters=2, subsample_dim=50, c=1.0, seed=7)
    out = agg(G)
    gen = torch.Generator().manual_seed(7)
    X = X64(G)
    good = set(range(12))
    for _ in range(2):
        cols = sample_columns(200, 50, gen)
        S = X[:, cols]
        Sc = S - S.mean(0)
        v = torch.linalg.svd(Sc, full_matrices=False).Vh[0]
        s = (Sc @ v) ** 2
        good &= set(sorted(range(12), key=lambda i: (s[i].item(), i))[:10])
    close(out, X[sorted(good)].mean(0))
    assert agg.last_report.selected == sorted(good) and 3 not in good
