"""robustagg.fl (deltas, apply_update, buffer_names), the aggregators' buffer policy, NumPy structures,
and attacks.apply on structures."""
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from robustagg import NonFiniteUpdateError, attacks, fl
from robustagg import aggregators as A
from robustagg.layout import flatten

COUNTER = 16_777_217          # 2^24 + 1: the first integer float32 cannot hold


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))


def _states(n, seed=0, spread=0.1):
    """n BatchNorm client states around one global state, with distinct buffers and counters."""
    base = _model(seed).state_dict()
    gen = torch.Generator().manual_seed(seed)
    states = []
    for i in range(n):
        sd = OrderedDict()
        for k, v in base.items():
            if v.dtype.is_floating_point:
                sd[k] = v + spread * torch.randn(v.shape, generator=gen)
            else:
                sd[k] = v + COUNTER + i
        sd["1.running_var"] = sd["1.running_var"].abs() + 0.5
        states.append(sd)
    return base, states


def _numpy(sd):
    return OrderedDict((k, v.numpy()) for k, v in sd.items())


def _equal(a, b):
    """Same structure, types, dtypes and values (bitwise)."""
    if isinstance(a, dict):
        assert list(a) == list(b)
        return all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list):
        assert len(a) == len(b)
        return all(_equal(x, y) for x, y in zip(a, b))
    assert type(a) is type(b), (type(a), type(b))
    assert a.dtype == b.dtype and a.shape == b.shape
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b, equal_nan=True)
    return torch.equal(a, b)


# ---------------------------------------------------------------- structures in, same structures out

def _structures():
    _, states = _states(4)
    torch_params = [[v for v in sd.values()] for sd in states]
    rows = [torch.cat([v.reshape(-1).float() for k, v in sd.items() if v.dtype.is_floating_point]) for sd in states]
    return {
        "tensor": torch.stack(rows),
        "ndarray": torch.stack(rows).numpy(),
        "vectors": rows,
        "ndarray vectors": [r.numpy() for r in rows],
        "parameter lists": torch_params,
        "Flower NDArrays": [[v.numpy() for v in p] for p in torch_params],
        "state_dicts": states,
        "numpy state_dicts": [_numpy(sd) for sd in states],
    }


def _is_matrix(updates):
    return isinstance(updates, (torch.Tensor, np.ndarray))


def _matrix(updates):
    """G of the floating entries, to compare structures client by client."""
    if _is_matrix(updates):
        return flatten(updates)[0]
    return flatten(updates, hold_out=lambda key, t: not t.dtype.is_floating_point)[0]


@pytest.mark.parametrize("kind", list(_structures()))
def test_flatten_round_trips_every_structure(kind):
    clients = _structures()[kind]
    G, layout = flatten(clients, hold_out=() if _is_matrix(clients) or _is_matrix(clients[0])
                        else (lambda key, t: not t.dtype.is_floating_point))
    back = layout.unflatten(G)
    for i in range(4):
        assert _equal(back[i], clients[i])


@pytest.mark.parametrize("kind", list(_structures()))
def test_aggregators_return_the_structure_they_are_given(kind):
    clients = _structures()[kind]
    same = clients[[0, 0, 0, 0]] if _is_matrix(clients) else [clients[0]] * 4
    for agg in (A.FedAvg(), A.CoordinateMedian(), A.Krum(0)):
        assert _equal(agg(same), clients[0]), (kind, agg)


def test_within_one_client_each_entry_keeps_its_own_dtype():
    clients = [[torch.randn(3, dtype=torch.float16), torch.randn(2, dtype=torch.float64),
                torch.tensor([COUNTER + i], dtype=torch.int64)] for i in range(3)]
    out = A.FedAvg()(clients)
    assert [p.dtype for p in out] == [torch.float16, torch.float64, torch.int64]
    assert int(out[2]) == COUNTER + 1      # the median of the three counters, exact


def test_numpy_matrix_and_vectors_give_numpy():
    G = np.random.default_rng(0).standard_normal((5, 7)).astype(np.float32)
    out = A.TrimmedMean(trim=1)(G)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (7,)
    np.testing.assert_allclose(out, np.sort(G, axis=0)[1:4].mean(0), rtol=1e-6)
    vec = A.FedAvg()(list(G.astype(np.float64)))
    assert isinstance(vec, np.ndarray) and vec.dtype == np.float64


