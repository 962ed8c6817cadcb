"""Robust aggregation inside Flower: a server strategy that runs any robustagg aggregator.

``RobustStrategy(aggregator, **fedavg_kwargs)`` is a Flower ``FedAvg`` (message API,
``flwr.serverapp.strategy``) whose training aggregation is replaced. Each round it

1. keeps the global arrays it sent to the clients in ``configure_train``;
2. turns every reply's arrays into a delta (client - global, ``robustagg.fl.deltas``);
3. runs the aggregator on the deltas, with the replies' sample counts as weights only when the
   rule uses weights (``aggregator.uses_weights``);
4. returns global + aggregate (``robustagg.fl.apply_update``) and a MetricRecord that says which
   Flower nodes were selected and rejected, with the rule's ``last_report`` diagnostics.

Every reply is attacker-controlled, so none of them can stop a round:

* a reply carrying an error is skipped, as FedAvg does;
* a reply whose arrays do not match the global ones (keys, shapes, integer versus floating
  entries), or whose sample count is not a finite number > 0, is left out and listed under
  ``malformed-node-ids``;
* a reply holding NaN or Inf is dropped by the aggregator and listed under ``nonfinite-node-ids``;
* if the rule cannot run on what is left (for example Krum with too few clients), the round is
  skipped with a warning: the global model stays as it was.

``LegacyRobustStrategy`` does the same for the older ``flwr.server.strategy`` API
(``aggregate_fit``), where the installed Flower still ships it. docs/flower.md is the guide.
"""
from __future__ import annotations

import json
import math
from collections import OrderedDict
from dataclasses import dataclass, fields
from logging import WARNING

import numpy as np
import torch

try:
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
    from flwr.common.logger import log
    from flwr.serverapp.strategy import FedAvg
except ImportError as err:  # flwr is an optional dependency
    raise ImportError("robustagg.flower needs Flower (the flwr package); install it with "
                      "`pip install robustagg[flower]`") from err

from . import fl

# Report fields that hold client row numbers; they come out as Flower node ids. Other list
# fields hold plain numbers (e.g. SignGuard's cluster sizes) and pass through unchanged.
CLIENT_INDEX_FIELDS = ("selected", "rejected_nonfinite", "clipped", "norm_passed", "cluster_passed")


def check_aggregator(aggregator):
    """The aggregator a strategy runs: callable, with a ``last_report``, dropping NaN/Inf clients."""
    if not callable(aggregator) or not hasattr(aggregator, "last_report"):
        raise TypeError(f"aggregator must be a robustagg aggregator (callable, with last_report), "
                        f"got {type(aggregator).__name__}")
    policy = getattr(aggregator, "nonfinite", "drop")
    if policy != "drop":
        raise ValueError(f"aggregator.nonfinite={policy!r}: a Flower strategy needs nonfinite='drop', so that a "
                         "client sending NaN or Inf is rejected instead of stopping or poisoning the round")
    return aggregator


@dataclass
class RoundOutcome:
    """What one robust round produced: the new global state (None when the round was skipped),
    the metrics (numbers and lists of numbers) and the positions of the replies the rule kept."""
    state: OrderedDict | None
    metrics: dict
    kept: list[int]


