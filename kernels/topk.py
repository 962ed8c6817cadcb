r"""Global top-k by magnitude (docs/ops.md): SparseFed's error-feedback step and the stateless form.

Deterministic radix select, with ties to the lower index, so every backend selects the same set:

1. keys = the bits of |v| (for non-negative floats the bit pattern has the float order); v is in
   the arithmetic dtype, so 16-bit inputs select exactly as the float32 reference does;
2. one histogram pass per 8-bit digit, from the top: every block histograms the digit of the keys
   that still match the chosen prefix, adds it into a global int64 histogram (integer atomics,
   whose sum does not depend on their order), and a one-program kernel picks the digit where the
   running count from the top reaches the number still wanted. After all digits, the prefix is
   T, the k-th largest key, and ``state[1]`` is t, how many keys equal to T are taken;
3. an ordered compaction: per block, counts of keys > T and == T; torch turns them into exclusive
   prefix sums (no host sync); each block then takes every key > T and the first t keys == T in
   index order, and writes (index, value) at its prefix position, so indices come out ascending.

``topk_ef_step`` fuses momentum = rho*momentum + u and error += momentum into the first histogram
pass (the new error goes to a scratch buffer in the arithmetic dtype), and the masking of error and
momentum at the selected coordinates into the compaction. Error feedback can legitimately outgrow
the dtype (a client that keeps sending 3e38 in float32), so both saturate at the largest finite
value of the storage dtype instead of becoming Inf (core ``ef_update``). Both compute
rho * momentum + u with FMA contraction off, so the new state rounds exactly as the reference's
separate multiply and add. When u holds NaN/Inf the state is left untouched and the outputs are
empty; finding that out is the one host sync of the op.

Memory beyond the inputs and outputs, ties or not: the histograms and a few int64 counts and
offsets per block of the compaction (under 0.1 bytes per coordinate on a GPU; 0.005 measured
under the interpreter for topk_abs of 10^6 zeros), and for ``topk_ef_step`` the scratch error in
the arithmetic dtype (4 bytes per coordinate, 8 for float64).
"""
import torch
import triton
import triton.language as tl

from .._raw_checks import check_k, check_topk_ef_step
from .common import nonfinite, to_acc, to_storage
from .settings import acc_dtype, flat_settings, is_fp64

RADIX_BITS = 8
BINS = 1 << RADIX_BITS
# Blocks per histogram program: 8 x 1024 keys share one flush of at most 256 atomics, so the top
# digit's pass costs d / 32 atomics in all instead of d / 4.
HISTOGRAM_STEPS = 8


@triton.jit
def _magnitude_key(v, IS_FP64: tl.constexpr):
    """Bits of |v| as a non-negative integer; NaN keys sort above +inf."""
    if IS_FP64:
        return v.to(tl.int64, bitcast=True) & 0x7FFFFFFFFFFFFFFF
    else:
        return v.to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def _digit_histogram(key, ok, prefix, shift, BINS: tl.constexpr):
    """Histogram of the digit at ``shift`` over the keys that match the chosen prefix."""
    # Two shifts, so that the top digit (prefix empty) never shifts by the full key width.
    match = ((key >> shift) >> 8) == ((prefix >> shift) >> 8)
    digit = ((key >> shift) & (BINS - 1)).to(tl.int32)
    return tl.histogram(digit, BINS, mask=ok & match).to(tl.int64)


@triton.jit
def _flush_histogram(counts, hist, BINS: tl.constexpr):
    """One atomic per non-empty bin per program: after the top digit most bins are empty."""
    tl.atomic_add(hist + tl.arange(0, BINS), counts, mask=counts > 0, sem="relaxed")


@triton.jit
def _saturate(x, LIMIT: tl.constexpr):
    """core saturate: x limited to [-LIMIT, LIMIT]; NaN passes through."""
    return tl.where(x > LIMIT, LIMIT, tl.where(x < -LIMIT, -LIMIT, x))