def test_read_only_and_strided_ndarrays_are_accepted():
    G = np.arange(24, dtype=np.float32).reshape(6, 4)[:, ::-1]
    G.flags.writeable = False
    out = A.FedAvg()(G)
    np.testing.assert_allclose(out, G.mean(0))


# ---------------------------------------------------------------- integer entries stay exact

def test_counter_beyond_float32_comes_back_exact_through_every_path():
    base, states = _states(5)
    out = A.FedAvg()(states)
    assert int(out["1.num_batches_tracked"]) == COUNTER + 2
    krum = A.Krum(1)
    picked = krum(states)
    assert int(picked["1.num_batches_tracked"]) == COUNTER + krum.last_report.selected[0]
    nd = A.FedAvg()([_numpy(sd) for sd in states])
    assert nd["1.num_batches_tracked"].dtype == np.int64 and int(nd["1.num_batches_tracked"]) == COUNTER + 2
    update = fl.deltas(states, base)
    assert int(update[3]["1.num_batches_tracked"]) == COUNTER + 3
    new = fl.apply_update(base, A.FedAvg()(update))
    assert int(new["1.num_batches_tracked"]) == int(base["1.num_batches_tracked"]) + COUNTER + 2


def test_plain_flatten_refuses_to_round_a_counter_and_says_how():
    _, states = _states(2)
    with pytest.raises(ValueError, match=r"num_batches_tracked.*16777217.*16777216.*float32.*hold_out"):
        flatten(states)
    G, layout = flatten(states, hold_out=["1.num_batches_tracked"])
    assert G.shape[1] == layout.d == sum(v.numel() for v in states[0].values()) - 1
    assert int(layout.unflatten(G)[1]["1.num_batches_tracked"]) == COUNTER + 1
    with pytest.raises(ValueError, match="held= values.*num_batches_tracked"):
        layout.unflatten(G[0])


def test_integer_entries_are_the_median_of_the_kept_clients():
    clients = [[torch.zeros(2), torch.tensor(c)] for c in (5, 6, 2**62)]   # one client sends a huge counter
    assert int(A.FedAvg()(clients)[1]) == 6


# ---------------------------------------------------------------- variances stay non-negative

def test_running_var_never_goes_negative_in_delta_form():
    base, states = _states(6)
    base["1.running_var"] = torch.full((4,), 0.01)
    for sd in states:            # every client's variance shrinks to about a tenth of the global one
        sd["1.running_var"] = torch.full((4,), 0.001)
    update = fl.deltas(states, base)
    sign_vote = A.SignSGD(server_lr=1.0, buffers="rule")(update)
    assert bool((base["1.running_var"] + sign_vote["1.running_var"] < 0).all())   # the naive step is -0.99
    assert bool((fl.apply_update(base, sign_vote)["1.running_var"] == 0).all())
    kept = fl.apply_update(base, A.SignSGD(server_lr=1.0)(update))
    torch.testing.assert_close(kept["1.running_var"], torch.full((4,), 0.001))
    sparse = fl.apply_update(base, A.SparseFed(k=3, buffers="rule")(update))
    assert bool((sparse["1.running_var"] >= 0).all())


def test_nonnegative_takes_positions_for_parameter_lists():
    base = [np.array([0.5, 0.1], dtype=np.float32), np.array([1.0], dtype=np.float32)]
    step = [np.array([-1.0, 0.2], dtype=np.float32), np.array([-2.0], dtype=np.float32)]
    new = fl.apply_update(base, step, nonnegative=[0])
    np.testing.assert_allclose(new[0], [0.0, 0.3], rtol=1e-6)
    np.testing.assert_allclose(new[1], [-1.0])
    with pytest.raises(ValueError, match=r"nonnegative names \[5\]"):
        fl.apply_update(base, step, nonnegative=[5])


# ---------------------------------------------------------------- the update convention

def test_deltas_and_apply_update_round_trip():
    base, states = _states(3)
    update = fl.deltas(states, base)
    for sd, u in zip(states, update):
        back = fl.apply_update(base, u)
        for k in sd:
            assert back[k].dtype == base[k].dtype
            torch.testing.assert_close(back[k], sd[k], rtol=0, atol=1e-6)
        assert u["1.num_batches_tracked"].dtype == torch.int64