def sample_count(value) -> float | None:
    """A reply's sample count if it is a finite number > 0, else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) and value > 0 else None


def robust_round(aggregator, global_state: OrderedDict, states: list, counts: list, node_ids: list[int]) -> RoundOutcome:
    """Aggregate one round of client states (name -> ndarray; None for an unreadable reply).

    ``counts`` are the clients' sample counts, ``node_ids`` their Flower node ids. The outcome's
    ``kept`` indexes into these lists.
    """
    deltas, weights, rows = [], [], []   # rows: reply position of each aggregated delta
    malformed = []
    for i, (state, count) in enumerate(zip(states, counts)):
        weight = sample_count(count)
        delta = None
        if state is not None and weight is not None:
            try:
                delta = fl.deltas([state], global_state)[0]
            except ValueError:   # keys, shapes or integer/floating kinds differ from the global arrays
                delta = None
        if delta is None:
            malformed.append(i)
            continue
        deltas.append(delta)
        weights.append(weight)
        rows.append(i)
    metrics = {"num-replies": len(states), "malformed-node-ids": [node_ids[i] for i in malformed]}
    if not deltas:
        log(WARNING, "robust aggregation: no well-formed reply among %d; the round is skipped", len(states))
        return RoundOutcome(None, metrics, [])
    try:
        update = aggregator(deltas, weights if aggregator.uses_weights else None)
    except ValueError as err:   # e.g. too few finite clients left for the rule's parameters
        log(WARNING, "robust aggregation skipped this round: %s", err)
        metrics["skipped"] = 1
        return RoundOutcome(None, metrics, [])
    report = aggregator.last_report
    nonfinite = list(report.rejected_nonfinite)
    selected = report.selected if report.selected is not None else [
        j for j in range(len(rows)) if j not in nonfinite]
    kept = [rows[j] for j in selected]
    metrics.update({
        "node-ids": [node_ids[i] for i in rows],
        "selected-node-ids": [node_ids[i] for i in kept],
        "rejected-node-ids": [node_ids[i] for i in range(len(states)) if i not in kept],
        "nonfinite-node-ids": [node_ids[rows[j]] for j in nonfinite],
    })
    metrics.update(report_metrics(report, [node_ids[i] for i in rows]))
    return RoundOutcome(fl.apply_update(global_state, update), metrics, kept)


def report_metrics(report, node_ids: list[int]) -> dict:
    """``last_report``'s diagnostics as ``report.<field>`` metrics: numbers, lists of numbers, client
    row numbers as node ids, and per-client dicts as lists aligned with ``node_ids`` (NaN where a
    client has no value). Non-numeric fields are left out."""
    out = {}
    for f in fields(report):
        if f.name in ("selected", "rejected_nonfinite"):   # already reported as node ids
            continue
        value = getattr(report, f.name)
        if f.name in CLIENT_INDEX_FIELDS and value is not None:
            value = [node_ids[j] for j in value]
        out.update(metric_values(f"report.{f.name}", value, node_ids))
    return out


def metric_values(key: str, value, node_ids: list[int]) -> dict:
    """``value`` as MetricRecord entries under ``key`` (several entries for a list of dicts)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().tolist()
    if isinstance(value, (bool, np.bool_)):
        return {key: int(value)}
    if isinstance(value, (int, float, np.integer, np.floating)):
        return {key: value.item() if hasattr(value, "item") else value}
    if isinstance(value, dict):
        if not all(isinstance(v, (int, float, np.integer, np.floating)) for v in value.values()):
            return {}
        return {key: [float(value.get(j, math.nan)) for j in range(len(node_ids))]}
    if isinstance(value, (list, tuple)):
        if value and all(isinstance(v, dict) for v in value):
            out = {}
            for t, item in enumerate(value):
                out.update(metric_values(f"{key}.{t}", item, node_ids))
            return out
        if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value):
            return {key: [int(v) for v in value]}
        if all(isinstance(v, (int, float, np.integer, np.floating)) for v in value):
            return {key: [float(v) for v in value]}
    return {}


def record_to_state(record: ArrayRecord) -> OrderedDict:
    """An ArrayRecord as name -> ndarray, in its own key order."""
    return OrderedDict((key, array.numpy()) for key, array in record.items())


def state_to_record(state: OrderedDict) -> ArrayRecord:
    return ArrayRecord(OrderedDict((key, Array(np.asarray(value))) for key, value in state.items()))