@triton.jit
def _momentum(grad, momentum, rho, offs, ok, LIMIT: tl.constexpr, RHO_ZERO: tl.constexpr, IS_FP64: tl.constexpr):
    """SparseFed: momentum = rho * momentum + u (just u when rho = 0, as the reference does), saturated."""
    if RHO_ZERO:
        return _saturate(grad, LIMIT)
    else:
        return _saturate(tl.load(rho) * to_acc(tl.load(momentum + offs, mask=ok, other=0.0), IS_FP64) + grad, LIMIT)


@triton.jit
def _ef_update_kernel(u, error, momentum, rho, scratch, state, hist, flags, d, shift, LIMIT: tl.constexpr,
                      RHO_ZERO: tl.constexpr, IS_FP64: tl.constexpr, BINS: tl.constexpr, BLOCK: tl.constexpr,
                      STEPS: tl.constexpr):
    prefix = tl.load(state)
    counts = tl.zeros([BINS], dtype=tl.int64)
    bad = tl.zeros([BLOCK], dtype=tl.int32)
    for step in range(STEPS):
        offs = (tl.program_id(0).to(tl.int64) * STEPS + step) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < d
        grad = to_acc(tl.load(u + offs, mask=ok, other=0.0), IS_FP64)
        m = _momentum(grad, momentum, rho, offs, ok, LIMIT, RHO_ZERO, IS_FP64)
        e = _saturate(to_acc(tl.load(error + offs, mask=ok, other=0.0), IS_FP64) + m, LIMIT)
        tl.store(scratch + offs, e, mask=ok)
        bad |= (nonfinite(grad) & ok).to(tl.int32)
        counts += _digit_histogram(_magnitude_key(e, IS_FP64), ok, prefix, shift, BINS)
    tl.atomic_max(flags, 1, mask=tl.max(bad, axis=0) > 0, sem="relaxed")
    _flush_histogram(counts, hist, BINS)


@triton.jit
def _histogram_kernel(values, state, hist, d, shift, IS_FP64: tl.constexpr, BINS: tl.constexpr,
                      BLOCK: tl.constexpr, STEPS: tl.constexpr):
    prefix = tl.load(state)
    counts = tl.zeros([BINS], dtype=tl.int64)
    for step in range(STEPS):
        offs = (tl.program_id(0).to(tl.int64) * STEPS + step) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < d
        v = to_acc(tl.load(values + offs, mask=ok, other=0.0), IS_FP64)
        counts += _digit_histogram(_magnitude_key(v, IS_FP64), ok, prefix, shift, BINS)
    _flush_histogram(counts, hist, BINS)


@triton.jit
def _pick_digit_kernel(hist, state, shift, BINS: tl.constexpr):
    """Fix the digit at ``shift``: the largest digit whose count from the top reaches ``wanted``."""
    counts = tl.load(hist + tl.arange(0, BINS))
    prefix = tl.load(state)
    wanted = tl.load(state + 1)
    from_top = tl.cumsum(counts, axis=0, reverse=True)
    digits = tl.arange(0, BINS)
    digit = tl.max(tl.where(from_top >= wanted, digits, -1), axis=0)
    above = tl.sum(tl.where(digits > digit, counts, 0), axis=0)
    tl.store(state, prefix | (digit.to(tl.int64) << shift))
    tl.store(state + 1, wanted - above)


@triton.jit
def _count_kernel(values, state, counts, flags, d, IS_FP64: tl.constexpr, CHECK: tl.constexpr,
                  BLOCK: tl.constexpr):
    """Per block: how many keys are > T and == T (and, for topk_abs, whether x is finite)."""
    block = tl.program_id(0)
    offs = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < d
    v = to_acc(tl.load(values + offs, mask=ok, other=0.0), IS_FP64)
    key = _magnitude_key(v, IS_FP64)
    threshold = tl.load(state)
    tl.store(counts + block * 2, tl.sum((ok & (key > threshold)).to(tl.int64), axis=0))
    tl.store(counts + block * 2 + 1, tl.sum((ok & (key == threshold)).to(tl.int64), axis=0))
    if CHECK:
        bad = tl.sum((nonfinite(v) & ok).to(tl.int32), axis=0)
        tl.atomic_max(flags, 1, mask=bad > 0, sem="relaxed")