def test_apply_update_scales_floats_by_lr_and_counters_not_at_all():
    base, states = _states(2)
    u = fl.deltas(states, base)[1]
    new = fl.apply_update(base, u, lr=-0.5)
    torch.testing.assert_close(new["0.weight"], base["0.weight"] - 0.5 * u["0.weight"])
    assert int(new["1.num_batches_tracked"] - base["1.num_batches_tracked"]) == COUNTER + 1
    with pytest.raises(ValueError, match="lr=inf"):
        fl.apply_update(base, u, lr=float("inf"))


def test_gradient_style_fits_by_negation():
    """Aggregating -g and adding lr=eta is SGD's step on the mean gradient."""
    base = [torch.randn(3, 2), torch.randn(2)]
    grads = [[torch.randn(3, 2), torch.randn(2)] for _ in range(4)]
    new = fl.apply_update(base, A.FedAvg()([[-g for g in gs] for gs in grads]), lr=0.1)
    for j in range(2):
        torch.testing.assert_close(new[j], base[j] - 0.1 * torch.stack([gs[j] for gs in grads]).mean(0))


def test_deltas_take_the_global_dtypes():
    base = [torch.zeros(3, dtype=torch.float32)]
    clients = [[torch.ones(3, dtype=torch.float64)], [np.full(3, 2.0, dtype=np.float16)]]
    out = fl.deltas(clients, base)
    assert out[0][0].dtype == torch.float32 and out[1][0].dtype == np.float32
    huge = fl.deltas([[torch.full((3,), 1e300, dtype=torch.float64)]], base)[0][0]
    assert bool(torch.isinf(huge).all())             # then an aggregator rejects that client as non-finite


def test_deltas_name_the_client_that_does_not_match():
    base, states = _states(3)
    states[2]["1.num_batches_tracked"] = states[2]["1.num_batches_tracked"].float()
    with pytest.raises(ValueError, match=r"client 2's entry '1.num_batches_tracked' is torch.float32.*torch.int64"):
        fl.deltas(states, base)
    del states[1]["0.bias"]
    with pytest.raises(ValueError, match=r"client 1's state lacks key '0.bias'"):
        fl.deltas(states, base)
    with pytest.raises(ValueError, match="non-empty list"):
        fl.deltas([], base)
    with pytest.raises(TypeError, match="client_states must be a list of client states, got a OrderedDict"):
        fl.deltas(base, base)


def test_buffer_names_are_exactly_the_module_buffers():
    model = _model()
    model.register_buffer("ema", torch.zeros(2))
    model.register_buffer("scratch", torch.zeros(2), persistent=False)
    assert fl.buffer_names(model) == ["ema", "1.running_mean", "1.running_var", "1.num_batches_tracked"]
    with pytest.raises(TypeError, match="nn.Module"):
        fl.buffer_names(model.state_dict())


# ---------------------------------------------------------------- outputs are detached

def test_outputs_from_live_parameters_are_detached():
    models = [_model(s) for s in range(5)]
    params = [list(m.parameters()) for m in models]
    states = [m.state_dict(keep_vars=True) for m in models]
    assert params[0][0].requires_grad and states[0]["0.weight"].requires_grad
    for out in (A.FedAvg()(params), A.Krum(1)(params), A.MultiKrum(1)(states),
                attacks.apply(params, [4], attacks.lie)[4], fl.deltas(params, params[0])[1]):
        values = out.values() if isinstance(out, dict) else out
        assert not any(t.requires_grad or t.grad_fn is not None for t in values)


# ---------------------------------------------------------------- errors

def test_mixed_client_dtypes_name_the_clients():
    clients = [torch.zeros(3, dtype=dt) for dt in (torch.float32, torch.float64, torch.float32, torch.float64)]
    with pytest.raises(ValueError, match=r"clients \[1, 3\] send the array as torch.float64 but client 0 .*float32"):
        A.FedAvg()(clients)
    _, states = _states(3)
    states[2]["0.weight"] = states[2]["0.weight"].double()
    with pytest.raises(ValueError, match=r"clients \[2\] send entry '0.weight' as torch.float64"):
        A.Krum(0)(states)
    nd = [[np.zeros(2, np.float32)], [np.zeros(2, np.float16)]]
    with pytest.raises(ValueError, match=r"clients \[1\] send parameter 0 as torch.float16"):
        A.FedAvg()(nd)


