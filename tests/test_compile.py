"""torch.compile and the op table (robustagg/_registry.py, docs/backends.md).

* The table lists exactly the ops that csrc/ops.cpp declares, each registered with its schema on
  every backend, and every registration passes ``torch.library.opcheck`` on the row's sample.
* Every raw op traces without a graph break on every backend that can run it here.
* Every public op under ``nonfinite="propagate"`` compiles into one graph (``fullgraph=True``) and
  gives exactly the eager results; under ``"raise"`` and ``"drop"`` it leaves the graph only where it
  reads the non-finite flags (one graph break), and where it reads a tensor argument whose values
  it checks (weights, ref, a per-row max_norm).
* The aggregators whose rule is ops only compile into one graph under ``nonfinite="propagate"``.

Shapes stay tiny: each case compiles once with the ``aot_eager`` backend.
"""
import dataclasses

import pytest
import torch

from robustagg import _backend, aggregators, ops
from robustagg._registry import RAW_OPS, TORCH_NAMESPACE
from robustagg.layout import Layout

from conftest import DEVICE, backends_for


@pytest.fixture(autouse=True)
def fresh_dynamo():
    # every case compiles the same few wrappers with other closures: start each from an empty cache
    torch._dynamo.reset()


INTERPRETED = pytest.mark.skip(reason="TRITON_INTERPRET=1: there the triton ops are opaque custom ops that run "
                                      "the slow interpreter; they are compiled on CUDA")


def cases(names, op=None):
    """pytest params (name, backend) for every name and every backend of backends_for(op), less
    the Triton interpreter."""
    return [pytest.param(name, *backend.values, id=f"{name}-{backend.id}",
                         marks=[*backend.marks, *([INTERPRETED] if backend.id == "triton" and
                                                  _backend.triton_interpreted() else [])])
            for name in names for backend in backends_for(op)]


def require(backend: str, op: str) -> None:
    reason = _backend._unavailable_reason(backend, op, DEVICE)
    if reason:
        pytest.skip(reason)


def tensors(result) -> list[torch.Tensor]:
    """The tensors in an op's result or arguments: tensors, tuples of them, dataclasses (ClientStats)."""
    if isinstance(result, torch.Tensor):
        return [result]
    if dataclasses.is_dataclass(result):
        result = [getattr(result, f.name) for f in dataclasses.fields(result)]
    if isinstance(result, (tuple, list)):
        return [t for item in result for t in tensors(item)]
    return []


def assert_same(eager, compiled):
    eager, compiled = tensors(eager), tensors(compiled)
    assert len(eager) == len(compiled)
    for a, b in zip(eager, compiled):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert torch.equal(a, b)


# ---------------------------------------------------------------- the op table

def _schema_ops() -> set[str]:
    return {name.split("::")[1] for name in torch._C._dispatch_get_all_op_names() if name.startswith("robustagg::")}


def _signature(schema) -> list[tuple]:
    """(name, type, written) of each argument and the number of outputs; int and SymInt are one type."""
    args = [(a.name, str(a.type).replace("SymInt", "int"), bool(a.alias_info and a.alias_info.is_write))
            for a in schema.arguments]
    return args + [len(schema.returns)]


@pytest.mark.skipif(_backend._C_error is not None, reason=str(_backend._C_error))
def test_the_table_lists_every_schema_op():
    assert sorted(RAW_OPS) == sorted(_schema_ops())


@pytest.mark.skipif(_backend._C_error is not None, reason=str(_backend._C_error))
@pytest.mark.parametrize("op", sorted(RAW_OPS))
def test_every_registration_has_the_schema_of_csrc(op):
    native = getattr(torch.ops.robustagg, op).default._schema
    torch_backend = getattr(getattr(torch.ops, TORCH_NAMESPACE), op).default._schema
    assert _signature(torch_backend) == _signature(native)
    assert [a.name for a in native.arguments if a.alias_info and a.alias_info.is_write] == list(RAW_OPS[op].mutates)


@pytest.mark.parametrize("op", sorted(RAW_OPS))
def test_native_kernels_are_where_the_table_expects_them(op):
    built = {"CPU": _backend._C_error is None, "CUDA": _backend._C_cuda_error is None}
    missing = [key for key in RAW_OPS[op].native if built[key] and not _backend._has_native_kernel(op, key)]
    assert not missing, f"{op}: the build has no {missing} kernel"


@pytest.mark.parametrize("backend", ["cpu", "cuda", "torch"])   # triton: tests/test_triton.py
@pytest.mark.parametrize("op", sorted(RAW_OPS))
def test_opcheck(op, backend):
    require(backend, op)
    torch.library.opcheck(_backend.raw_op(op, backend), RAW_OPS[op].sample(DEVICE))


# ---------------------------------------------------------------- raw ops

@pytest.mark.parametrize("op, backend", cases(sorted(RAW_OPS)))
def test_raw_op_compiles_without_graph_break(op, backend):
    require(backend, op)
    fn = _backend.raw_op(op, backend)

    def call(*args):
        return fn(*args)

    eager_args, compiled_args = RAW_OPS[op].sample(DEVICE), RAW_OPS[op].sample(DEVICE)
    eager = call(*eager_args)
    compiled = torch.compile(call, fullgraph=True, backend="aot_eager")(*compiled_args)
    assert_same(eager, compiled)
    assert_same(eager_args, compiled_args)   # what the op writes in place (topk_ef_step's state) too


# ---------------------------------------------------------------- public ops

def _inputs():
    """(G, u, error, momentum): 7 clients and 40 coordinates, fresh on each call."""
    g = torch.Generator().manual_seed(0)
    G, u = torch.randn(7, 40, generator=g), torch.randn(40, generator=g)
    return tuple(t.to(DEVICE) for t in (G, u, torch.zeros(40), torch.zeros(40)))


