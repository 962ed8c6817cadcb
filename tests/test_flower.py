"""robustagg.flower with the real flwr: replies built as Flower's own strategy tests build them
(Message objects with RecordDict content), and one run through Flower's simulation engine."""
import dataclasses
import functools
import importlib
import os
import sys
from collections import OrderedDict
from unittest.mock import Mock

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402

from robustagg import aggregators as A, fl  # noqa: E402
from robustagg.flower import CLIENT_INDEX_FIELDS, RobustStrategy  # noqa: E402

NODE_IDS = [7001 + 13 * i for i in range(9)]   # Flower node ids are arbitrary integers


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """The process identity Flower's runtime sets before app code runs; Messages read it."""
    from flwr.supercore.task_identity import TaskIdentity
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def global_state():
    """A small model state with a BatchNorm-like buffer set, as a PyTorch state_dict names it."""
    rng = np.random.default_rng(0)
    return OrderedDict([
        ("conv.weight", rng.standard_normal((4, 3)).astype(np.float32)),
        ("conv.bias", rng.standard_normal(3).astype(np.float32)),
        ("bn.running_mean", rng.standard_normal(3).astype(np.float32)),
        ("bn.running_var", rng.uniform(0.5, 1.5, 3).astype(np.float32)),
        ("bn.num_batches_tracked", np.array(16_777_217, dtype=np.int64)),
    ])