@pytest.mark.parametrize("updates, error, match", [
    ([1.0, 2.0, 3.0], TypeError,
     r"updates\[0\] is a float; each client's update must be .*an \(n, d\) tensor or ndarray"),
    ([[1.0, 2.0], [3.0, 4.0]], TypeError,
     r"updates\[0\]\[0\] is a float; the entries of an update must be tensors or ndarrays"),
    ({"a": torch.zeros(3)}, TypeError, r"updates is a dict; expected an \(n, d\) tensor or ndarray"),
    (np.array([[1, "x"]], dtype=object), TypeError, r"dtype object, which torch cannot hold"),
    ([np.zeros((2, 2))], ValueError, r"client 0's update is a 2-D ndarray.*1-D tensors or ndarrays"),
])
def test_unsupported_structures_say_what_was_received_and_what_is_accepted(updates, error, match):
    with pytest.raises(error, match=match):
        A.FedAvg()(updates)


def test_buffer_keys_are_checked():
    _, states = _states(3)
    with pytest.raises(ValueError, match=r"buffer_keys names '1.running_std'"):
        A.FedAvg(buffer_keys=["1.running_std"])(states)
    with pytest.raises(TypeError, match="buffer_keys must be None or a collection"):
        A.FedAvg(buffer_keys="1.running_mean")
    with pytest.raises(ValueError, match=r"buffers='mean' is not one of \('kept_median', 'kept_mean', 'rule'\)"):
        A.FedAvg(buffers="mean")


# ---------------------------------------------------------------- buffers are kept out of the rule

def _krum_case(byzantine_far: bool):
    """Six honest clients and client 6, whose weights are central (or far) and whose running_mean is huge."""
    _, states = _states(7, spread=0.1)
    for k, v in states[0].items():
        if v.dtype.is_floating_point:
            states[6][k] = torch.stack([sd[k] for sd in states[:6]]).mean(0) + (5.0 if byzantine_far else 0.0)
    clean = [OrderedDict(sd) for sd in states]
    states[6]["1.running_mean"] = torch.full((4,), 1e30)
    return clean, states


def test_a_huge_buffer_does_not_change_which_clients_krum_selects():
    clean, poisoned = _krum_case(byzantine_far=False)
    krum = A.Krum(1)
    krum(clean)
    chosen = krum.last_report.selected
    assert chosen == [6]                       # the central client wins on its weights
    krum(poisoned)
    assert krum.last_report.selected == chosen
    through_rule = A.Krum(1, buffers="rule")
    through_rule(poisoned)
    assert through_rule.last_report.selected != chosen     # with the buffer in G the rule sees it


def test_a_huge_buffer_of_an_unselected_client_does_not_reach_the_output():
    _, poisoned = _krum_case(byzantine_far=True)
    for agg in (A.Krum(1), A.MultiKrum(1, m=4), A.Bulyan(1)):
        out = agg(poisoned)
        assert 6 not in agg.last_report.selected
        kept = agg.last_report.selected
        expected = torch.stack([poisoned[i]["1.running_mean"] for i in kept]).double().quantile(0.5, dim=0).float()
        torch.testing.assert_close(out["1.running_mean"], expected)


def test_explicit_buffer_keys_hold_out_custom_buffers():
    model = _model()
    model.register_buffer("ema", torch.zeros(4))
    clean = [OrderedDict((k, v + 0.01 * i if v.dtype.is_floating_point else v) for k, v in model.state_dict().items())
             for i in range(7)]
    by_name = A.Krum(1, buffer_keys=fl.buffer_names(model))
    by_name(clean)
    chosen = by_name.last_report.selected
    poisoned = [OrderedDict(sd) for sd in clean]
    poisoned[chosen[0]]["ema"] = torch.full((4,), 1e30)
    by_name(poisoned)
    assert by_name.last_report.selected == chosen
    by_suffix = A.Krum(1)                                  # "ema" is no BatchNorm name: it stays in G
    by_suffix(poisoned)
    assert by_suffix.last_report.selected != chosen


def test_rules_that_keep_every_client_aggregate_buffers_robustly_by_default():
    """A plain mean of every client's running_mean is one attacker's to move; the per-coordinate
    robust rules therefore put buffers through the rule unless told otherwise."""
    _, states = _states(7)
    states[6]["1.running_mean"] = torch.full((4,), 1e6)
    honest = torch.stack([sd["1.running_mean"] for sd in states[:6]])
    for agg in (A.CoordinateMedian(), A.TrimmedMean(trim=1), A.GeometricMedian(), A.InvariantAggregator(0.0)):
        assert agg.buffers == "rule", agg
        out = agg(states)["1.running_mean"]
        assert bool((out.abs() <= honest.abs().max(0).values + 1e-6).all()), agg
    assert A.TrimmedMean(trim=1, buffers="kept_mean")(states)["1.running_mean"].min() > 1e5
    for agg in (A.Krum(1), A.SignSGD(), A.SparseFed(k=3)):
        assert agg.buffers == "kept_median", agg
    assert A.FedAvg().buffers == "kept_mean"                  # the baseline averages everything


