"""Flattening client updates to the (n, d) matrix G and back, and the per-parameter layout table.

``flatten(updates)`` accepts, as torch tensors or NumPy arrays,
  * a stacked matrix (n, d),
  * a list of 1-D vectors,
  * a list of parameter lists (each a list of arrays, one per parameter, such as Flower's NDArrays),
  * a list of state_dicts (name -> array),
and returns ``(G, layout)``; ``layout.unflatten(vec)`` rebuilds the same structure from a [d]
aggregate (or a list of them from an (n, d) matrix): NumPy in, NumPy out, every entry in its own
dtype and outside any autograd graph.

Entries named by ``hold_out`` stay out of G: ``layout.held`` keeps the clients' values of each,
stacked, and ``unflatten`` takes their aggregate in ``held=``. The aggregators hold out BatchNorm
buffers and integer entries this way (``robustagg.aggregators.base``).

A ``Layout`` is also the segment table of ``maxpool_amplify`` (docs/ops.md):
``Layout.from_shapes(shapes)`` is the paper's per-parameter form, ``Layout.flat(width, skip_tail)``
the authors' code form.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Collection, Mapping, Sequence

import numpy as np
import torch

ACCEPTED = ("an (n, d) tensor or ndarray, a list of 1-D tensors or ndarrays, a list of parameter lists "
            "(lists of tensors or ndarrays, such as Flower's NDArrays) or a list of state_dicts")


@dataclass(frozen=True)
class Segment:
    """One parameter's slice of a row of G, and how max-pooling sees it."""
    name: str | None
    offset: int
    numel: int
    rows: int      # the 2-D view used by max-pooling (rows * cols == numel when pooled)
    cols: int
    pooled: bool   # False: 0-D/1-D parameters pass through unpooled


def _matrix_view(shape) -> tuple[int, int, bool]:
    """Max-pooling's 2-D view: (a, b) as is, (out, in, kh, kw, ...) as (out, prod(rest)), <= 1-D passes through."""
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2:
        return 1, math.prod(shape), False
    return shape[0], math.prod(shape[1:]), True


def _check_kernel_shapes(shapes):
    for i, s in enumerate(shapes):
        if any(int(x) < 0 for x in s):
            raise ValueError(f"shapes[{i}]={tuple(s)} has a negative size; sizes must be >= 0")


def is_integer(dtype: torch.dtype) -> bool:
    """Integer and bool entries: counters such as ``num_batches_tracked``, never rounded through a float."""
    return not (dtype.is_floating_point or dtype.is_complex)


