"""Flattening client updates to the (n, d) matrix G and back, and the per-parameter layout table.

``flatten(updates)`` accepts
  * a stacked tensor (n, d),
  * a list of 1-D tensors,
  * a list of parameter lists (each a list of tensors, one per parameter),
  * a list of state_dicts (name -> tensor),
and returns ``(G, layout)``; ``layout.unflatten(vec)`` rebuilds the same structure from a [d]
aggregate (or a list of them from an (n, d) matrix).

A ``Layout`` is also the segment table of ``maxpool_amplify`` (SPEC §4.7):
``Layout.from_shapes(shapes)`` is the paper's per-parameter form, ``Layout.flat(width, skip_tail)``
the authors' code form.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import torch


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
    """SPEC §4.7: (a, b) as is, (out, in, kh, kw, ...) as (out, prod(rest)), <= 1-D passes through."""
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2:
        return 1, math.prod(shape), False
    return shape[0], math.prod(shape[1:]), True


def _check_kernel_shapes(shapes):
    for i, s in enumerate(shapes):
        if any(int(x) < 0 for x in s):
            raise ValueError(f"shapes[{i}]={tuple(s)} has a negative size; sizes must be >= 0")


class Layout:
    """Structure of one client's update: names, shapes and dtypes of its parameters."""

    def __init__(self, shapes: Sequence, names: Sequence[str] | None = None,
                 dtypes: Sequence[torch.dtype] | None = None, kind: str = "params", devices=None):
        self.shapes = [torch.Size(s) for s in shapes]
        _check_kernel_shapes(self.shapes)
        self.names = list(names) if names is not None else None
        self.dtypes = list(dtypes) if dtypes is not None else None
        self.devices = list(devices) if devices is not None else None
        self.kind = kind
        self._flat = None  # (width, skip_tail) for Layout.flat
        segments, offset = [], 0
        for i, shape in enumerate(self.shapes):
            rows, cols, pooled = _matrix_view(shape)
            numel = shape.numel()
            name = self.names[i] if self.names else None
            segments.append(Segment(name, offset, numel, rows, cols, pooled))
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

    def segment_table(self, d: int, kernel: int, restore: bool) -> torch.Tensor:
        """int64[S, 5] rows (in_offset, rows, cols, pooled, out_offset) for the kernels."""
        rows, out = [], 0
        for s in self.segments_for(d):
            # an empty parameter (shape (0, n)) is (0, 0): the kernels reject dimensions beyond d
            shape = (s.rows, s.cols) if s.numel else (0, 0)
            rows.append((s.offset, *shape, int(s.pooled), s.offset if restore else out))
            out += (s.rows // kernel) * (s.cols // kernel) if s.pooled else s.numel
        return torch.tensor(rows, dtype=torch.int64).reshape(-1, 5)

    # ------------------------------------------------------------ unflatten
    def unflatten(self, vec: torch.Tensor):
        """Rebuild the structure ``flatten`` was given from a [d] vector, or a list of them from [n, d]."""
        if self._flat is not None or self.kind == "shapes":
            raise TypeError(f"a layout of kind {self.kind!r} describes pooling only; unflatten needs a layout from flatten()")
        if vec.dim() == 2:
            return [self.unflatten(row) for row in vec]
        if vec.dim() != 1 or vec.shape[0] != self.d:
            raise ValueError(f"vec has shape {tuple(vec.shape)}; unflatten expects ({self.d},) or (n, {self.d})")
        if self.kind in ("tensor", "vectors"):
            return vec
        parts = []
        for i, seg in enumerate(self.segments):
            p = vec[seg.offset:seg.offset + seg.numel].reshape(self.shapes[i])
            dtype = self.dtypes[i]
            if not dtype.is_floating_point and not dtype.is_complex:
                p = p.round()
            p = p.to(dtype=dtype, device=self.devices[i])
            parts.append(p)
        if self.kind == "state_dict":
            return OrderedDict(zip(self.names, parts))
        return parts

    def __repr__(self):
        if self._flat is not None:
            return f"Layout.flat(width={self._flat[0]}, skip_tail={self._flat[1]})"
        return f"Layout(kind={self.kind!r}, segments={len(self.segments)}, d={self.d})"


def _common_dtype(tensors: Iterable[torch.Tensor]) -> torch.dtype:
    floats = [t.dtype for t in tensors if t.dtype.is_floating_point]
    if not floats:
        return torch.float32
    out = floats[0]
    for dt in floats[1:]:
        out = torch.promote_types(out, dt)
    return out


def _describe(i, what):
    return f"client {i}'s update {what}"


def flatten(updates, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, Layout]:
    """Stack client updates into G (n, d) and return the layout that undoes it.

    ``dtype`` defaults to the promoted floating dtype of the parameters (float32 if none is
    floating); integer buffers such as BatchNorm's ``num_batches_tracked`` are converted to it
    and rounded back by ``unflatten``.
    """
    if isinstance(updates, torch.Tensor):
        if updates.dim() != 2:
            raise ValueError(f"updates is a tensor of shape {tuple(updates.shape)}; a stacked update must be 2-D (n, d)")
        G = updates if dtype is None else updates.to(dtype)
        return G, Layout([(updates.shape[1],)], dtypes=[updates.dtype], kind="tensor", devices=[updates.device])
    if not isinstance(updates, (list, tuple)) or len(updates) == 0:
        raise ValueError(f"updates must be a 2-D tensor or a non-empty list of client updates, got {type(updates).__name__}"
                         + (" of length 0" if isinstance(updates, (list, tuple)) else ""))
    first = updates[0]
    if isinstance(first, torch.Tensor):
        for i, u in enumerate(updates):
            if not isinstance(u, torch.Tensor) or u.dim() != 1:
                raise ValueError(_describe(i, f"is {_what(u)}; a list of updates of tensors must hold 1-D tensors"))
            if u.shape != first.shape:
                raise ValueError(_describe(i, f"has length {u.shape[0]} but client 0's has {first.shape[0]}"))
        G = torch.stack(list(updates))
        if dtype is not None:
            G = G.to(dtype)
        return G, Layout([first.shape], dtypes=[first.dtype], kind="vectors", devices=[first.device])
    if isinstance(first, Mapping):
        names = list(first.keys())
        rows = []
        for i, sd in enumerate(updates):
            if not isinstance(sd, Mapping):
                raise ValueError(_describe(i, f"is {_what(sd)} but client 0's is a state_dict"))
            keys = list(sd.keys())
            if keys != names:
                missing = next((k for k in names if k not in sd), None)
                extra = next((k for k in keys if k not in first), None)
                if missing is not None:
                    raise ValueError(_describe(i, f"lacks key {missing!r} that client 0's state_dict has"))
                if extra is not None:
                    raise ValueError(_describe(i, f"has key {extra!r} that client 0's state_dict lacks"))
                raise ValueError(_describe(i, "lists its keys in a different order from client 0's"))
            for k in names:
                if sd[k].shape != first[k].shape:
                    raise ValueError(_describe(i, f"has {k!r} of shape {tuple(sd[k].shape)} but client 0's is {tuple(first[k].shape)}"))
            rows.append([sd[k] for k in names])
        tensors = rows[0]
        layout = Layout([t.shape for t in tensors], names=names, dtypes=[t.dtype for t in tensors],
                        kind="state_dict", devices=[t.device for t in tensors])
        return _stack_rows(rows, layout, dtype), layout
    if isinstance(first, (list, tuple)):
        for i, params in enumerate(updates):
            if not isinstance(params, (list, tuple)):
                raise ValueError(_describe(i, f"is {_what(params)} but client 0's is a parameter list"))
            if len(params) != len(first):
                raise ValueError(_describe(i, f"has {len(params)} parameters but client 0's has {len(first)}"))
            for j, (p, q) in enumerate(zip(params, first)):
                if p.shape != q.shape:
                    raise ValueError(_describe(i, f"has parameter {j} of shape {tuple(p.shape)} but client 0's is {tuple(q.shape)}"))
        layout = Layout([t.shape for t in first], dtypes=[t.dtype for t in first], kind="params",
                        devices=[t.device for t in first])
        return _stack_rows([list(p) for p in updates], layout, dtype), layout
    raise TypeError(f"updates[0] is {_what(first)}; expected a 1-D tensor, a parameter list or a state_dict")


def _what(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dim()}-D tensor of shape {tuple(x.shape)}"
    return f"a {type(x).__name__}"


def _stack_rows(rows, layout: Layout, dtype) -> torch.Tensor:
    dtype = dtype or _common_dtype(rows[0])
    device = rows[0][0].device if rows[0] else torch.device("cpu")
    G = torch.empty(len(rows), layout.d, dtype=dtype, device=device)
    for i, tensors in enumerate(rows):
        for seg, t in zip(layout.segments, tensors):
            G[i, seg.offset:seg.offset + seg.numel] = t.reshape(-1).to(dtype)
    return G