def test_rules_that_accept_every_client_keep_a_scaled_buffer_out_by_default():
    """SignSGD, NormClipping and RobustLR defend their output but accept every client: the kept
    clients' median of the buffers, not their mean, keeps one client's huge running statistics out."""
    _, states = _states(7)
    states[6]["1.running_mean"] = torch.full((4,), 1e6)
    states[6]["1.running_var"] = torch.full((4,), 1e6)
    honest = {key: torch.stack([sd[key] for sd in states[:6]]) for key in ("1.running_mean", "1.running_var")}
    for agg in (A.SignSGD(), A.NormClipping(max_norm=1.0), A.RobustLR(theta=2), A.FedAvg(buffers="kept_median")):
        out = agg(states)
        for key, values in honest.items():
            torch.testing.assert_close(out[key], torch.cat([values, states[6][key][None]]).double().quantile(
                0.5, dim=0).to(values.dtype), msg=f"{agg.name} {key}")
            assert bool((out[key] <= values.max(0).values).all()), agg
    assert A.SignSGD(buffers="kept_mean")(states)["1.running_mean"].min() > 1e5


def test_kept_median_of_huge_buffers_is_finite_and_of_one_client_is_its_own():
    clients = [OrderedDict(w=torch.zeros(2), running_var=torch.full((2,), v)) for v in (3e38, 3e38, 3e38, 1.0)]
    out = A.SignSGD()(clients)["running_var"]
    assert out.dtype == torch.float32 and torch.equal(out, torch.full((2,), 3e38))   # mean of the two middle 3e38
    clients = [OrderedDict(w=torch.zeros(2), running_var=torch.full((2,), v)) for v in (3e38, 3e38, 1.0, 1.0, 2.0)]
    assert torch.equal(A.SignSGD()(clients)["running_var"], torch.full((2,), 2.0))
    alone = [OrderedDict(w=torch.ones(3), running_mean=torch.tensor([0.5, -2.0]))]
    assert torch.equal(A.SignSGD()(alone)["running_mean"], torch.tensor([0.5, -2.0]))


def test_buffer_mean_uses_weights_when_the_rule_does():
    clients = [OrderedDict(w=torch.zeros(2), running_mean=torch.full((2,), float(i))) for i in range(3)]
    out = A.FedAvg(buffers="kept_mean")(clients, weights=[1.0, 1.0, 2.0])
    torch.testing.assert_close(out["running_mean"], torch.full((2,), 1.25))
    out = A.Krum(0)(clients, weights=[1.0, 1.0, 2.0])    # Krum ignores weights
    chosen = A.Krum(0)
    chosen(clients)
    assert out["running_mean"][0] == float(chosen.last_report.selected[0])


def test_no_client_kept_gives_zero_buffers():
    clients = [OrderedDict(w=torch.ones(3), running_var=torch.full((2,), 4.0)) for _ in range(4)]
    agg = A.FLTrust(OrderedDict(w=-torch.ones(3), running_var=torch.ones(2)))
    out = agg(clients)
    assert agg.last_report.all_zero_trust and agg.last_report.selected == []
    assert torch.equal(out["running_var"], torch.zeros(2)) and torch.equal(out["w"], torch.zeros(3))


# ---------------------------------------------------------------- non-finite clients through structures

def test_nan_in_a_weight_or_a_buffer_rejects_the_client():
    _, states = _states(8)
    states[2]["0.weight"][0, 0] = float("nan")
    states[4]["1.running_var"][1] = float("inf")
    for agg in (A.FedAvg(), A.Krum(1), A.CoordinateMedian()):
        out = agg(states)
        assert agg.last_report.rejected_nonfinite == [2, 4]
        assert all(bool(torch.isfinite(v.float()).all()) for v in out.values())
    nd = A.TrimmedMean(trim=1)([[v.numpy() for v in sd.values()] for sd in states])
    assert all(np.isfinite(v).all() for v in nd)
    with pytest.raises(NonFiniteUpdateError) as err:
        A.FedAvg(nonfinite="raise")(states)
    assert err.value.clients == [4]            # the buffers are screened before the rule runs