class Layout:
    """Structure of one client's update: names, shapes and dtypes of its entries.

    ``segments`` cover the entries in G; ``held`` maps each held-out entry's key (its state_dict
    name, or its position in a parameter list) to the clients' values, stacked (n, *shape).
    """

    def __init__(self, shapes: Sequence, names: Sequence[str] | None = None,
                 dtypes: Sequence[torch.dtype] | None = None, kind: str = "params", devices=None,
                 numpy: bool = False, held: Mapping | None = None):
        self.shapes = [torch.Size(s) for s in shapes]
        _check_kernel_shapes(self.shapes)
        self.names = list(names) if names is not None else None
        self.dtypes = list(dtypes) if dtypes is not None else None
        self.devices = list(devices) if devices is not None else None
        self.kind = kind
        self.numpy = numpy
        self.keys = self.names if self.names is not None else list(range(len(self.shapes)))
        self.held = dict(held or {})
        self._flat = None  # (width, skip_tail) for Layout.flat
        segments, offset = [], 0
        for key, shape in zip(self.keys, self.shapes):
            if key in self.held:
                continue
            rows, cols, pooled = _matrix_view(shape)
            numel = shape.numel()
            segments.append(Segment(key if self.names is not None else None, offset, numel, rows, cols, pooled))
            offset += numel
        self.segments = segments
        self.d = offset

    # ------------------------------------------------------------ constructors
    @classmethod
    def from_shapes(cls, shapes) -> "Layout":
        """The paper's per-parameter layout.

        ``shapes`` is a sequence of shapes, a mapping name -> shape or tensor (a state_dict), or an
        ``nn.Module`` (its parameters, in ``named_parameters`` order).
        """
        if isinstance(shapes, torch.nn.Module):
            named = [(k, p.shape) for k, p in shapes.named_parameters()]
            return cls([s for _, s in named], names=[k for k, _ in named], kind="shapes")
        if isinstance(shapes, Mapping):
            names = list(shapes.keys())
            return cls([getattr(v, "shape", v) for v in shapes.values()], names=names, kind="shapes")
        return cls([getattr(s, "shape", s) for s in shapes], kind="shapes")

    @classmethod
    def flat(cls, width: int, skip_tail: int = 0) -> "Layout":
        """The authors' code layout: the first d - skip_tail values as rows of ``width`` values.

        A partial last row is dropped. The layout is resolved against d when it is used.
        """
        if not isinstance(width, int) or width < 1:
            raise ValueError(f"width={width!r} must be an int >= 1")
        if not isinstance(skip_tail, int) or skip_tail < 0:
            raise ValueError(f"skip_tail={skip_tail!r} must be an int >= 0")
        layout = cls([], kind="flat")
        layout._flat = (width, skip_tail)
        layout.d = None
        return layout

    # ------------------------------------------------------------ max-pool segment table
    def segments_for(self, d: int) -> list[Segment]:
        """The segments over a row of length d; raises if the layout does not cover exactly d."""
        if self._flat is not None:
            width, skip_tail = self._flat
            if skip_tail > d:
                raise ValueError(f"Layout.flat: skip_tail={skip_tail} exceeds d={d}; allowed 0..{d}")
            rows = (d - skip_tail) // width
            return [Segment(None, 0, rows * width, rows, width, True)]
        if self.d != d:
            raise ValueError(f"layout covers {self.d} values but G has d={d} columns; the layout must sum to d")
        return self.segments

    def pooled_width(self, d: int, kernel: int) -> int:
        """Length of a pooled row: sum of (rows//k)*(cols//k) over pooled segments plus pass-through sizes."""
        return sum((s.rows // kernel) * (s.cols // kernel) if s.pooled else s.numel for s in self.segments_for(d))

    def columns(self, d: int, lo: int, hi: int, kernel: int) -> "Layout":
        """The layout of columns lo..hi-1 of a row of length d, to max-pool them on their own.

        A pooled segment keeps the rows of its 2-D view that lie in the range, an unpooled one its
        values there; pooling the pieces gives the range's part of the pooled row, in order. That
        needs every cut inside a pooled segment's windows to fall between groups of ``kernel`` rows
        (``robustagg.distributed.shard_bounds`` places them so), else a ValueError. Pieces that hold
        no whole window (the rows past a segment's last window) pool to nothing and are left out.
        """
        segments = []
        for s in self.segments_for(d):
            a, b = max(s.offset, lo), min(s.offset + s.numel, hi)
            if a >= b:
                continue
            if not s.pooled:
                segments.append(Segment(s.name, a - lo, b - a, 1, b - a, False))
                continue
            step = kernel * s.cols                                # one row of windows
            windows_end = s.offset + s.rows // kernel * step      # the rows after it pool to nothing
            for cut in (lo, hi):
                if s.offset < cut < windows_end and (cut - s.offset) % step:
                    raise ValueError(f"columns {lo}..{hi} cut the pooled segment {s.name or ''} at offset "
                                     f"{s.offset} ({s.rows} x {s.cols}) inside a window of kernel={kernel} rows, at "
                                     f"{cut}; place the cuts with shard_bounds(d, world_size, layout, kernel)")
            b = min(b, windows_end)
            if a < b and s.cols >= kernel:
                segments.append(Segment(s.name, a - lo, b - a, (b - a) // s.cols, s.cols, True))
        part = Layout([], kind="columns")
        part.segments, part.d = segments, hi - lo
        return part

    def segment_table(self, d: int, kernel: int, restore: bool) -> list[int]:
        """The kernels' segment table: for each segment the five ints in_offset, rows, cols, pooled,
        out_offset, one segment after the other. It stays a host list (the raw op's ``int[]``): the
        kernels' launch plans are made from it on the host."""
        table, out = [], 0
        for s in self.segments_for(d):
            # an empty parameter (shape (0, n)) is (0, 0): the kernels reject dimensions beyond d
            shape = (s.rows, s.cols) if s.numel else (0, 0)
            table += [s.offset, *shape, int(s.pooled), s.offset if restore else out]
            out += (s.rows // kernel) * (s.cols // kernel) if s.pooled else s.numel
        return table

    # ------------------------------------------------------------ unflatten
    def unflatten(self, vec: torch.Tensor, held: Mapping | None = None):
        """Rebuild the structure ``flatten`` was given from a [d] vector, or a list of them from [n, d].

        ``held`` gives the value of every held-out entry: for a [d] vector one value per key, for
        [n, d] one per row stacked (n, *shape), by default the clients' own ``self.held``.
        Integer entries that went through G are rounded to the nearest integer.
        """
        if self._flat is not None or self.kind in ("shapes", "columns"):
            raise TypeError(f"a layout of kind {self.kind!r} describes pooling only; unflatten needs a layout from flatten()")
        vec = vec.detach()
        if vec.dim() == 2:
            held = self.held if held is None else held
            for key, value in held.items():
                if len(value) != vec.shape[0]:
                    raise ValueError(f"held[{key!r}] has {len(value)} rows but vec has {vec.shape[0]}; "
                                     "give one per row")
            return [self.unflatten(row, {k: v[i] for k, v in held.items()}) for i, row in enumerate(vec)]
        if vec.dim() != 1 or vec.shape[0] != self.d:
            raise ValueError(f"vec has shape {tuple(vec.shape)}; unflatten expects ({self.d},) or (n, {self.d})")
        if self.kind in ("tensor", "vectors"):
            return vec.cpu().numpy() if self.numpy else vec
        missing = [k for k in self.held if held is None or k not in held]
        if missing:
            raise ValueError(f"unflatten needs held= values for the entries kept out of G: {missing}")
        segments = iter(self.segments)
        parts = []
        for key, shape, dtype, device in zip(self.keys, self.shapes, self.dtypes, self.devices):
            if key in self.held:
                p = as_tensor(held[key], f"held[{key!r}]").reshape(shape)
            else:
                seg = next(segments)
                p = vec[seg.offset:seg.offset + seg.numel].reshape(shape)
                if is_integer(dtype):
                    p = p.round()
            p = p.to(dtype=dtype, device=device)
            parts.append(p.cpu().numpy() if self.numpy else p)
        if self.kind == "state_dict":
            return OrderedDict(zip(self.names, parts))
        return parts

    def __repr__(self):
        if self._flat is not None:
            return f"Layout.flat(width={self._flat[0]}, skip_tail={self._flat[1]})"
        return f"Layout(kind={self.kind!r}, segments={len(self.segments)}, d={self.d})"


# ---------------------------------------------------------------- one update taken apart

def _what(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dim()}-D tensor of shape {tuple(x.shape)}"
    if isinstance(x, np.ndarray):
        return f"a {x.ndim}-D ndarray of shape {x.shape}"
    return f"a {type(x).__name__}"


def as_tensor(x, where: str) -> torch.Tensor:
    """``x``, a tensor or an ndarray, as a tensor outside any autograd graph (an ndarray's memory is
    shared where torch can view it); ``where`` names it in errors."""
    if isinstance(x, torch.Tensor):
        return x.detach() if x.requires_grad else x
    if isinstance(x, (np.ndarray, np.generic)):
        array = np.asarray(x)
        if not (array.flags.writeable and array.flags.c_contiguous):   # torch views only writable C-order memory
            array = array.copy()
        try:
            return torch.from_numpy(array)
        except TypeError:
            raise TypeError(f"{where} is an ndarray of dtype {array.dtype}, which torch cannot hold; "
                            "use a bool, integer or floating dtype") from None
    raise TypeError(f"{where} is {_what(x)}; the entries of an update must be tensors or ndarrays")


@dataclass
class Entries:
    """One update or model state taken apart: ``kind`` ("state_dict", "params" or "array"), the keys
    (state_dict names, or positions), the entries as tensors, and whether they came as ndarrays."""
    kind: str
    keys: list
    tensors: list[torch.Tensor]
    numpy: bool

    def rebuild(self, tensors: Sequence[torch.Tensor]):
        """The same structure holding ``tensors`` (ndarrays if this one came as ndarrays)."""
        parts = [t.cpu().numpy() if self.numpy else t for t in tensors]
        if self.kind == "state_dict":
            return OrderedDict(zip(self.keys, parts))
        if self.kind == "params":
            return parts
        return parts[0]

    def name(self, key) -> str:
        """How errors name one entry."""
        return {"state_dict": f"entry {key!r}", "params": f"parameter {key}"}.get(self.kind, "the array")


def entries(state, where: str) -> Entries:
    """Take apart one update or model state: a state_dict, a parameter list, or one tensor / ndarray."""
    if isinstance(state, (torch.Tensor, np.ndarray)):
        return Entries("array", [0], [as_tensor(state, where)], isinstance(state, np.ndarray))
    if isinstance(state, Mapping):
        kind, keys, values = "state_dict", list(state.keys()), list(state.values())
    elif isinstance(state, (list, tuple)):
        kind, keys, values = "params", list(range(len(state))), list(state)
    else:
        raise TypeError(f"{where} is {_what(state)}; expected a state_dict, a parameter list, or a tensor or ndarray")
    tensors = [as_tensor(v, f"{where}[{k!r}]") for k, v in zip(keys, values)]
    return Entries(kind, keys, tensors, bool(values) and isinstance(values[0], (np.ndarray, np.generic)))


def check_same_structure(state: Entries, like: Entries, who: str, like_who: str) -> None:
    """Raise a ValueError naming the first key or shape where ``state`` differs from ``like``."""
    if state.kind != like.kind:
        raise ValueError(f"{who} is a {_KIND_NAMES[state.kind]} but {like_who} is a {_KIND_NAMES[like.kind]}")
    if state.keys != like.keys:
        if state.kind == "params":
            raise ValueError(f"{who} has {len(state.keys)} parameters but {like_who} has {len(like.keys)}")
        missing = next((k for k in like.keys if k not in state.keys), None)
        extra = next((k for k in state.keys if k not in like.keys), None)
        if missing is not None:
            raise ValueError(f"{who} lacks key {missing!r} that {like_who} has")
        if extra is not None:
            raise ValueError(f"{who} has key {extra!r} that {like_who} lacks")
        raise ValueError(f"{who} lists its keys in a different order from {like_who}")
    for key, t, u in zip(state.keys, state.tensors, like.tensors):
        if t.shape != u.shape:
            what = f"has {key!r}" if state.kind == "state_dict" else f"has parameter {key}"
            raise ValueError(f"{who} {what} of shape {tuple(t.shape)} but {like_who}'s is {tuple(u.shape)}")


_KIND_NAMES = {"state_dict": "state_dict", "params": "parameter list", "array": "single array"}


# ---------------------------------------------------------------- flatten

def _describe(i, what):
    return f"client {i}'s update {what}"


def _check_same_dtypes(clients: Sequence[Entries]) -> None:
    """Across clients each entry must have one dtype: a client's choice must not change the others'
    arithmetic, and a silent cast would hide a misconfigured or hostile client."""
    first = clients[0]
    for j, key in enumerate(first.keys):
        dtype = first.tensors[j].dtype
        odd = [i for i, c in enumerate(clients) if c.tensors[j].dtype != dtype]
        if odd:
            sent = sorted({str(clients[i].tensors[j].dtype) for i in odd})
            raise ValueError(f"clients {odd} send {first.name(key)} as {', '.join(sent)} but client 0 sends it as "
                             f"{dtype}; every client must send the same dtypes (robustagg.fl.deltas converts "
                             "client states to the global state's dtypes)")


def _hold_out_keys(first: Entries, hold_out) -> set:
    if callable(hold_out):
        return {k for k, t in zip(first.keys, first.tensors) if hold_out(k, t)}
    keys = set(hold_out)
    unknown = [k for k in keys if k not in first.keys]
    if unknown:
        raise ValueError(f"hold_out names {sorted(map(repr, unknown))}, which client 0's update does not hold")
    return keys


def _common_dtype(tensors) -> torch.dtype:
    floats = [t.dtype for t in tensors if t.dtype.is_floating_point]
    if not floats:
        return torch.float32
    out = floats[0]
    for dt in floats[1:]:
        out = torch.promote_types(out, dt)
    return out


def flatten(updates, dtype: torch.dtype | None = None, *,
            hold_out: Collection | Callable[[object, torch.Tensor], bool] = ()) -> tuple[torch.Tensor, Layout]:
    """Stack client updates into G (n, d) and return the layout that undoes it.

    ``dtype`` defaults to the promoted floating dtype of the entries in G (float32 if none is
    floating). Integer entries in G are converted to it and rounded back by ``unflatten``; one
    holding an integer that dtype cannot hold exactly raises (hold it out instead).
    ``hold_out``: keys (state_dict names, or positions in a parameter list) kept out of G, or a
    function ``(key, tensor) -> bool`` asked about each of client 0's entries.
    Every client must send each entry in the same dtype.
    """
    if isinstance(updates, (torch.Tensor, np.ndarray)):
        return _flatten_matrix(updates, dtype, hold_out)
    if not isinstance(updates, (list, tuple)):
        raise TypeError(f"updates is {_what(updates)}; expected {ACCEPTED}")
    if len(updates) == 0:
        raise ValueError("updates must be a non-empty list of client updates, "
                         f"got a {type(updates).__name__} of length 0")
    first = updates[0]
    if isinstance(first, (torch.Tensor, np.ndarray)):
        return _flatten_vectors(updates, dtype, hold_out)
    if not isinstance(first, (Mapping, list, tuple)):
        raise TypeError(f"updates[0] is {_what(first)}; each client's update must be a 1-D tensor or ndarray, "
                        f"a parameter list or a state_dict (updates must be {ACCEPTED})")
    clients = []
    for i, u in enumerate(updates):
        if not isinstance(u, (Mapping, list, tuple)) or isinstance(u, Mapping) != isinstance(first, Mapping):
            kind = "a state_dict" if isinstance(first, Mapping) else "a parameter list"
            raise ValueError(_describe(i, f"is {_what(u)} but client 0's is {kind}"))
        clients.append(entries(u, f"updates[{i}]"))
        check_same_structure(clients[i], clients[0], f"client {i}'s update", "client 0's")
    _check_same_dtypes(clients)
    base = clients[0]
    held_keys = _hold_out_keys(base, hold_out)
    held = {k: torch.stack([c.tensors[j] for c in clients]) for j, k in enumerate(base.keys) if k in held_keys}
    layout = Layout([t.shape for t in base.tensors], names=base.keys if base.kind == "state_dict" else None,
                    dtypes=[t.dtype for t in base.tensors], kind=base.kind, devices=[t.device for t in base.tensors],
                    numpy=base.numpy, held=held)
    columns = [j for j, k in enumerate(base.keys) if k not in held_keys]
    rows = [[c.tensors[j] for j in columns] for c in clients]
    return _stack_rows(rows, layout, dtype, [base.keys[j] for j in columns], base), layout


def _no_hold_out(hold_out, what: str) -> None:
    if not callable(hold_out) and len(hold_out):
        raise ValueError(f"hold_out={hold_out!r} needs named entries, but the updates are {what}")


def _flatten_matrix(updates, dtype, hold_out):
    G = as_tensor(updates, "updates")
    if G.dim() != 2:
        raise ValueError(f"updates is {_what(updates)}; a stacked update must be 2-D (n, d)")
    _no_hold_out(hold_out, "a stacked matrix")
    layout = Layout([(G.shape[1],)], dtypes=[G.dtype], kind="tensor", devices=[G.device],
                    numpy=isinstance(updates, np.ndarray))
    return (G if dtype is None else G.to(dtype)), layout


def _flatten_vectors(updates, dtype, hold_out):
    _no_hold_out(hold_out, "a list of vectors")
    rows = []
    for i, u in enumerate(updates):
        if not isinstance(u, (torch.Tensor, np.ndarray)) or u.ndim != 1:
            raise ValueError(_describe(i, f"is {_what(u)}; a list of vectors must hold 1-D tensors or ndarrays"))
        rows.append(as_tensor(u, f"updates[{i}]"))
        if rows[i].shape != rows[0].shape:
            raise ValueError(_describe(i, f"has length {rows[i].shape[0]} but client 0's has {rows[0].shape[0]}"))
    _check_same_dtypes([Entries("array", [0], [r], False) for r in rows])
    G = torch.stack(rows)
    if dtype is not None:
        G = G.to(dtype)
    return G, Layout([rows[0].shape], dtypes=[rows[0].dtype], kind="vectors", devices=[rows[0].device],
                     numpy=isinstance(updates[0], np.ndarray))


def _check_exact(t: torch.Tensor, dtype: torch.dtype, where: str, key) -> None:
    """An integer entry in G must survive the trip through G's float dtype unchanged."""
    limit = round(2 / torch.finfo(dtype).eps)    # 2^(mantissa bits + 1): every integer up to it is exact
    wide = t.to(torch.int64)
    if wide.numel() and (int(wide.max()) > limit or int(wide.min()) < -limit):
        top = max(int(wide.max()), -int(wide.min()))
        raise ValueError(f"{where} holds the integer {top}, beyond {limit}, the largest that {dtype} holds exactly; "
                         f"keep it out of G with hold_out=[{key!r}] (the aggregators do so for every integer entry) "
                         "or pass dtype=torch.float64")


def _stack_rows(rows, layout: Layout, dtype, keys, base: Entries) -> torch.Tensor:
    dtype = dtype or _common_dtype(rows[0])
    device = rows[0][0].device if rows[0] else base.tensors[0].device if base.tensors else torch.device("cpu")
    G = torch.empty(len(rows), layout.d, dtype=dtype, device=device)
    for i, tensors in enumerate(rows):
        for key, t in zip(keys, tensors):
            if is_integer(t.dtype):
                _check_exact(t, dtype, f"client {i}'s {base.name(key)}", key)
        if tensors:
            # one copy kernel per client, not one per parameter (a ResNet has ~100-1000 of them)
            torch.cat([t.reshape(-1).to(device=device, dtype=dtype) for t in tensors], out=G[i])
    return G
