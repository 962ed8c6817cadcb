"""SparseFed (robustagg/aggregators/sparsefed.py) against top-k error feedback written out in float64
over several rounds, its presets and its state."""
import torch
from aggregator_formulas import X64, clipped, close, rand_G

from robustagg import aggregators as A


def sparsefed_ref(rounds, k, rho, lr, clip):
    d = rounds[0].shape[1]
    e, m = torch.zeros(d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64)
    outs = []
    for G in rounds:
        u = clipped(G, clip).mean(0)
        m = rho * m + u
        e = e + m
        order = sorted(range(d), key=lambda j: (-abs(e[j].item()), j))[:k]
        delta = torch.zeros(d, dtype=torch.float64)
        delta[order] = e[order] * lr
        e[order] = 0
        m[order] = 0
        outs.append(delta)
    return outs


def test_sparsefed_three_rounds_match_error_feedback():
    rounds = [rand_G(6, 50, seed=s) for s in range(3)]
    agg = A.SparseFed(k=7, rho=0.9, lr=0.5, clip=4.0)
    for G, expected in zip(rounds, sparsefed_ref([X64(G) for G in rounds], 7, 0.9, 0.5, 4.0)):
        out = agg(G)
        close(out, expected)
        assert int((out != 0).sum()) == 7


def test_sparsefed_default_adds_exactly_the_sum_of_the_mean_deltas():
    # rho = 0: what the rounds returned plus what the error still holds is the sum of the means,
    # so a server that adds the outputs to the model falls behind FedAvg by the residual only
    rounds = [rand_G(6, 50, seed=s) for s in range(4)]
    agg = A.SparseFed(k=7)
    returned = sum(agg(G) for G in rounds)
    close(returned + agg.error, sum(X64(G).mean(0) for G in rounds))
    assert agg.rho == 0.0 and agg.lr == 1.0


def test_sparsefed_paper_preset_has_the_paper_momentum():
    agg = A.SparseFed.paper(7, clip=4.0)
    assert (agg.k, agg.rho, agg.lr, agg.clip) == (7, 0.9, 1.0, 4.0)