# ---------------------------------------------------------------- every aggregator takes the buffer policy

def _every_aggregator(root, **kw):
    density = {"k_nearest": 3, "malicious_frac": 0.2, "kernel": 1}
    return [
        A.FedAvg(**kw), A.CoordinateMedian(**kw), A.TrimmedMean(trim=1, **kw), A.SignSGD(**kw),
        A.NormClipping(1.0, **kw), A.GeometricMedian(**kw), A.CenteredClipping(**kw), A.Krum(1, **kw),
        A.MultiKrum(1, **kw), A.MultiKrumCos(1, **kw), A.Bulyan(1, **kw), A.DnC(1, **kw),
        A.InvariantAggregator(0.2, **kw), A.RobustLR(2, **kw), A.SparseFed(k=3, **kw), A.SignGuard(**kw),
        A.CosDen(**density, **kw), A.EuDen(**density, **kw), A.MgDen(**density, **kw),
        A.FLTrust(root, **kw), A.FLTrustAmp(root, kernel=1, **kw), A.Meamed(1, **kw), A.MDA(1, **kw),
        A.MoNNA(1, **kw), A.CAF(1, **kw), A.SMEA(1, **kw), A.Pipeline(A.NNM(1), A.TrimmedMean(trim=1), **kw),
    ]


@pytest.mark.parametrize("policy", ["kept_median", "kept_mean", "rule"])
def test_every_aggregator_takes_the_buffer_policy(policy):
    base, states = _states(8)
    update = fl.deltas(states, base)
    aggs = _every_aggregator(update[0], buffers=policy)
    exported = {getattr(A, name) for name in A.__all__}
    rules = {c for c in exported if isinstance(c, type) and issubclass(c, A.Aggregator) and c is not A.Aggregator}
    assert {type(a) for a in aggs} == rules
    for agg in aggs:
        assert agg.buffers == policy
        out = agg(update)
        assert list(out) == list(base), agg
        assert out["1.num_batches_tracked"].dtype == torch.int64
        assert int(out["1.num_batches_tracked"]) - COUNTER in range(8), agg
        new = fl.apply_update(base, out)
        assert bool((new["1.running_var"] >= 0).all()), agg


# ---------------------------------------------------------------- attacks on structures

@pytest.mark.parametrize("kind", list(_structures()))
def test_attack_apply_replaces_only_the_byzantine_clients(kind):
    clients = _structures()[kind]
    out = attacks.apply(clients, [3, 1], attacks.lie, z=1.5)
    assert type(out) is (type(clients) if _is_matrix(clients) else list)
    for i in (0, 2):
        assert _equal(out[i], clients[i])                  # honest clients bitwise unchanged
    G, H = _matrix(clients), _matrix(out)
    assert torch.equal(H[[3, 1]], attacks.lie(G[[0, 2]], 2, z=1.5))


def test_attack_apply_keeps_the_byzantine_clients_counters():
    _, states = _states(5)
    out = attacks.apply(states, [4], attacks.sign_flip)
    assert torch.equal(out[4]["1.num_batches_tracked"], states[4]["1.num_batches_tracked"])
    honest_mean = torch.stack([sd["1.running_mean"] for sd in states[:4]]).mean(0)
    torch.testing.assert_close(out[4]["1.running_mean"], -honest_mean)


@pytest.mark.parametrize("byzantine, error, match", [
    ([5], ValueError, r"byzantine holds 5; client indices must be ints in \[0, 3\] for n=4"),
    ([-1], ValueError, r"byzantine holds -1"),
    ([True], ValueError, r"byzantine holds True"),
    ([1, 1], ValueError, r"lists clients \[1\] more than once"),
    ([0, 1, 2, 3], ValueError, r"all n=4 clients; the attack needs at least 1 honest client"),
    (2, TypeError, r"byzantine must be a sequence of client indices, got 2"),
])
def test_attack_apply_checks_byzantine(byzantine, error, match):
    with pytest.raises(error, match=match):
        attacks.apply(_structures()["Flower NDArrays"], byzantine, attacks.lie)


def test_attack_apply_checks_the_attack_output():
    with pytest.raises(ValueError, match=r"returned \(1, 3\); an attack must return \(2, 3\) rows"):
        attacks.apply(torch.zeros(4, 3), [0, 1], lambda G, k: torch.zeros(1, 3))
