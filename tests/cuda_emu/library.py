"""ctypes front end of the emulator library (harness.cpp): the raw ops of csrc/ops.cpp on CPU
tensors, run by the real CUDA launchers, prepared the way csrc/cuda/bindings.cpp prepares them.

Outputs start as garbage bytes (0xA5, as from a caching allocator), so a value a kernel forgets to
write shows up; a bool output byte other than 0 or 1 is reported as unwritten.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import torch

DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}

# Fiber schedules (runtime.cpp): the order, plus WARP_EAGER to let each warp run ahead.
ASCENDING, DESCENDING, SHUFFLED, WARP_EAGER = 0, 1, 2, 4

_c_i64, _c_int, _c_ptr, _c_dbl, _c_bool = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_double, ctypes.c_bool

_SIGNATURES = {
    "emu_sign_sum": [_c_int, _c_ptr, _c_ptr, _c_i64, _c_i64, _c_ptr, _c_ptr],
    "emu_rlr": [_c_int, _c_ptr, _c_ptr, _c_ptr, _c_i64, _c_i64, _c_int, _c_dbl, _c_ptr, _c_ptr],
    "emu_order_mean": [_c_int, _c_ptr, _c_ptr, _c_i64, _c_i64, _c_i64, _c_i64, _c_ptr, _c_ptr],
    "emu_invariant": [_c_int, _c_ptr, _c_ptr, _c_i64, _c_i64, _c_i64, _c_i64, _c_int, _c_ptr, _c_ptr, _c_ptr],
    "emu_closest_to_median_mean": [_c_int, _c_ptr, _c_ptr, _c_i64, _c_i64, _c_i64, _c_ptr, _c_ptr],
    "emu_client_stats": [_c_int, _c_ptr, _c_i64, _c_i64, _c_i64, _c_i64, _c_ptr, _c_ptr, _c_ptr, _c_ptr, _c_ptr,
                         _c_ptr, _c_ptr],
    "emu_clip_rows": [_c_int, _c_ptr, _c_i64, _c_i64, _c_ptr, _c_ptr, _c_ptr],
    "emu_topk_ef_step": [_c_int, _c_ptr, _c_ptr, _c_ptr, _c_i64, _c_i64, _c_dbl, _c_ptr, _c_ptr, _c_ptr, _c_ptr],
    "emu_topk_abs": [_c_int, _c_ptr, _c_i64, _c_i64, _c_ptr, _c_ptr, _c_ptr],
    "emu_maxpool_amplify": [_c_int, _c_ptr, _c_i64, _c_i64, _c_ptr, _c_i64, _c_i64, _c_bool, _c_i64, _c_ptr, _c_ptr],
    "emu_pairwise": [_c_int, _c_ptr, _c_i64, _c_i64, _c_int, _c_ptr, _c_ptr],
    "emu_selftest_launch": [ctypes.c_uint] * 6 + [ctypes.c_size_t, _c_int, _c_ptr],
    "emu_selftest_neighbour": [_c_int, _c_int, _c_ptr],
    "emu_selftest_warp": [_c_ptr],
    "emu_selftest_rounds": [_c_int, _c_ptr],
    "emu_selftest_hazard": [_c_int, _c_ptr],
    "emu_selftest_wrong_stream": [_c_ptr],
    "emu_float_to_half": [_c_ptr, _c_ptr, _c_i64],
    "emu_float_to_bfloat16": [_c_ptr, _c_ptr, _c_i64],
    "emu_half_to_float": [_c_ptr, _c_ptr, _c_i64],
    "emu_bfloat16_to_float": [_c_ptr, _c_ptr, _c_i64],
}


class EmulatorError(RuntimeError):
    """The launcher failed (code > 0: its cudaError_t) or the emulator stopped it (code -1)."""

    def __init__(self, code: int, message: str):
        super().__init__(f"[{code}] {message}")
        self.code = code


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def garbage(shape, dtype) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype)
    t.view(torch.uint8).fill_(0xA5)
    return t


def _p(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _selection(G: torch.Tensor, rows: torch.Tensor | None):
    """(G, rows, n, d) as bindings' checks::rows_arg leaves them: G contiguous, rows None or a
    contiguous int64[n] of row numbers in range, n the number of rows the op reads. The kernels
    trust rows for their addresses, so a bad one is refused here, as there."""
    G = G.contiguous()
    if rows is None:
        return (G, None, *G.shape)
    if rows.dtype != torch.int64 or rows.dim() != 1 or not 1 <= rows.numel() <= G.shape[0]:
        raise ValueError(f"rows must be int64[m], 1 <= m <= {G.shape[0]}, got {rows.dtype} {tuple(rows.shape)}")
    if int(rows.min()) < 0 or int(rows.max()) >= G.shape[0]:
        raise ValueError(f"rows must lie in [0, {G.shape[0]}), got {rows.min()}..{rows.max()}")
    return G, rows.contiguous(), rows.numel(), G.shape[1]


def _check_bools(*tensors):
    for t in tensors:
        raw = t.view(torch.uint8)
        if bool((raw > 1).any()):
            raise AssertionError(f"bool output left unwritten at {(raw > 1).nonzero().flatten()[:10].tolist()}")


class Emulator:
    """The raw ops, each returning the tuple of its schema in csrc/ops.cpp."""

    def __init__(self, path: Path):
        self.path = path
        self.lib = ctypes.CDLL(str(path))
        for name, argtypes in _SIGNATURES.items():
            fn = getattr(self.lib, name)
            fn.argtypes = argtypes
            fn.restype = _c_int
        self.lib.emu_last_message.restype = ctypes.c_char_p
        self.lib.emu_configure.argtypes = [_c_int, ctypes.c_uint64]
        self.lib.emu_configure.restype = None
        self.schedule(ASCENDING)

    def schedule(self, schedule: int, seed: int = 0):
        self.lib.emu_configure(schedule, seed)

    def call(self, name: str, *args) -> int:
        code = getattr(self.lib, name)(*args)
        if code != 0:
            raise EmulatorError(code, self.lib.emu_last_message().decode())
        return code

    def counters(self) -> dict:
        out = (ctypes.c_uint64 * 5)()
        self.lib.emu_counters(out)
        return dict(zip(("launches", "blocks", "threads", "barriers", "warp_collectives"), out))

    # ---- ops (bindings.cpp order and derived values)

    def sign_sum(self, G, rows=None):
        G, rows, n, d = _selection(G, rows)
        sums, bad = garbage(d, torch.int32), garbage(n, torch.bool)
        self.call("emu_sign_sum", DTYPE_CODES[G.dtype], _p(G), _p(rows), n, d, _p(sums), _p(bad))
        _check_bools(bad)
        return sums, bad

    def rlr(self, G, weights, theta, server_lr, rows=None):
        G, rows, n, d = _selection(G, rows)
        # bindings' checks::weights_arg: scaled by a power of two to a largest weight in [0.5, 1)
        w = None if weights is None else weights.to(_acc(G.dtype))
        if w is not None:
            w = torch.ldexp(w.double(), -torch.frexp(w.double().max()).exponent).to(w.dtype).contiguous()
        out, bad = garbage(d, G.dtype), garbage(n, torch.bool)
        self.call("emu_rlr", DTYPE_CODES[G.dtype], _p(G), _p(rows), _p(w), n, d, theta, server_lr, _p(out), _p(bad))
        _check_bools(bad)
        return out, bad

    def order_mean(self, G, lo, hi, rows=None):
        G, rows, n, d = _selection(G, rows)
        out, bad = garbage(d, G.dtype), garbage(n, torch.bool)
        self.call("emu_order_mean", DTYPE_CODES[G.dtype], _p(G), _p(rows), n, d, lo, hi, _p(out), _p(bad))
        _check_bools(bad)
        return out, bad

    def invariant(self, G, lo, hi, min_votes, rows=None):
        G, rows, n, d = _selection(G, rows)
        out, mask, bad = garbage(d, G.dtype), garbage(d, torch.bool), garbage(n, torch.bool)
        self.call("emu_invariant", DTYPE_CODES[G.dtype], _p(G), _p(rows), n, d, lo, hi, min_votes, _p(out), _p(mask),
                  _p(bad))
        _check_bools(mask, bad)
        return out, mask, bad

    def closest_to_median_mean(self, G, beta, rows=None):
        G, rows, n, d = _selection(G, rows)
        out, bad = garbage(d, G.dtype), garbage(n, torch.bool)
        self.call("emu_closest_to_median_mean", DTYPE_CODES[G.dtype], _p(G), _p(rows), n, d, beta, _p(out), _p(bad))
        _check_bools(bad)
        return out, bad

    def client_stats(self, G, window_start, window_length, ref):
        G = G.contiguous()
        n, d = G.shape
        f64 = torch.float64  # every statistic, for every input dtype
        ref = None if ref is None else ref.contiguous()
        with_ref = ref is not None
        norm, frac = garbage(n, f64), garbage((n, 3), f64)
        dot, ref_norm = garbage(n if with_ref else 0, f64), garbage(1 if with_ref else 0, f64)
        ref_dist = garbage(n if with_ref else 0, f64)
        bad = garbage(n, torch.bool)
        self.call("emu_client_stats", DTYPE_CODES[G.dtype], _p(G), n, d, window_start, window_length, _p(ref),
                  _p(norm), _p(frac), *(_p(t) if with_ref else None for t in (dot, ref_norm, ref_dist)), _p(bad))
        _check_bools(bad)
        return norm, frac, dot, ref_norm, ref_dist, bad

    def clip_rows(self, G, max_norm):
        G = G.contiguous()
        n, d = G.shape
        m = max_norm.to(_acc(G.dtype)).contiguous()
        out, bad = garbage((n, d), G.dtype), garbage(n, torch.bool)
        self.call("emu_clip_rows", DTYPE_CODES[G.dtype], _p(G), n, d, _p(m), _p(out), _p(bad))
        _check_bools(bad)
        return out, bad

    def topk_ef_step(self, u, error, momentum, k, rho):
        u = u.contiguous()
        d = u.shape[0]
        kk = min(k, d)
        idx, values, bad = garbage(kk, torch.int64), garbage(kk, u.dtype), garbage(1, torch.bool)
        host_bad = ctypes.c_bool(True)
        self.call("emu_topk_ef_step", DTYPE_CODES[u.dtype], _p(u), _p(error), _p(momentum), d, k, rho, _p(idx),
                  _p(values), _p(bad), ctypes.addressof(host_bad))
        _check_bools(bad)
        if host_bad.value:
            return idx[:0], values[:0], bad
        return idx, values, bad

    def topk_abs(self, x, k):
        x = x.contiguous()
        d = x.shape[0]
        kk = min(k, d)
        idx, values, bad = garbage(kk, torch.int64), garbage(kk, x.dtype), garbage(1, torch.bool)
        self.call("emu_topk_abs", DTYPE_CODES[x.dtype], _p(x), d, k, _p(idx), _p(values), _p(bad))
        _check_bools(bad)
        return idx, values, bad

    def maxpool_amplify(self, G, segments, kernel, restore, out_width):
        G = G.contiguous()
        n, d = G.shape
        table = torch.tensor(segments, dtype=torch.int64).reshape(-1, 5)   # the host table, five ints per segment
        out, bad = garbage((n, out_width), G.dtype), garbage(n, torch.bool)
        self.call("emu_maxpool_amplify", DTYPE_CODES[G.dtype], _p(G), n, d, _p(table), table.shape[0], kernel,
                  restore, out_width, _p(out), _p(bad))
        _check_bools(bad)
        return out, bad

    def _pairwise(self, G, cosine):
        G = G.contiguous()
        n, d = G.shape
        out, bad = garbage((n, n), torch.float64), garbage(n, torch.bool)
        self.call("emu_pairwise", DTYPE_CODES[G.dtype], _p(G), n, d, int(cosine), _p(out), _p(bad))
        _check_bools(bad)
        return out, bad

    def pairwise_sqdist(self, G):
        return self._pairwise(G, False)

    def pairwise_cosine(self, G):
        return self._pairwise(G, True)
