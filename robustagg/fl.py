r"""The update convention of robustagg, for federated-learning code (the guide: docs/fl.md).

An update is a delta: the client's state after local training minus the global state it started
from, $\Delta_i = \theta_i - \theta$. Every aggregator takes the clients' deltas and returns the
aggregate delta, which the server adds:

    updates = fl.deltas(client_states, global_state)
    global_state = fl.apply_update(global_state, agg(updates), lr=1.0)

that is $\theta \leftarrow \theta + \mathrm{lr}\cdot\mathrm{agg}(\Delta_1, \dots, \Delta_n)$. With
``FedAvg`` and lr = 1 this is the mean of the client states.

Gradient-style code, where clients send gradients $g_i$ and the server steps
$\theta \leftarrow \theta - \eta\,\mathrm{agg}(g)$, fits by negation: $-g_i$ points where a
delta points (a delta of one local step is $-\eta g_i$), so pass the negated gradients and add
with the step size, ``apply_update(global_state, agg([-g for g in grads]), lr=eta)``. The rules
then see the deltas' directions at the gradients' scale, so norms given to a rule (clipping
thresholds, FLTrust's root update, negated likewise) are in gradient units, and a rule whose
output is a sign (SignSGD) steps by eta times its server_lr. Negating matters: max-pooling
(CosDen, EuDen, MgDen, FLTrustAmp) treats $g$ and $-g$ differently.

States and updates are any one structure: a state_dict, a parameter list (Flower's NDArrays
are lists of ndarrays), or a single tensor or ndarray; NumPy in, NumPy out. Integer entries
(``num_batches_tracked``) are counters: they subtract and add exactly in int64, and ``lr`` does
not scale them. BatchNorm buffers follow the aggregators' buffer policy (``buffers=`` on every
aggregator; ``buffer_names`` lists a module's buffers exactly).
"""
from __future__ import annotations

from typing import Collection, Sequence

import torch

from ._checks import check_float
from .layout import Entries, check_same_structure, entries, is_integer

__all__ = ["deltas", "apply_update", "buffer_names"]

VARIANCE_SUFFIX = "running_var"


def _difference(client: torch.Tensor, base: torch.Tensor, who: str) -> torch.Tensor:
    if is_integer(base.dtype) != is_integer(client.dtype):
        raise ValueError(f"{who} is {client.dtype} but the global state's is {base.dtype}; an entry must be "
                         "integer in both or floating in both")
    client = client.to(base.device)
    if is_integer(base.dtype):
        return client.to(torch.int64) - base.to(torch.int64)
    if client.dtype == base.dtype:
        return client - base      # IEEE subtraction is already the exact difference rounded once
    # another float dtype: in float64, then rounded once to the global entry's dtype
    return (client.to(torch.float64) - base.to(torch.float64)).to(base.dtype)


def deltas(client_states: Sequence, global_state) -> list:
    r"""$\theta_i - \theta$ for every client: a list of updates, each in its client state's structure.

    Floating entries come back in the global state's dtypes, whatever dtype a client sent (a
    difference too large for that dtype is Inf, and the aggregators then reject that client).
    Integer entries subtract exactly and come back as int64. A client whose keys, shapes or
    integer/floating kinds differ from the global state's raises a ValueError naming it.
    """
    base = entries(global_state, "global_state")
    if not isinstance(client_states, (list, tuple)):
        raise TypeError(f"client_states must be a list of client states, got a {type(client_states).__name__}")
    if len(client_states) == 0:
        raise ValueError("client_states must be a non-empty list of client states, got one of length 0")
    out = []
    for i, state in enumerate(client_states):
        client = entries(state, f"client_states[{i}]")
        check_same_structure(client, base, f"client {i}'s state", "the global state")
        out.append(client.rebuild([_difference(c, g, f"client {i}'s {base.name(k)}")
                                   for k, c, g in zip(base.keys, client.tensors, base.tensors)]))
    return out


def _nonnegative_keys(base: Entries, nonnegative) -> set:
    if nonnegative is None:
        return {k for k in base.keys if isinstance(k, str) and k.endswith(VARIANCE_SUFFIX)}
    if isinstance(nonnegative, (str, int)) or not isinstance(nonnegative, Collection):
        raise TypeError(f"apply_update: nonnegative must be None or a collection of keys, got {nonnegative!r}")
    unknown = [k for k in nonnegative if k not in base.keys]
    if unknown:
        raise ValueError(f"apply_update: nonnegative names {unknown}, which global_state does not hold")
    return set(nonnegative)


def _add(base: torch.Tensor, step: torch.Tensor, lr: float, who: str) -> torch.Tensor:
    step = step.to(base.device)
    if not is_integer(base.dtype):
        return (base.to(torch.float64) + lr * step.to(torch.float64)).to(base.dtype)
    if not is_integer(step.dtype):
        raise ValueError(f"update's {who} is {step.dtype} but the global entry is {base.dtype}; "
                         "an integer entry takes an integer update")
    total = base.to(torch.int64) + step.to(torch.int64)
    if base.dtype != torch.bool and base.dtype != torch.int64:
        info = torch.iinfo(base.dtype)
        if total.numel() and (int(total.min()) < info.min or int(total.max()) > info.max):
            raise ValueError(f"global {who} + update leaves {base.dtype}'s range [{info.min}, {info.max}]")
    return total.to(base.dtype)


def apply_update(global_state, update, lr: float = 1.0, *, nonnegative: Collection | None = None):
    r"""$\theta + \mathrm{lr}\cdot\Delta$, in global_state's structure and dtypes.

    Floating entries add in float64 and round once to their dtype. Integer entries add exactly
    (int64), unscaled by ``lr``: a counter advances by the count. ``nonnegative`` lists the keys
    (state_dict names, or parameter positions) clamped at >= 0 afterwards; by default every
    state_dict entry whose name ends in ``running_var``, so that no rounding or rule makes a
    variance negative.
    """
    lr = check_float("apply_update", "lr", lr)
    base = entries(global_state, "global_state")
    step = entries(update, "update")
    check_same_structure(step, base, "update", "the global state")
    clamp = _nonnegative_keys(base, nonnegative)
    out = []
    for key, g, u in zip(base.keys, base.tensors, step.tensors):
        new = _add(g, u, lr, base.name(key))
        out.append(new.clamp_min(0) if key in clamp else new)
    return base.rebuild(out)


def buffer_names(model: torch.nn.Module) -> list[str]:
    """The state_dict keys of ``model``'s buffers, in state_dict order, for an aggregator's
    ``buffer_keys=`` (shared buffers under every name; non-persistent buffers are not in a state_dict)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"buffer_names: model must be a torch.nn.Module, got {type(model).__name__}")
    buffers = {name for name, _ in model.named_buffers(remove_duplicate=False)}
    return [key for key in model.state_dict() if key in buffers]
