"""The CPU kernels' instruction-set matrix: every op's AVX-512, AVX2 and baseline copies give the
same bits (csrc/cpu/isa.h), wherever this machine has the instruction set."""
import pytest
import torch

from robustagg._registry import RAW_OPS
from robustagg.layout import Layout
from conftest import DEVICE, DTYPES

pytestmark = pytest.mark.skipif(DEVICE.type != "cpu", reason="the CPU kernels' instruction-set copies")

ISAS = ["baseline", "avx2", "avx512"]
# torch's detection of the same instruction sets: a copy this machine cannot run is skipped
_HAS = {"baseline": True, "avx2": torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"),
        "avx512": torch.backends.cpu.get_cpu_capability() == "AVX512"}


def awkward(n, d, dtype, seed):
    """Normal values with exact ties, both zeros, huge values and one NaN row."""
    g = torch.Generator().manual_seed(seed)
    G = torch.randn(n, d, generator=g, dtype=torch.float64)
    pick = torch.rand(n, d, generator=g)
    G = torch.where(pick < 0.1, G.round(), G)
    G = torch.where((pick >= 0.1) & (pick < 0.15), torch.full((), -0.0, dtype=torch.float64), G)
    G = torch.where(pick > 0.995, torch.full((), 6e4, dtype=torch.float64), G)
    G[min(3, n - 1), d // 2] = float("nan")
    return G.to(dtype)


def topk_ef_step(u):
    """The step's outputs and the state it updated in place."""
    error, momentum = torch.linspace(-1, 1, u.numel(), dtype=u.dtype), torch.zeros_like(u)
    return (*torch.ops.robustagg.topk_ef_step(u, error, momentum, 300, 0.9), error, momentum)


def calls(dtype):
    """One call of every CPU op, on shapes with partial vectors, several tiles and chunks."""
    rob = torch.ops.robustagg
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    G = awkward(21, 5003, dtype, seed=1)
    small = awkward(9, 4099, dtype, seed=2)
    u = awkward(1, 20011, dtype, seed=3)[0].nan_to_num()
    long_u = awkward(1, 3 * 65536 + 13, dtype, seed=5)[0].nan_to_num()   # several top-k chunks
    w = torch.rand(21, generator=torch.Generator().manual_seed(4)).to(acc)
    layout = Layout.from_shapes([(64, 50), (7, 13), (3,), (5, 5, 2)])
    pooled = small[:, :3344].contiguous()
    table, restore_table = layout.segment_table(3344, 2, False), layout.segment_table(3344, 2, True)
    return {
        "sign_sum": lambda: rob.sign_sum(G),
        "rlr": lambda: rob.rlr(G, w, 6, 0.25),
        "rlr_unweighted": lambda: rob.rlr(G, None, 6, 1.0),
        "order_mean": lambda: rob.order_mean(G[:, :4999].contiguous(), 5, 15),
        "invariant": lambda: rob.invariant(G, 2, 9, 6),
        "closest_to_median_mean": lambda: rob.closest_to_median_mean(G, 7),
        "client_stats": lambda: rob.client_stats(G, 100, 4000, G[0].nan_to_num()),
        "clip_rows": lambda: rob.clip_rows(G, torch.full((21,), 3.0, dtype=acc)),
        "topk_ef_step": lambda: topk_ef_step(u),
        "topk_abs": lambda: rob.topk_abs(u, 300),
        "topk_abs_chunks": lambda: rob.topk_abs(long_u, 2000),
        "maxpool_amplify": lambda: rob.maxpool_amplify(pooled, table, 2, False, layout.pooled_width(3344, 2)),
        "maxpool_restore": lambda: rob.maxpool_amplify(pooled, restore_table, 2, True, 3344),
        "pairwise_sqdist": lambda: rob.pairwise_sqdist(small),
        "pairwise_cosine": lambda: rob.pairwise_cosine(small),
    }


def bits(t):
    return t.view(torch.uint8) if t.is_floating_point() else t


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_instruction_set_gives_the_same_bits(monkeypatch, isa, dtype):
    if not _HAS[isa]:
        pytest.skip(f"this CPU has no {isa}")
    monkeypatch.setenv("ROBUSTAGG_CPU_ISA", "baseline")
    expected = {op: call() for op, call in calls(dtype).items()}
    monkeypatch.setenv("ROBUSTAGG_CPU_ISA", isa)
    for op, call in calls(dtype).items():
        for i, (got, exp) in enumerate(zip(call(), expected[op])):
            assert torch.equal(bits(got), bits(exp)), f"{op} output {i} under {isa} differs from baseline"


def test_every_cpu_op_is_in_the_matrix():
    cpu_ops = {op.name for op in RAW_OPS.values() if "CPU" in op.native}
    assert cpu_ops <= set(calls(torch.float32))