@triton.jit
def _select_kernel(values, state, offsets, out_idx, out_val, u, error, momentum, rho, d, EF: tl.constexpr,
                   LIMIT: tl.constexpr, RHO_ZERO: tl.constexpr, IS_FP64: tl.constexpr, BLOCK: tl.constexpr):
    """Ordered compaction; with EF also writes error and momentum, zeroed where selected."""
    block = tl.program_id(0)
    offs = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < d
    v = to_acc(tl.load(values + offs, mask=ok, other=0.0), IS_FP64)
    key = _magnitude_key(v, IS_FP64)
    threshold = tl.load(state)
    ties_taken = tl.load(state + 1)
    equal = ok & (key == threshold)
    tie_rank = tl.load(offsets + block * 2) + tl.cumsum(equal.to(tl.int64), axis=0) - 1
    chosen = ok & ((key > threshold) | (equal & (tie_rank < ties_taken)))
    slot = tl.load(offsets + block * 2 + 1) + tl.cumsum(chosen.to(tl.int64), axis=0) - 1
    tl.store(out_idx + slot, offs, mask=chosen)
    tl.store(out_val + slot, to_storage(v, out_val.dtype.element_ty), mask=chosen)
    if EF:
        grad = to_acc(tl.load(u + offs, mask=ok, other=0.0), IS_FP64)
        m = _momentum(grad, momentum, rho, offs, ok, LIMIT, RHO_ZERO, IS_FP64)
        # SparseFed: the sent coordinates leave the error, and momentum factor masking zeroes them.
        tl.store(error + offs, to_storage(tl.where(chosen, 0.0, v), error.dtype.element_ty), mask=ok)
        tl.store(momentum + offs, to_storage(tl.where(chosen, 0.0, m), momentum.dtype.element_ty), mask=ok)


def _key_bits(dtype) -> int:
    """Width of the magnitude keys: those of the arithmetic dtype."""
    return 64 if dtype == torch.float64 else 32