class RobustStrategy(FedAvg):
    """Flower's FedAvg with a robust rule in place of the weighted mean (see the module docstring).

    ``aggregator`` is a robustagg aggregator with ``nonfinite="drop"`` (the default); every other
    keyword goes to ``flwr.serverapp.strategy.FedAvg``. ``weighted_by_key`` names the reply metric
    that holds the sample count. The training metrics of a round are Flower's aggregate of the
    kept clients' own metrics plus:

    * ``node-ids`` (the aggregated replies, in row order), ``selected-node-ids``,
      ``rejected-node-ids`` (every reply not selected), ``nonfinite-node-ids``,
      ``malformed-node-ids``, ``failed-node-ids`` (replies carrying an error), ``num-replies``;
    * ``report.<field>`` for the rule's diagnostics, and ``skipped`` = 1 when the rule could not run.
    """

    def __init__(self, aggregator, **fedavg_kwargs):
        super().__init__(**fedavg_kwargs)
        self.aggregator = check_aggregator(aggregator)
        self.sent: tuple[int, OrderedDict] | None = None   # (round, global state sent for training)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid):
        """Sample the nodes as FedAvg does, and keep the global arrays of this round."""
        self.sent = (server_round, record_to_state(arrays))
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The new global ArrayRecord (None when the round is skipped) and the round's metrics."""
        if self.sent is None or self.sent[0] != server_round:
            raise RuntimeError(f"aggregate_train(server_round={server_round}) needs configure_train of the same "
                               f"round first; it keeps the global arrays the deltas are taken against")
        valid, failed = self._check_and_log_replies(replies, is_train=True, validate=False)
        if not valid:
            return None, None
        contents = [msg.content for msg in valid]
        outcome = robust_round(self.aggregator, self.sent[1], [self.reply_state(c) for c in contents],
                               [self.reply_count(c) for c in contents], [msg.metadata.src_node_id for msg in valid])
        outcome.metrics["failed-node-ids"] = [msg.metadata.src_node_id for msg in failed]
        metrics = self.client_metrics([contents[i] for i in outcome.kept])
        metrics.update(outcome.metrics)
        arrays = None if outcome.state is None else state_to_record(outcome.state)
        return arrays, MetricRecord(metrics)

    def reply_state(self, content) -> OrderedDict | None:
        """The reply's only ArrayRecord as name -> ndarray, or None if it has not exactly one."""
        records = list(content.array_records.values())
        if len(records) != 1:
            return None
        try:
            return record_to_state(records[0])
        except (TypeError, ValueError):   # an Array that is not a NumPy serialization
            return None

    def reply_count(self, content):
        records = list(content.metric_records.values())
        return records[0].get(self.weighted_by_key) if len(records) == 1 else None

    def client_metrics(self, contents) -> dict:
        """Flower's aggregate of the kept clients' own metrics; empty if they do not fit together."""
        if not contents:
            return {}
        try:
            return dict(self.train_metrics_aggr_fn(contents, self.weighted_by_key))
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as err:
            log(WARNING, "robust aggregation: the kept clients' metrics could not be aggregated: %r", err)
            return {}


try:
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server.strategy import FedAvg as LegacyFedAvg
except ImportError:   # a Flower without the legacy strategy API
    LegacyFedAvg = None

if LegacyFedAvg is not None:
    class LegacyRobustStrategy(LegacyFedAvg):
        """``RobustStrategy`` for the legacy ``flwr.server.strategy`` API (``aggregate_fit``).

        The parameters are Flower's NDArrays; positions ``"0"``, ``"1"``, ... name them in the
        metrics. Legacy metrics hold scalars only, so every list metric is a JSON string.
        """

        def __init__(self, aggregator, **fedavg_kwargs):
            super().__init__(**fedavg_kwargs)
            self.aggregator = check_aggregator(aggregator)
            self.sent: tuple[int, OrderedDict] | None = None

        def configure_fit(self, server_round, parameters, client_manager):
            """Sample the clients as FedAvg does, and keep the global parameters of this round."""
            self.sent = (server_round, ndarrays_to_state(parameters_to_ndarrays(parameters)))
            return super().configure_fit(server_round, parameters, client_manager)

        def aggregate_fit(self, server_round, results, failures):
            """The new global Parameters (None when the round is skipped) and the round's metrics."""
            if self.sent is None or self.sent[0] != server_round:
                raise RuntimeError(f"aggregate_fit(server_round={server_round}) needs configure_fit of the same "
                                   "round first; it keeps the global parameters the deltas are taken against")
            if not results or (failures and not self.accept_failures):
                return None, {}
            states = []
            for _, res in results:
                try:
                    states.append(ndarrays_to_state(parameters_to_ndarrays(res.parameters)))
                except (TypeError, ValueError):
                    states.append(None)
            outcome = robust_round(self.aggregator, self.sent[1], states, [res.num_examples for _, res in results],
                                   [proxy.node_id for proxy, _ in results])
            metrics = {}
            if self.fit_metrics_aggregation_fn and outcome.kept:
                metrics = dict(self.fit_metrics_aggregation_fn(
                    [(results[i][1].num_examples, results[i][1].metrics) for i in outcome.kept]))
            metrics.update({k: json.dumps(v) if isinstance(v, list) else v for k, v in outcome.metrics.items()})
            if outcome.state is None:
                return None, metrics
            return ndarrays_to_parameters(list(outcome.state.values())), metrics

    def ndarrays_to_state(arrays) -> OrderedDict:
        return OrderedDict((str(i), a) for i, a in enumerate(arrays))