def client_states(n, seed=1):
    """Clients near the global state; their counters advanced by a few batches each."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        state = OrderedDict()
        for key, value in global_state().items():
            if value.dtype.kind == "i":
                state[key] = value + np.int64(3 + i % 2)
            else:
                state[key] = (value + 0.1 * rng.standard_normal(value.shape)).astype(value.dtype)
        out.append(state)
    return out


def record(state):
    return ArrayRecord(OrderedDict((k, Array(np.array(v))) for k, v in state.items()))


def instruction(node_id):
    return Message(RecordDict({}), dst_node_id=node_id, message_type=MessageType.TRAIN)


def reply(node_id, state, num_examples):
    content = RecordDict({"arrays": record(state), "metrics": MetricRecord({"num-examples": num_examples})})
    return Message(content, reply_to=instruction(node_id))


def error_reply(node_id):
    return Message(Error(code=1, reason="client crashed"), reply_to=instruction(node_id))


def configured(strategy, server_round=1):
    """A strategy that has sent the global state for ``server_round`` to NODE_IDS."""
    grid = Mock(spec=Grid)
    grid.get_node_ids.return_value = list(NODE_IDS)
    messages = list(strategy.configure_train(server_round, record(global_state()), ConfigRecord(), grid))
    assert sorted(m.metadata.dst_node_id for m in messages) == sorted(NODE_IDS)
    return strategy


def strategy_for(aggregator):
    return configured(RobustStrategy(aggregator, min_available_nodes=len(NODE_IDS), min_train_nodes=len(NODE_IDS)))


def direct(aggregator, states, counts):
    """The same round done by hand: deltas, the rule, apply_update."""
    weights = counts if aggregator.uses_weights else None
    return fl.apply_update(global_state(), aggregator(fl.deltas(states, global_state()), weights))


def assert_same_state(arrays, expected):
    got = OrderedDict((k, a.numpy()) for k, a in arrays.items())
    assert list(got) == list(expected)
    for key in expected:
        assert got[key].dtype == expected[key].dtype, key
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


RULES = {
    "trimmed_mean": lambda: A.TrimmedMean(trim=2),
    "median": lambda: A.CoordinateMedian(),
    "krum": lambda: A.Krum(f=2),
    "multikrum": lambda: A.MultiKrum(f=2, m=4),
    "bulyan": lambda: A.Bulyan(f=1),
    "fedavg": lambda: A.FedAvg(),
    "signguard": lambda: A.SignGuard(),
}


@pytest.mark.parametrize("rule", sorted(RULES))
def test_round_matches_the_aggregator_called_directly(rule):
    states = client_states(len(NODE_IDS))
    states[3] = OrderedDict((k, v * 40 if v.dtype.kind == "f" else v) for k, v in states[3].items())  # an outlier
    counts = [10 + 5 * i for i in range(len(NODE_IDS))]
    strategy = strategy_for(RULES[rule]())
    arrays, metrics = strategy.aggregate_train(1, [reply(n, s, c) for n, s, c in zip(NODE_IDS, states, counts)])

    reference = RULES[rule]()
    assert_same_state(arrays, direct(reference, states, counts))
    selected = reference.last_report.selected
    if selected is None:
        selected = list(range(len(NODE_IDS)))
    assert metrics["node-ids"] == NODE_IDS
    assert metrics["selected-node-ids"] == [NODE_IDS[j] for j in selected]
    assert sorted(metrics["rejected-node-ids"]) == sorted(set(NODE_IDS) - set(metrics["selected-node-ids"]))
    assert metrics["nonfinite-node-ids"] == [] and metrics["malformed-node-ids"] == []
    assert metrics["num-replies"] == len(NODE_IDS)
    if rule in ("krum", "multikrum"):
        assert NODE_IDS[3] in metrics["rejected-node-ids"]
        scores = reference.last_report.scores
        assert metrics["report.scores"] == pytest.approx([scores[j] for j in range(len(NODE_IDS))])
    if rule == "trimmed_mean":
        assert metrics["report.trim"] == 2


def test_integer_buffer_stays_exact_through_the_strategy():
    states = client_states(len(NODE_IDS))
    arrays, _ = strategy_for(A.TrimmedMean(trim=1)).aggregate_train(
        1, [reply(n, s, 10) for n, s in zip(NODE_IDS, states)])
    counter = arrays["bn.num_batches_tracked"].numpy()
    assert counter.dtype == np.int64
    assert int(counter) in (16_777_217 + 3, 16_777_217 + 4)   # an exact client value, not rounded to float32


class Recording:
    """Wraps an aggregator and keeps the weights each call received."""

    def __init__(self, inner):
        self.inner, self.seen = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, updates, weights=None):
        self.seen.append(weights)
        return self.inner(updates, weights)


@pytest.mark.parametrize("rule", ["fedavg", "median", "krum"])
def test_sample_counts_go_only_to_rules_that_use_weights(rule):
    recording = Recording(RULES[rule]())
    counts = [1, 2, 3, 4, 5, 60, 7, 8, 9]
    states = client_states(len(NODE_IDS))
    arrays, _ = strategy_for(recording).aggregate_train(1, [reply(n, s, c) for n, s, c in zip(NODE_IDS, states, counts)])
    if recording.uses_weights:
        assert recording.seen == [[float(c) for c in counts]]
        unweighted = fl.apply_update(global_state(), RULES[rule]()(fl.deltas(states, global_state())))
        assert not np.allclose(arrays["conv.weight"].numpy(), unweighted["conv.weight"])
    else:
        assert recording.seen == [None]


@pytest.mark.parametrize("where", ["conv.weight", "bn.running_var"])
@pytest.mark.parametrize("rule", ["trimmed_mean", "krum", "fedavg"])
def test_nan_client_is_rejected_and_reported(rule, where):
    states = client_states(len(NODE_IDS))
    states[5][where] = np.full_like(states[5][where], np.nan)
    counts = [10] * len(NODE_IDS)
    strategy = strategy_for(RULES[rule]())
    arrays, metrics = strategy.aggregate_train(1, [reply(n, s, c) for n, s, c in zip(NODE_IDS, states, counts)])
    assert metrics["nonfinite-node-ids"] == [NODE_IDS[5]]
    assert NODE_IDS[5] in metrics["rejected-node-ids"] and NODE_IDS[5] not in metrics["selected-node-ids"]
    assert all(np.isfinite(a.numpy()).all() for a in arrays.values())
    assert_same_state(arrays, direct(RULES[rule](), states, counts))


def test_error_replies_are_skipped_and_listed():
    states = client_states(len(NODE_IDS))
    replies = [reply(n, s, 10) for n, s in zip(NODE_IDS, states)]
    failing = [990001, 990002]
    arrays, metrics = strategy_for(A.TrimmedMean(trim=1)).aggregate_train(
        1, replies[:4] + [error_reply(failing[0])] + replies[4:] + [error_reply(failing[1])])
    assert metrics["failed-node-ids"] == failing
    assert metrics["node-ids"] == NODE_IDS
    assert_same_state(arrays, direct(A.TrimmedMean(trim=1), states, [10] * len(NODE_IDS)))


def test_malformed_replies_are_left_out_and_listed():
    states = client_states(len(NODE_IDS))
    counts = [10] * len(NODE_IDS)
    states[1]["conv.weight"] = np.zeros((3, 4), np.float32)                       # wrong shape
    del states[2]["conv.bias"]                                                    # a missing array
    states[4]["bn.num_batches_tracked"] = np.array(1.5)                           # floating where the global is an integer
    counts[6] = float("nan")                                                      # no usable sample count
    arrays, metrics = strategy_for(A.CoordinateMedian()).aggregate_train(
        1, [reply(n, s, c) for n, s, c in zip(NODE_IDS, states, counts)])
    bad = [1, 2, 4, 6]
    good = [i for i in range(len(NODE_IDS)) if i not in bad]
    assert metrics["malformed-node-ids"] == [NODE_IDS[i] for i in bad]
    assert metrics["selected-node-ids"] == [NODE_IDS[i] for i in good]
    assert_same_state(arrays, direct(A.CoordinateMedian(), [states[i] for i in good], [10] * len(good)))


def test_round_is_skipped_when_the_rule_cannot_run():
    states = client_states(len(NODE_IDS))
    for s in states[:3]:
        s["conv.bias"] = np.full_like(s["conv.bias"], np.inf)
    # Krum(f=2) needs 2f+3 = 7 finite clients; 6 are left
    arrays, metrics = strategy_for(A.Krum(f=2)).aggregate_train(1, [reply(n, s, 10) for n, s in zip(NODE_IDS, states)])
    assert arrays is None
    assert metrics["skipped"] == 1


def test_strategy_requires_the_drop_policy_and_configure_train():
    with pytest.raises(ValueError, match="nonfinite='drop'"):
        RobustStrategy(A.TrimmedMean(trim=1, nonfinite="raise"))
    with pytest.raises(TypeError, match="aggregator"):
        RobustStrategy("median")
    strategy = RobustStrategy(A.CoordinateMedian())
    with pytest.raises(RuntimeError, match="configure_train"):
        strategy.aggregate_train(1, [reply(NODE_IDS[0], client_states(1)[0], 10)])
    configured(strategy, server_round=1)
    with pytest.raises(RuntimeError, match="server_round=2"):
        strategy.aggregate_train(2, [reply(NODE_IDS[0], client_states(1)[0], 10)])


def test_every_report_field_of_client_indices_becomes_node_ids():
    """A new list[int] field in a report must be classified: client indices or plain numbers."""
    reports = [cls for cls in vars(A).values() if isinstance(cls, type) and issubclass(cls, A.Report)]
    int_lists = {f.name for cls in reports for f in dataclasses.fields(cls) if str(f.type).startswith("list[int]")}
    assert int_lists - set(CLIENT_INDEX_FIELDS) == {"cluster_sizes"}


def test_legacy_strategy_matches_the_message_strategy():
    from flwr.common import Code, FitRes, Parameters, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server.compat.grid_client_proxy import GridClientProxy
    from robustagg.flower import LegacyRobustStrategy

    states = client_states(len(NODE_IDS))
    states[2]["conv.weight"][0, 0] = np.nan
    # the legacy API's arrays are unnamed ("0", "1", ... by position): the buffers are named explicitly
    strategy = LegacyRobustStrategy(A.MultiKrum(f=2, buffer_keys={"2", "3"}))
    manager = Mock()
    manager.num_available.return_value = len(NODE_IDS)
    manager.sample.return_value = []
    strategy.configure_fit(1, ndarrays_to_parameters(list(global_state().values())), manager)
    results = [(GridClientProxy(n, None, 0), FitRes(Status(Code.OK, ""), ndarrays_to_parameters(list(s.values())), 10, {}))
               for n, s in zip(NODE_IDS, states)]
    parameters, metrics = strategy.aggregate_fit(1, results, [])
    assert isinstance(parameters, Parameters)
    expected, message_metrics = strategy_for(A.MultiKrum(f=2)).aggregate_train(
        1, [reply(n, s, 10) for n, s in zip(NODE_IDS, states)])
    for got, want in zip(parameters_to_ndarrays(parameters), expected.values()):
        np.testing.assert_array_equal(got, want.numpy())
    assert metrics["nonfinite-node-ids"] == f"[{NODE_IDS[2]}]"
    assert metrics["selected-node-ids"] == str(message_metrics["selected-node-ids"])


def test_import_without_flwr_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "flwr.app", None)
    monkeypatch.delitem(sys.modules, "robustagg.flower", raising=False)
    with pytest.raises(ImportError, match=r"pip install robustagg\[flower\]"):
        importlib.import_module("robustagg.flower")


# ---------------------------------------------------------------- Flower's simulation engine
NUM_CLIENTS, ROUNDS = 10, 3
NAN_CLIENT, FLIP_CLIENT = 0, 1   # partition ids of the two Byzantine clients


@functools.lru_cache(maxsize=1)
def digits_partitions():
    from robustagg import simulation
    data = simulation.load_digits_split()
    return data, simulation.dirichlet_split(data.y_train, NUM_CLIENTS, alpha=1.0, seed=0)


def train_on_digits(msg: Message, context: Context) -> Message:
    """The ClientApp's train step: local SGD on this node's digits partition; partition 0 answers
    NaN and partition 1 a sign-flipped, scaled update."""
    from robustagg import simulation
    torch.set_num_threads(1)
    partition = int(context.node_config["partition-id"])
    data, parts = digits_partitions()
    model = simulation.make_model()
    start = msg.content["arrays"].to_torch_state_dict()
    generator = torch.Generator().manual_seed(1000 * int(msg.content["config"]["server-round"]) + partition)
    x, y = data.x_train[parts[partition]], data.y_train[parts[partition]]
    state = simulation.local_sgd(model, start, x, y, simulation.LOCAL_STEPS, simulation.BATCH_SIZE,
                                 simulation.LOCAL_LR, generator)
    if partition == NAN_CLIENT:
        state = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in state.items()}
    if partition == FLIP_CLIENT:
        state = {k: start[k] - 5 * (v - start[k]) if v.is_floating_point() else v for k, v in state.items()}
    metrics = MetricRecord({"num-examples": int(x.shape[0]), "partition-id": partition})
    return Message(RecordDict({"arrays": ArrayRecord(state), "metrics": metrics}), reply_to=msg)


def test_simulation_rejects_the_nan_client_and_learns(monkeypatch):
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation
    from robustagg import simulation

    class Observed(RobustStrategy):
        """Records which node is which partition, and each round's metrics."""
        partitions, rounds = {}, []

        def aggregate_train(self, server_round, replies):
            replies = list(replies)
            for msg in replies:
                self.partitions[msg.metadata.src_node_id] = int(msg.content["metrics"]["partition-id"])
            arrays, metrics = super().aggregate_train(server_round, replies)
            self.rounds.append(metrics)
            return arrays, metrics

    accuracy = {}
    client_app = ClientApp()
    client_app.train()(train_on_digits)
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        data, _ = digits_partitions()
        model = simulation.make_model()

        def evaluate(server_round, arrays):
            accuracy[server_round] = simulation.accuracy(model, arrays.to_torch_state_dict(), data.x_test, data.y_test)
            return MetricRecord({"accuracy": accuracy[server_round]})

        strategy = Observed(A.MultiKrum(f=2), fraction_evaluate=0.0, min_available_nodes=NUM_CLIENTS)
        strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=ROUNDS,
                       evaluate_fn=evaluate)

    # Ray's workers import this module by name to run the ClientApp
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")   # no GPUs asked for; silences Ray's notice
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=NUM_CLIENTS,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": 2, "log_to_driver": False}})

    assert len(Observed.rounds) == ROUNDS
    nan_node = next(node for node, part in Observed.partitions.items() if part == NAN_CLIENT)
    for metrics in Observed.rounds:
        assert metrics["nonfinite-node-ids"] == [nan_node]
        assert nan_node not in metrics["selected-node-ids"]
        assert len(metrics["node-ids"]) == NUM_CLIENTS
    assert sorted(accuracy) == list(range(ROUNDS + 1))
    assert accuracy[ROUNDS] > accuracy[0] + 0.3, accuracy
    assert accuracy[ROUNDS] > accuracy[1], accuracy