def _radix_select(values, state, hist, first_pass_done: bool, launch):
    """Run the digit passes on ``values`` (state = [prefix 0, k] on entry, [T, t] on exit)."""
    d = values.shape[0]
    block, warps = flat_settings()
    grid = (triton.cdiv(d, block * HISTOGRAM_STEPS),)
    bits = _key_bits(values.dtype)
    for p in range(bits // RADIX_BITS):
        shift = bits - RADIX_BITS * (p + 1)
        if p > 0 or not first_pass_done:
            launch(_histogram_kernel)[grid](values, state, hist[p], d, shift, IS_FP64=is_fp64(values),
                                            BINS=BINS, BLOCK=block, STEPS=HISTOGRAM_STEPS, num_warps=warps)
        launch(_pick_digit_kernel)[(1,)](hist[p], state, shift, BINS=BINS, num_warps=1)


def _histograms(dtype, device):
    return torch.zeros(_key_bits(dtype) // RADIX_BITS, BINS, dtype=torch.int64, device=device)


def _initial_state(k: int, d: int, device):
    """[prefix, wanted]; k = 0 and k >= d get thresholds that select nothing / everything."""
    if k == 0:
        return torch.tensor([torch.iinfo(torch.int64).max, 0], dtype=torch.int64, device=device)
    if k >= d:
        return torch.tensor([-1, 0], dtype=torch.int64, device=device)
    return torch.tensor([0, k], dtype=torch.int64, device=device)


def _compact(values, state, flags, out_dtype, k: int, check: bool, launch, ef_args=None):
    """Counts, prefix offsets and the ordered compaction; returns (indices, values)."""
    d = values.shape[0]
    block, warps = flat_settings()
    blocks = triton.cdiv(d, block)
    counts = torch.empty(blocks, 2, dtype=torch.int64, device=values.device)
    launch(_count_kernel)[(blocks,)](values, state, counts, flags, d, IS_FP64=is_fp64(values), CHECK=check,
                                     BLOCK=block, num_warps=warps)
    above, equal = counts[:, 0], counts[:, 1]
    ties_before = torch.cumsum(equal, 0) - equal
    taken = above + torch.minimum((state[1] - ties_before).clamp(min=0), equal)
    offsets = torch.stack([ties_before, torch.cumsum(taken, 0) - taken], dim=1).contiguous()
    kk = min(k, d)
    out_idx = torch.empty(kk, dtype=torch.int64, device=values.device)
    out_val = torch.empty(kk, dtype=out_dtype, device=values.device)
    u, error, momentum, rho, rho_zero = ef_args if ef_args is not None else (values, values, values, state, True)
    launch(_select_kernel)[(blocks,)](values, state, offsets, out_idx, out_val, u, error, momentum, rho, d,
                                      EF=ef_args is not None, LIMIT=torch.finfo(out_dtype).max, RHO_ZERO=rho_zero,
                                      IS_FP64=is_fp64(values), BLOCK=block, num_warps=warps, enable_fp_fusion=False)
    return out_idx, out_val


def topk_abs_forward(x, k: int, launch=lambda kernel: kernel):
    """(indices int64[min(k, d)] ascending, x at those indices, bool[1]: x holds NaN/Inf)."""
    check_k(k, "topk_abs")
    x = x.contiguous()
    d = x.shape[0]
    state = _initial_state(k, d, x.device)
    flags = torch.zeros(1, dtype=torch.int32, device=x.device)
    if 0 < k < d:
        _radix_select(x, state, _histograms(x.dtype, x.device), False, launch)
    idx, values = _compact(x, state, flags, x.dtype, k, True, launch)
    return idx, values, flags.bool()


def topk_ef_step_forward(u, error, momentum, k: int, rho: float, launch=lambda kernel: kernel):
    """SparseFed's step; updates error and momentum in place unless u holds NaN/Inf.

    Returns (indices int64[min(k, d)] ascending, values, bool[1]); empty outputs when u is not finite.
    """
    check_topk_ef_step(u, error, momentum, k, rho)   # the kernels write the state by u's indices
    u = u.contiguous()
    d = u.shape[0]
    acc = acc_dtype(u.dtype)
    state = _initial_state(k, d, u.device)
    flags = torch.zeros(1, dtype=torch.int32, device=u.device)
    hist = _histograms(u.dtype, u.device)
    scratch = torch.empty(d, dtype=acc, device=u.device)
    rho_t = torch.full((1,), rho, dtype=acc, device=u.device)
    block, warps = flat_settings()
    top_shift = _key_bits(u.dtype) - RADIX_BITS
    launch(_ef_update_kernel)[(triton.cdiv(d, block * HISTOGRAM_STEPS),)](
        u, error, momentum, rho_t, scratch, state, hist[0], flags, d, top_shift, LIMIT=torch.finfo(u.dtype).max,
        RHO_ZERO=rho == 0, IS_FP64=is_fp64(u), BINS=BINS, BLOCK=block, STEPS=HISTOGRAM_STEPS, num_warps=warps,
        enable_fp_fusion=False)
    if bool(flags.item()):
        return (torch.empty(0, dtype=torch.int64, device=u.device), torch.empty(0, dtype=u.dtype, device=u.device),
                flags.bool())
    if 0 < k < d:
        _radix_select(scratch, state, hist, True, launch)
    idx, values = _compact(scratch, state, flags, u.dtype, k, False, launch,
                           ef_args=(u, error, momentum, rho_t, rho == 0))
    return idx, values, flags.bool()