LAYOUT = Layout.from_shapes([(4, 5), (20,)])

# name-variant -> the call
PUBLIC = {
    "sign_sum": lambda G, u, e, m, **kw: ops.sign_sum(G, **kw),
    "sign_agreement": lambda G, u, e, m, **kw: ops.sign_agreement(G, **kw),
    "order_mean": lambda G, u, e, m, **kw: ops.order_mean(G, 1, 6, **kw),
    "trimmed_mean": lambda G, u, e, m, **kw: ops.trimmed_mean(G, 2, **kw),
    "median": lambda G, u, e, m, **kw: ops.median(G, **kw),
    "closest_to_median_mean": lambda G, u, e, m, **kw: ops.closest_to_median_mean(G, 3, **kw),
    "invariant": lambda G, u, e, m, **kw: ops.invariant(G, 0.2, 1, return_mask=True, **kw),
    "invariant_ranks": lambda G, u, e, m, **kw: ops.invariant_ranks(G, 0.5, 2, 5, **kw),
    "rlr": lambda G, u, e, m, **kw: ops.rlr(G, 3, server_lr=0.5, **kw),
    "rlr-weights": lambda G, u, e, m, **kw: ops.rlr(G, 3, weights=torch.arange(1.0, 8.0), **kw),
    "client_stats": lambda G, u, e, m, **kw: ops.client_stats(G, (3, 10), **kw),
    "client_stats-ref": lambda G, u, e, m, **kw: ops.client_stats(G, ref=u, **kw),
    "clip_rows": lambda G, u, e, m, **kw: ops.clip_rows(G, 5.0, **kw),
    "clip_rows-per_row": lambda G, u, e, m, **kw: ops.clip_rows(G, torch.full((7,), 5.0), **kw),
    "topk_ef_step": lambda G, u, e, m, **kw: ops.topk_ef_step(u, e, m, 5, 0.5, **kw),
    "topk_abs": lambda G, u, e, m, **kw: ops.topk_abs(u, 5, **kw),
    "maxpool_amplify": lambda G, u, e, m, **kw: ops.maxpool_amplify(G, LAYOUT, **kw),
    "maxpool_amplify-restore": lambda G, u, e, m, **kw: ops.maxpool_amplify(G, LAYOUT, restore=True, **kw),
    "pairwise_sqdist": lambda G, u, e, m, **kw: ops.pairwise_sqdist(G, **kw),
    "pairwise_cosine": lambda G, u, e, m, **kw: ops.pairwise_cosine(G, **kw),
}


def test_every_public_op_has_a_compile_case():
    functions = {name for name in ops.__all__ if name != "ClientStats"}
    assert {case.split("-")[0] for case in PUBLIC} == functions


@pytest.mark.parametrize("case, backend", cases(PUBLIC))
def test_public_op_compiles_into_one_graph_under_propagate(case, backend):
    call = PUBLIC[case]
    eager_args, compiled_args = _inputs(), _inputs()
    eager = call(*eager_args, nonfinite="propagate", backend=backend)
    compiled = torch.compile(call, fullgraph=True, backend="aot_eager")(*compiled_args, nonfinite="propagate",
                                                                        backend=backend)
    assert_same(eager, compiled)
    assert_same(eager_args, compiled_args)


@pytest.mark.parametrize("nonfinite", ["raise", "drop"])
@pytest.mark.parametrize("case", PUBLIC)
def test_public_op_leaves_the_graph_only_to_read_flags(case, nonfinite):
    if case.startswith("topk") and nonfinite == "drop":
        pytest.skip("the top-k ops take 'raise' or 'propagate'")
    explained = torch._dynamo.explain(PUBLIC[case])(*_inputs(), nonfinite=nonfinite)
    # One place leaves the graph: the flags' read. dynamo does not resume inside a nested frame,
    # so a read inside a helper also splits the frames that called it, and counts once per frame.
    reads = {(r.user_stack[-1].filename, r.user_stack[-1].lineno) for r in explained.break_reasons}
    assert len(reads) <= 1, explained.break_reasons


def test_eager_calls_still_check_argument_values():
    # only tracing skips the host reads of these checks; an eager call under "propagate" keeps them
    G, u, _, _ = _inputs()
    with pytest.raises(ValueError, match="weights"):
        ops.rlr(G, 3, weights=torch.tensor([1.0, -1, 1, 1, 1, 1, 1]), nonfinite="propagate")
    with pytest.raises(ValueError, match="ref"):
        ops.client_stats(G, ref=torch.full_like(u, float("nan")), nonfinite="propagate")
    with pytest.raises(ValueError, match="max_norm"):
        ops.clip_rows(G, torch.full((7,), -1.0), nonfinite="propagate")


# ---------------------------------------------------------------- aggregators

AGGREGATORS = {
    "CoordinateMedian": lambda **kw: aggregators.CoordinateMedian(**kw),
    "TrimmedMean": lambda **kw: aggregators.TrimmedMean(trim=1, **kw),
    "Meamed": lambda **kw: aggregators.Meamed(f=1, **kw),
}


@pytest.mark.parametrize("name, backend", cases(AGGREGATORS))
def test_aggregator_compiles_into_one_graph_under_propagate(name, backend):
    G = _inputs()[0]
    eager_agg, compiled_agg = (AGGREGATORS[name](nonfinite="propagate", backend=backend) for _ in range(2))
    eager = eager_agg(G)
    compiled = torch.compile(lambda X: compiled_agg(X), fullgraph=True, backend="aot_eager")(G)
    assert_same(eager, compiled)
    assert compiled_agg.last_report == eager_agg.last_report
