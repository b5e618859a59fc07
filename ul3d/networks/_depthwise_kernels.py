"""Triton kernels of :mod:`ul3d.networks.depthwise` (imported only when they run: importing Triton takes time).

The kernels read a zero-padded copy of the input (``k//2`` on each side), so every kernel tap is one load at a fixed
offset from the tile's pointers, with one mask (the output tile's bounds) shared by all taps.
"""

import triton
import triton.language as tl

__all__ = ["bn_apply", "bn_backward_apply", "bn_backward_finalize", "bn_backward_stats", "bn_finalize", "bn_stats",
           "cmfa_apply", "cmfa_describe", "dw_forward", "dw_weight_grad", "gate_apply", "max_pool2x", "mkdc_forward",
           "mkdc_forward_grid", "pack_pair", "plane_stats", "pointwise", "stem_pooled", "upsample2x_backward", "upsample2x_relu", "upsample2x_relu_pointwise", "upsample_relu",
           "upsample_relu_pointwise"]

_INTS = ["C", "D", "H", "W", "TH", "TW", "NC"]  # not specialised on their values: fewer compiled variants


@triton.jit
def _tile(tile, D, H, W, TH, TW, KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
          BD: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr):
    """Output offsets (unpadded layout), input offsets (padded layout) and bounds mask of one BD×BH×BW tile."""
    tw = tile % TW
    th = (tile // TW) % TH
    td = tile // (TW * TH)
    od = td * BD + tl.arange(0, BD)[:, None, None]
    oh = th * BH + tl.arange(0, BH)[None, :, None]
    ow = tw * BW + tl.arange(0, BW)[None, None, :]
    Hp = H + KH - 1
    Wp = W + KW - 1
    out_off = od * (H * W) + oh * W + ow
    in_off = od * (Hp * Wp) + oh * Wp + ow
    mask = (od < D) & (oh < H) & (ow < W)
    return out_off, in_off, mask


@triton.jit
def _dw_plane(acc, xs, ws, mask, kd, Hp, Wp, KH: tl.constexpr, KW: tl.constexpr):
    """acc + the KH×KW taps of depth tap ``kd``."""
    for kh in tl.static_range(KH):
        for kw in tl.static_range(KW):
            wv = tl.load(ws + (kd * KH + kh) * KW + kw).to(tl.float32)
            xv = tl.load(xs + (kd * Hp * Wp + kh * Wp + kw), mask=mask, other=0.0).to(tl.float32)
            acc += wv * xv
    return acc


@triton.jit(do_not_specialize=_INTS)
def dw_forward(xp_ptr, w_ptr, y_ptr, C, D, H, W, TH, TW,
               KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
               BD: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr, DEPTH_LOOP: tl.constexpr = False):
    """y[n, c, p] = Σ_t w[c, t] xp[n, c, p + t] over one tile (program 0: tile, 1: n·C + c); xp is x zero-padded
    by k//2. DEPTH_LOOP: the depth taps as a loop (large kernels: 7³ fully unrolled takes minutes to compile)."""
    tile = tl.program_id(0)
    nc = tl.program_id(1)
    c = nc % C
    Hp = H + KH - 1
    Wp = W + KW - 1
    out_off, in_off, mask = _tile(tile, D, H, W, TH, TW, KD, KH, KW, BD, BH, BW)
    xs = xp_ptr + nc.to(tl.int64) * (D + KD - 1) * Hp * Wp + in_off
    ws = w_ptr + c * (KD * KH * KW)
    acc = tl.zeros((BD, BH, BW), dtype=tl.float32)
    if DEPTH_LOOP:
        for kd in range(KD):
            acc = _dw_plane(acc, xs, ws, mask, kd, Hp, Wp, KH, KW)
    else:
        for kd in tl.static_range(KD):
            acc = _dw_plane(acc, xs, ws, mask, kd, Hp, Wp, KH, KW)
    tl.store(y_ptr + nc.to(tl.int64) * D * H * W + out_off, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _acc(acc, g, xs, mask, i: tl.constexpr, KW: tl.constexpr):
    """acc + g · (input tile shifted by i along W), when tap ``i`` exists (i < KW)."""
    if i < KW:
        acc += g * tl.load(xs + i, mask=mask, other=0.0).to(tl.float32)
    return acc


@triton.jit
def _put(ptr, acc, i: tl.constexpr, KW: tl.constexpr):
    if i < KW:
        tl.store(ptr + i, tl.sum(acc))


@triton.jit(do_not_specialize=_INTS + ["T", "TPS"])
def dw_weight_grad(xp_ptr, g_ptr, part_ptr, C, D, H, W, TH, TW, NC, T, TPS,
                   KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                   BD: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr):
    """part[s, n·C + c, (kd, kh, kw)] = Σ_{p in tiles s·TPS … (s+1)·TPS} g[n, c, p] · xp[n, c, p + (kd, kh, kw)].

    Program (n·C + c, kd·KH + kh, s) keeps one accumulator tile per ``kw`` (KW ≤ 7) over its run of TPS tiles and
    reduces each once at the end, so the output gradient is read once per (kd, kh) and no reduction runs per tile.
    """
    nc = tl.program_id(0)
    kdh = tl.program_id(1)
    s = tl.program_id(2)
    kd = kdh // KH
    kh = kdh % KH
    Hp = H + KH - 1
    Wp = W + KW - 1
    gb = g_ptr + nc.to(tl.int64) * D * H * W
    xb = xp_ptr + nc.to(tl.int64) * (D + KD - 1) * Hp * Wp + kd * Hp * Wp + kh * Wp
    a0 = tl.zeros((BD, BH, BW), dtype=tl.float32)
    a1 = tl.zeros((BD, BH, BW), dtype=tl.float32)
    a2 = tl.zeros((BD, BH, BW), dtype=tl.float32)
    a3 = tl.zeros((BD, BH, BW), dtype=tl.float32)
    a4 = tl.zeros((BD, BH, BW), dtype=tl.float32)
    a5 = tl.zeros((BD, BH, BW), dtype=tl.float32)
    a6 = tl.zeros((BD, BH, BW), dtype=tl.float32)
    for tile in range(s * TPS, tl.minimum(s * TPS + TPS, T)):
        out_off, in_off, mask = _tile(tile, D, H, W, TH, TW, KD, KH, KW, BD, BH, BW)
        g = tl.load(gb + out_off, mask=mask, other=0.0).to(tl.float32)
        xs = xb + in_off
        a0 = _acc(a0, g, xs, mask, 0, KW)
        a1 = _acc(a1, g, xs, mask, 1, KW)
        a2 = _acc(a2, g, xs, mask, 2, KW)
        a3 = _acc(a3, g, xs, mask, 3, KW)
        a4 = _acc(a4, g, xs, mask, 4, KW)
        a5 = _acc(a5, g, xs, mask, 5, KW)
        a6 = _acc(a6, g, xs, mask, 6, KW)
    out = part_ptr + (s.to(tl.int64) * NC + nc) * (KD * KH * KW) + kdh * KW
    _put(out, a0, 0, KW)
    _put(out, a1, 1, KW)
    _put(out, a2, 2, KW)
    _put(out, a3, 3, KW)
    _put(out, a4, 4, KW)
    _put(out, a5, 5, KW)
    _put(out, a6, 6, KW)


@triton.jit
def _rows_tap(a0, a1, a2, a3, xv, w_ptr, s: tl.constexpr, kh, kw: tl.constexpr,
              MD: tl.constexpr, MH: tl.constexpr, MW: tl.constexpr,
              KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, ROWS: tl.constexpr):
    """One branch's accumulators of the program's ROWS output rows, given input row ``s`` at in-plane tap (kh, kw):
    output row v gets tap ``(s − v, kh, kw)`` where that lies inside the branch's centred KD×KH×KW kernel (decided at
    compile time for s and kw, at run time for kh; KD = 0: no such branch). ``w_ptr``: the branch's taps of the
    channel."""
    if KD > 0:
        if (kw - (MW - KW) // 2 >= 0) & (kw - (MW - KW) // 2 < KW):
            th = kh - (MH - KH) // 2
            if (th >= 0) & (th < KH):
                tap = th * KW + (kw - (MW - KW) // 2)
                first: tl.constexpr = (MD - KD) // 2  # the branch's first depth tap in the widest kernel
                if (s - first >= 0) & (s - first < KD):
                    a0 += tl.load(w_ptr + (s - first) * KH * KW + tap) * xv
                if ROWS > 1:
                    if (s - 1 - first >= 0) & (s - 1 - first < KD):
                        a1 += tl.load(w_ptr + (s - 1 - first) * KH * KW + tap) * xv
                if ROWS > 2:
                    if (s - 2 - first >= 0) & (s - 2 - first < KD):
                        a2 += tl.load(w_ptr + (s - 2 - first) * KH * KW + tap) * xv
                if ROWS > 3:
                    if (s - 3 - first >= 0) & (s - 3 - first < KD):
                        a3 += tl.load(w_ptr + (s - 3 - first) * KH * KW + tap) * xv
    return a0, a1, a2, a3


@triton.jit
def _branch_sum(a0, a1, a2, b_ptr, c, C, lo0, hi0, lo1, hi1, lo2, hi2, K1: tl.constexpr, K2: tl.constexpr):
    """Eq. 2's sum over the branches of channel ``c``: Σ_b clamp(a_b + bias_b[c], lo_b, hi_b), biases (3, C)
    (K1, K2 = 0: branch 1, 2 absent)."""
    out = tl.minimum(tl.maximum(a0 + tl.load(b_ptr + c), lo0), hi0)
    if K1 > 0:
        out += tl.minimum(tl.maximum(a1 + tl.load(b_ptr + C + c), lo1), hi1)
    if K2 > 0:
        out += tl.minimum(tl.maximum(a2 + tl.load(b_ptr + 2 * C + c), lo2), hi2)
    return out


@triton.jit
def _mkdc_row(y_ptr, a0, a1, a2, c, C, b_ptr, lo0, hi0, lo1, hi1, lo2, hi2, off, mask,
              K1D: tl.constexpr, K2D: tl.constexpr, v: tl.constexpr, ROWS: tl.constexpr):
    """Store output row ``v``: Σ_b clamp(a_b + bias_b, lo_b, hi_b)."""
    if v < ROWS:
        out = _branch_sum(a0, a1, a2, b_ptr, c, C, lo0, hi0, lo1, hi1, lo2, hi2, K1D, K2D)
        tl.store(y_ptr + off, out.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _branch_weights(w_ptr, c, T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr):
    """Pointers to channel ``c``'s taps of branches 0, 1, 2 in the MKDC kernels' packed weights (C, T0 + T1 + T2)."""
    ws0 = w_ptr + c * (T0 + T1 + T2)
    return ws0, ws0 + T0, ws0 + T0 + T1


@triton.jit
def _mkdc_program(C, TH, TW, ROWS: tl.constexpr):
    """The MKDC kernels' program: its (n, c) plane ``nc = n·C + c`` (grid axis 1) and tile (axis 0: width tile ``tw``
    fastest, then height tile ``th``, then the first of its ROWS depth rows ``d0``)."""
    tile = tl.program_id(0)
    nc = tl.program_id(1)
    tw = tile % TW
    th = (tile // TW) % TH
    return nc, nc % C, nc // C, tw, th, (tile // (TW * TH)) * ROWS


@triton.jit(do_not_specialize=_INTS + ["NPG", "G", "lo0", "hi0", "lo1", "hi1", "lo2", "hi2"])
def mkdc_forward(xp_ptr, w_ptr, b_ptr, y_ptr, C, D, H, W, TH, TW, NPG, G, lo0, hi0, lo1, hi1, lo2, hi2,
                 MD: tl.constexpr, MH: tl.constexpr, MW: tl.constexpr,
                 K0D: tl.constexpr, K0H: tl.constexpr, K0W: tl.constexpr,
                 K1D: tl.constexpr, K1H: tl.constexpr, K1W: tl.constexpr,
                 K2D: tl.constexpr, K2H: tl.constexpr, K2W: tl.constexpr,
                 ROWS: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr, ROW_LOOP: tl.constexpr = False):
    """Eq. 2 with BatchNorm folded, in one pass: ``y[n, s(c), p] = Σ_b clamp(Σ_t w_b[c, t] xp[n, c, p + t] + b_b[c],
    lo_b, hi_b)`` for up to three depth-wise branches of centred odd kernels (K{b}D = 0: branch absent), in float32,
    with the channel shuffle applied by the store (``s(c) = (c mod NPG)·G + c div NPG``). ``xp``: the input
    zero-padded for the widest kernel MD×MH×MW; ``w``: (C, taps of branch 0, 1, 2) float32; ``b``: (3, C) float32.

    A program computes ROWS (≤ 4) consecutive depth rows of a BH×BW tile of one (n, c) plane. Every load of an input
    row serves every branch and every output row it reaches, so ROWS rows take (ROWS + MD − 1)·MH·MW loads instead of
    ROWS·MD·MH·MW (5³, 4 rows: 200 instead of 500). ROW_LOOP: the in-plane rows of the kernel as a loop at run time
    (sm_90: 64 instead of 168 registers; faster on large planes, slower on small ones).
    """
    nc, c, n, tw, th, d0 = _mkdc_program(C, TH, TW, ROWS)
    Hp = H + MH - 1
    Wp = W + MW - 1
    oh = th * BH + tl.arange(0, BH)[:, None]
    ow = tw * BW + tl.arange(0, BW)[None, :]
    plane = (oh < H) & (ow < W)
    dd = d0 + tl.zeros((BH, BW), dtype=tl.int32)  # the first row's depth, as a tile (masks are tiles)
    xs = xp_ptr + nc.to(tl.int64) * (D + MD - 1) * Hp * Wp + d0 * Hp * Wp + oh * Wp + ow
    ws0, ws1, ws2 = _branch_weights(w_ptr, c, K0D * K0H * K0W, K1D * K1H * K1W, K2D * K2H * K2W)
    zero = tl.zeros((BH, BW), dtype=tl.float32)
    a00, a01, a02, a03 = zero, zero, zero, zero  # branch 0, rows 0-3
    a10, a11, a12, a13 = zero, zero, zero, zero
    a20, a21, a22, a23 = zero, zero, zero, zero
    if ROW_LOOP:  # in-plane rows at run time: each row's loads and weights are live only in its iteration
        for kh in range(MH):
            for s in tl.static_range(ROWS + MD - 1):
                row_ok = plane & (dd + s < D + MD - 1)
                xr = xs + (s * Hp * Wp + kh * Wp)  # the row's pointers; the kw taps are constant offsets from them
                for kw in tl.static_range(MW):
                    xv = tl.load(xr + kw, mask=row_ok, other=0.0).to(tl.float32)
                    a00, a01, a02, a03 = _rows_tap(a00, a01, a02, a03, xv, ws0, s, kh, kw, MD, MH, MW, K0D, K0H, K0W,
                                                   ROWS)
                    a10, a11, a12, a13 = _rows_tap(a10, a11, a12, a13, xv, ws1, s, kh, kw, MD, MH, MW, K1D, K1H, K1W,
                                                   ROWS)
                    a20, a21, a22, a23 = _rows_tap(a20, a21, a22, a23, xv, ws2, s, kh, kw, MD, MH, MW, K2D, K2H, K2W,
                                                   ROWS)
    else:  # every tap unrolled (more registers, but every load can be issued early: faster on small planes)
        for s in tl.static_range(ROWS + MD - 1):
            row_ok = plane & (dd + s < D + MD - 1)
            for kh in tl.static_range(MH):
                for kw in tl.static_range(MW):
                    xv = tl.load(xs + (s * Hp * Wp + kh * Wp + kw), mask=row_ok, other=0.0).to(tl.float32)
                    a00, a01, a02, a03 = _rows_tap(a00, a01, a02, a03, xv, ws0, s, kh, kw, MD, MH, MW, K0D, K0H, K0W,
                                                   ROWS)
                    a10, a11, a12, a13 = _rows_tap(a10, a11, a12, a13, xv, ws1, s, kh, kw, MD, MH, MW, K1D, K1H, K1W,
                                                   ROWS)
                    a20, a21, a22, a23 = _rows_tap(a20, a21, a22, a23, xv, ws2, s, kh, kw, MD, MH, MW, K2D, K2H, K2W,
                                                   ROWS)
    oc = (c % NPG) * G + c // NPG
    yb = y_ptr + (n * C + oc).to(tl.int64) * D * H * W
    off = d0 * H * W + oh * W + ow
    _mkdc_row(yb, a00, a10, a20, c, C, b_ptr, lo0, hi0, lo1, hi1, lo2, hi2, off, plane & (dd < D), K1D, K2D, 0, ROWS)
    _mkdc_row(yb, a01, a11, a21, c, C, b_ptr, lo0, hi0, lo1, hi1, lo2, hi2, off + H * W, plane & (dd + 1 < D),
              K1D, K2D, 1, ROWS)
    _mkdc_row(yb, a02, a12, a22, c, C, b_ptr, lo0, hi0, lo1, hi1, lo2, hi2, off + 2 * H * W, plane & (dd + 2 < D),
              K1D, K2D, 2, ROWS)
    _mkdc_row(yb, a03, a13, a23, c, C, b_ptr, lo0, hi0, lo1, hi1, lo2, hi2, off + 3 * H * W, plane & (dd + 3 < D),
              K1D, K2D, 3, ROWS)


@triton.jit
def _hrows_tap(a0, a1, a2, a3, xv, w_ptr, dk, r: tl.constexpr, tw, wok, MH: tl.constexpr,
               KH: tl.constexpr, KW: tl.constexpr, HR: tl.constexpr):
    """One branch's accumulators of one output depth row and its HR (≤ 4) height rows, given the input at depth tap
    ``dk`` of the branch, input height row ``r`` and width tap ``tw`` (``wok``: inside the kernel, else the weights
    load as 0): output height row j gets the branch's tap (dk, r − j − (MH − KH)/2, tw) where that lies inside its
    kernel (decided at compile time)."""
    first: tl.constexpr = (MH - KH) // 2
    base = w_ptr + dk * KH * KW + tw
    if (r - first >= 0) & (r - first < KH):
        a0 += tl.load(base + (r - first) * KW, mask=wok, other=0.0) * xv
    if HR > 1:
        if (r - 1 - first >= 0) & (r - 1 - first < KH):
            a1 += tl.load(base + (r - 1 - first) * KW, mask=wok, other=0.0) * xv
    if HR > 2:
        if (r - 2 - first >= 0) & (r - 2 - first < KH):
            a2 += tl.load(base + (r - 2 - first) * KW, mask=wok, other=0.0) * xv
    if HR > 3:
        if (r - 3 - first >= 0) & (r - 3 - first < KH):
            a3 += tl.load(base + (r - 3 - first) * KW, mask=wok, other=0.0) * xv
    return a0, a1, a2, a3


@triton.jit
def _grid_tap(a00, a01, a02, a03, a10, a11, a12, a13, a20, a21, a22, a23, a30, a31, a32, a33, xv, w_ptr,
              s: tl.constexpr, r: tl.constexpr, kw, MD: tl.constexpr, MH: tl.constexpr, MW: tl.constexpr,
              KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, ROWS: tl.constexpr, HR: tl.constexpr):
    """One branch's ROWS × HR accumulators (``a{depth row}{height row}``) given the input at depth row ``s``, height
    row ``r`` and width tap ``kw`` (at run time) of the program's window (KD = 0: no such branch): output depth row v
    takes the branch's depth tap s − v − (MD − KD)/2 where that lies inside the kernel."""
    if KD > 0:
        tw = kw - (MW - KW) // 2
        wok = (tw >= 0) & (tw < KW)
        first: tl.constexpr = (MD - KD) // 2
        if (s - 0 - first >= 0) & (s - 0 - first < KD):
            a00, a01, a02, a03 = _hrows_tap(a00, a01, a02, a03, xv, w_ptr, s - first, r, tw, wok, MH, KH, KW, HR)
        if ROWS > 1:
            if (s - 1 - first >= 0) & (s - 1 - first < KD):
                a10, a11, a12, a13 = _hrows_tap(a10, a11, a12, a13, xv, w_ptr, s - 1 - first, r, tw, wok,
                                                MH, KH, KW, HR)
        if ROWS > 2:
            if (s - 2 - first >= 0) & (s - 2 - first < KD):
                a20, a21, a22, a23 = _hrows_tap(a20, a21, a22, a23, xv, w_ptr, s - 2 - first, r, tw, wok,
                                                MH, KH, KW, HR)
        if ROWS > 3:
            if (s - 3 - first >= 0) & (s - 3 - first < KD):
                a30, a31, a32, a33 = _hrows_tap(a30, a31, a32, a33, xv, w_ptr, s - 3 - first, r, tw, wok,
                                                MH, KH, KW, HR)
    return a00, a01, a02, a03, a10, a11, a12, a13, a20, a21, a22, a23, a30, a31, a32, a33


@triton.jit
def _grid_row(y_ptr, a0, a1, a2, c, C, b_ptr, lo0, hi0, lo1, hi1, lo2, hi2, off, mask,
              K1D: tl.constexpr, K2D: tl.constexpr, v: tl.constexpr, j: tl.constexpr, ROWS: tl.constexpr,
              HR: tl.constexpr):
    """Store output depth row ``v``, height row ``j`` of :func:`mkdc_forward_grid`'s program."""
    if (v < ROWS) & (j < HR):
        out = _branch_sum(a0, a1, a2, b_ptr, c, C, lo0, hi0, lo1, hi1, lo2, hi2, K1D, K2D)
        tl.store(y_ptr + off, out.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["C", "TH", "TW", "NPG", "G", "lo0", "hi0", "lo1", "hi1", "lo2", "hi2"])
def mkdc_forward_grid(xp_ptr, w_ptr, b_ptr, y_ptr, C, D: tl.constexpr, H: tl.constexpr, W: tl.constexpr, TH, TW,
                      NPG, G, lo0, hi0, lo1, hi1, lo2, hi2,
                      MD: tl.constexpr, MH: tl.constexpr, MW: tl.constexpr,
                      K0D: tl.constexpr, K0H: tl.constexpr, K0W: tl.constexpr,
                      K1D: tl.constexpr, K1H: tl.constexpr, K1W: tl.constexpr,
                      K2D: tl.constexpr, K2H: tl.constexpr, K2W: tl.constexpr,
                      ROWS: tl.constexpr, HR: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr,
                      IPO: tl.constexpr = 1):
    """:func:`mkdc_forward`'s function (Eq. 2, BatchNorm folded, channel shuffle by the store) with the input rows
    shared in height too: a program computes ROWS (≤ 4) depth rows × HR (≤ 4) height rows of a BH×BW tile of one
    (n, c) plane, tile row i covering output height rows ``(th·BH + i)·HR + j``, j < HR. Every load of an input row
    (depth s, height r) serves every branch and every output row it reaches, so a program takes
    (ROWS + MD − 1)·(HR + MH − 1)·MW loads for ROWS·HR output rows (5³, 4 × 4 rows: 20 per output voxel instead of
    :func:`mkdc_forward`'s 50), and every weight load serves BH·BW / threads voxels of each output row. The width
    taps are a loop at run time (fully unrolled, Triton's coalescing pass took minutes for 4 × 4 rows); a narrower
    branch's taps outside its width load as zero weights. D, H, W are compile-time constants (every tap one load at a
    constant offset, no address arithmetic); needs D % ROWS = H % HR = 0. IPO > 1: each output channel c sums its
    branches over the IPO input planes ``c·IPO + i`` (weights per input plane; a grouped conv of IPO input channels per
    output, e.g. a GAG's two grouped convs over its gate and skip planes), one bias and clamp per output channel."""
    nc, c, n, tw, th, d0 = _mkdc_program(C, TH, TW, ROWS)
    Hp = H + MH - 1
    Wp = W + MW - 1
    oh = (th * BH + tl.arange(0, BH)[:, None]) * HR  # each tile row's first output height row
    ow = tw * BW + tl.arange(0, BW)[None, :]
    inw = ow < W
    dd = d0 + tl.zeros((BH, BW), dtype=tl.int32)  # the first row's depth, as a tile (masks are tiles)
    # no load needs a mask: with D % ROWS = H % HR = 0 every program's depth rows and every tile row's height rows lie
    # inside the volume or wholly outside it, and the columns and rows outside it read the last ones (not stored)
    zero = tl.zeros((BH, BW), dtype=tl.float32)
    u000, u001, u002, u003, u010, u011, u012, u013, u020, u021, u022, u023, u030, u031, u032, u033 = (
        zero, zero, zero, zero, zero, zero, zero, zero, zero, zero, zero, zero, zero, zero, zero, zero)
    u100, u101, u102, u103, u110, u111, u112, u113, u120, u121, u122, u123, u130, u131, u132, u133 = (
        zero, zero, zero, zero, zero, zero, zero, zero, zero, zero, zero, zero, zero, zero, zero, zero)
    u200, u201, u202, u203, u210, u211, u212, u213, u220, u221, u222, u223, u230, u231, u232, u233 = (
        zero, zero, zero, zero, zero, zero, zero, zero, zero, zero, zero, zero, zero, zero, zero, zero)
    for i in range(IPO):  # (IPO = 1: one iteration, folded away)
        xs = xp_ptr + (nc * IPO + i).to(tl.int64) * (D + MD - 1) * Hp * Wp + d0 * Hp * Wp \
            + tl.minimum(oh, H - HR) * Wp + tl.minimum(ow, W - 1)
        ws0, ws1, ws2 = _branch_weights(w_ptr, c * IPO + i, K0D * K0H * K0W, K1D * K1H * K1W, K2D * K2H * K2W)
        for kw in range(MW):  # the width taps at run time (one compiled body: minutes less to compile)
            for s in tl.static_range(ROWS + MD - 1):
                for r in tl.static_range(HR + MH - 1):
                    xv = tl.load(xs + (s * Hp * Wp + r * Wp) + kw).to(tl.float32)
                    (u000, u001, u002, u003, u010, u011, u012, u013,
                     u020, u021, u022, u023, u030, u031, u032, u033) = _grid_tap(
                        u000, u001, u002, u003, u010, u011, u012, u013,
                        u020, u021, u022, u023, u030, u031, u032, u033, xv, ws0, s, r, kw,
                        MD, MH, MW, K0D, K0H, K0W, ROWS, HR)
                    (u100, u101, u102, u103, u110, u111, u112, u113,
                     u120, u121, u122, u123, u130, u131, u132, u133) = _grid_tap(
                        u100, u101, u102, u103, u110, u111, u112, u113,
                        u120, u121, u122, u123, u130, u131, u132, u133, xv, ws1, s, r, kw,
                        MD, MH, MW, K1D, K1H, K1W, ROWS, HR)
                    (u200, u201, u202, u203, u210, u211, u212, u213,
                     u220, u221, u222, u223, u230, u231, u232, u233) = _grid_tap(
                        u200, u201, u202, u203, u210, u211, u212, u213,
                        u220, u221, u222, u223, u230, u231, u232, u233, xv, ws2, s, r, kw,
                        MD, MH, MW, K2D, K2H, K2W, ROWS, HR)
    oc = (c % NPG) * G + c // NPG
    yb = y_ptr + (n * C + oc).to(tl.int64) * D * H * W
    off = d0 * H * W + oh * W + ow
    _grid_row(yb, u000, u100, u200, c, C, b_ptr, lo0, hi0, lo1, hi1, lo2, hi2, off + (0 * H + 0) * W,
              inw & (oh + 0 < H) & (dd + 0 < D), K1D, K2D, 0, 0, ROWS, HR)
    _grid_row(yb, u001, u101, u201, c, C, b_ptr, lo0, hi0, lo1, hi1, lo2, hi2, off + (0 * H + 1) * W,
              inw & (oh + 1 < H) & (dd + 0 < D), K1D, K2D, 0, 1, ROWS, HR)
    _grid_row(yb, u002, u102, u202, c, C, b_ptr, lo0, hi0, lo1, hi1, lo2, hi2, off + (0 * H + 2) * W,
              inw & (oh + 2 < H) & (dd + 0 < D), K1D, K2D, 0, 2, ROWS, HR)
    _grid_row(yb, u003, u103, u203, c, C, b_ptr, lo0, hi0, lo1, hi1, lo2, hi2, off + (0 * H + 3) * W,
              inw & (oh + 3 < H) & (dd + 0 < D), K1D, K2D, 0, 3, ROWS, HR)
    _grid_row(yb, u010, u110, u210, c, C, b_ptr, lo0, hi0, lo1, hi1, lo2, hi2, off + (1 * H + 0) * W,
              inw & (oh + 0 < H) & (dd + 1 < D), K1D, K2D, 1, 0, ROWS, HR)
    _grid_row(yb, u011, u111, u211, c, C, b_ptr, lo0, hi0, lo1, hi1, lo2, hi2, off + (1 * H + 1) * W,
              inw & (oh + 1 < H) & (dd + 1 < D), K1D, K2D, 1, 1, ROWS, HR)
    _grid_row(yb, u012, u112, u212, c, C, b_ptr, lo0, hi0, lo1, hi1, lo2, hi2, off + (1 * H + 2) * W,
              inw & (oh + 2 < H) & (dd + 1 < D), K1D, K2D, 1, 2, ROWS, HR)
    _grid_row(yb, u013, u113, u213, c, C, b_ptr, lo0, hi0, lo1, hi1, lo2, hi2, off + (1 * H + 3) * W,
              inw & (oh + 3 < H) & (dd + 1 < D), K1D, K2D, 1, 3, ROWS, HR)
    _grid_row(yb, u020, u120, u220, c, C, b_ptr, lo0, hi0, lo1, hi1, lo2, hi2, off + (2 * H + 0) * W,
              inw & (oh + 0 < H) & (dd + 2 < D), K1D, K2D, 2, 0, ROWS, HR)
    _grid_row(yb, u021, u121, u221, c, C, b_ptr, lo0, hi0, lo1, hi1, lo2, hi2, off + (2 * H + 1) * W,
              inw & (oh + 1 < H) & (dd + 2 < D), K1D, K2D, 2, 1, ROWS, HR)
    _grid_row(yb, u022, u122, u222, c, C, b_ptr, lo0, hi0, lo1, hi1, lo2, hi2, off + (2 * H + 2) * W,
              inw & (oh + 2 < H) & (dd + 2 < D), K1D, K2D, 2, 2, ROWS, HR)
    _grid_row(yb, u023, u123, u223, c, C, b_ptr, lo0, hi0, lo1, hi1, lo2, hi2, off + (2 * H + 3) * W,
              inw & (oh + 3 < H) & (dd + 2 < D), K1D, K2D, 2, 3, ROWS, HR)
    _grid_row(yb, u030, u130, u230, c, C, b_ptr, lo0, hi0, lo1, hi1, lo2, hi2, off + (3 * H + 0) * W,
              inw & (oh + 0 < H) & (dd + 3 < D), K1D, K2D, 3, 0, ROWS, HR)
    _grid_row(yb, u031, u131, u231, c, C, b_ptr, lo0, hi0, lo1, hi1, lo2, hi2, off + (3 * H + 1) * W,
              inw & (oh + 1 < H) & (dd + 3 < D), K1D, K2D, 3, 1, ROWS, HR)
    _grid_row(yb, u032, u132, u232, c, C, b_ptr, lo0, hi0, lo1, hi1, lo2, hi2, off + (3 * H + 2) * W,
              inw & (oh + 2 < H) & (dd + 3 < D), K1D, K2D, 3, 2, ROWS, HR)
    _grid_row(yb, u033, u133, u233, c, C, b_ptr, lo0, hi0, lo1, hi1, lo2, hi2, off + (3 * H + 3) * W,
              inw & (oh + 3 < H) & (dd + 3 < D), K1D, K2D, 3, 3, ROWS, HR)


@triton.jit
def _matmul_acc(acc, x_ptr, w_ptr, K, P, p, inside, co, cmask, BK: tl.constexpr, PRECISION: tl.constexpr):
    """acc + W[co, :K] · X[:K, p] (tensor-core dots over K in steps of BK; masked rows and columns read as 0)."""
    for k0 in range(0, K, BK):
        k = k0 + tl.arange(0, BK)
        kmask = k < K
        wt = tl.load(w_ptr + co[:, None] * K + k[None, :], mask=cmask[:, None] & kmask[None, :], other=0.0)
        xt = tl.load(x_ptr + k[:, None] * P + p[None, :], mask=kmask[:, None] & inside[None, :], other=0.0)
        acc = tl.dot(wt, xt, acc, input_precision=PRECISION)
    return acc


@triton.jit(do_not_specialize=["CIN", "COUT", "CR", "D", "H", "W", "PD", "PH", "PW", "lo", "hi"])
def pointwise(x_ptr, w_ptr, b_ptr, r_ptr, rw_ptr, y_ptr, CIN, COUT, CR, D, H, W, PD, PH, PW, lo, hi,
              HAS_BIAS: tl.constexpr, RES: tl.constexpr, PADDED: tl.constexpr, BK: tl.constexpr,
              BCO: tl.constexpr, BP: tl.constexpr, PRECISION: tl.constexpr):
    """A 1×1 convolution with its epilogue, ``y[n, o, q] = clamp(Σ_i w[o, i] x[n, i, p(q)] + b[o] + r, lo, hi)``, over
    BP output voxels × BCO output channels (program 0: voxel block, 1: n, 2: channel block), accumulated in float32.
    RES = 0: no ``r``; 1: ``r = res[n, o, p]`` (identity shortcut, CR = COUT); 2: ``r = Σ_j rw[o, j] res[n, j, p]``
    (a 1×1 shortcut conv of CR channels). PADDED: the output is the D×H×W result zero-padded by (PD, PH, PW) on each
    side (``q`` runs over the padded volume, ``p(q)`` is its interior voxel; border voxels are stored as 0), so a
    depth-wise kernel can read it as its padded input."""
    pid = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    co = tl.program_id(2) * BCO + tl.arange(0, BCO)
    cmask = co < COUT
    P = D * H * W
    q = pid * BP + tl.arange(0, BP)
    if PADDED:
        Hp = H + 2 * PH
        Wp = W + 2 * PW
        Q = (D + 2 * PD) * Hp * Wp
        z = q // (Hp * Wp)
        rem = q - z * (Hp * Wp)
        yy = rem // Wp
        iz = z - PD
        iy = yy - PH
        ix = rem - yy * Wp - PW
        inside = (q < Q) & (iz >= 0) & (iz < D) & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
        p = (iz * H + iy) * W + ix
    else:
        Q = P
        inside = q < Q
        p = q
    acc = tl.zeros((BCO, BP), dtype=tl.float32)
    acc = _matmul_acc(acc, x_ptr + n * CIN * P, w_ptr, CIN, P, p, inside, co, cmask, BK, PRECISION)
    if RES == 2:
        acc = _matmul_acc(acc, r_ptr + n * CR * P, rw_ptr, CR, P, p, inside, co, cmask, BK, PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + co, mask=cmask, other=0.0)[:, None]
    if RES == 1:
        acc += tl.load(r_ptr + n * CR * P + co[:, None] * P + p[None, :], mask=cmask[:, None] & inside[None, :],
                       other=0.0).to(tl.float32)
    acc = tl.minimum(tl.maximum(acc, lo), hi)
    if PADDED:
        acc = tl.where(inside[None, :], acc, 0.0)
    tl.store(y_ptr + n * COUT * Q + co[:, None] * Q + q[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=cmask[:, None] & (q < Q)[None, :])


@triton.jit
def _linear_sources(i0_ptr, i1_ptr, lam_ptr, p, m, h, w, D, H, W):
    """For output voxels ``p`` (mask ``m``) of a (multi)linear upsampling to D×H×W: the offsets of the four source
    rows (depth, height pairs) in an input plane of h×w rows, the two source columns and the three weights, from the
    tables (axis D at ``[0, D)``, H at ``[D, D + H)``, W after them:
    :func:`~ul3d.networks.nets._lean.linear_source_weights`)."""
    ow = p % W
    oh = (p // W) % H
    od = p // (W * H)
    d0 = tl.load(i0_ptr + od, mask=m, other=0)
    d1 = tl.load(i1_ptr + od, mask=m, other=0)
    ld = tl.load(lam_ptr + od, mask=m, other=0.0)
    h0 = tl.load(i0_ptr + D + oh, mask=m, other=0)
    h1 = tl.load(i1_ptr + D + oh, mask=m, other=0)
    lh = tl.load(lam_ptr + D + oh, mask=m, other=0.0)
    w0 = tl.load(i0_ptr + D + H + ow, mask=m, other=0)
    w1 = tl.load(i1_ptr + D + H + ow, mask=m, other=0)
    lw = tl.load(lam_ptr + D + H + ow, mask=m, other=0.0)
    return (d0 * h + h0) * w, (d0 * h + h1) * w, (d1 * h + h0) * w, (d1 * h + h1) * w, w0, w1, ld, lh, lw


@triton.jit
def _linear_value(xb, r00, r01, r10, r11, w0, w1, ld, lh, lw, m):
    """The interpolated value (float32) of one input plane ``xb`` at the voxels :func:`_linear_sources` describes."""
    v00 = (1 - lw) * tl.load(xb + r00 + w0, mask=m, other=0.0).to(tl.float32) \
        + lw * tl.load(xb + r00 + w1, mask=m, other=0.0).to(tl.float32)
    v01 = (1 - lw) * tl.load(xb + r01 + w0, mask=m, other=0.0).to(tl.float32) \
        + lw * tl.load(xb + r01 + w1, mask=m, other=0.0).to(tl.float32)
    v10 = (1 - lw) * tl.load(xb + r10 + w0, mask=m, other=0.0).to(tl.float32) \
        + lw * tl.load(xb + r10 + w1, mask=m, other=0.0).to(tl.float32)
    v11 = (1 - lw) * tl.load(xb + r11 + w0, mask=m, other=0.0).to(tl.float32) \
        + lw * tl.load(xb + r11 + w1, mask=m, other=0.0).to(tl.float32)
    return (1 - ld) * ((1 - lh) * v00 + lh * v01) + ld * ((1 - lh) * v10 + lh * v11)


@triton.jit(do_not_specialize=["C", "K", "d", "h", "w", "D", "H", "W"])
def upsample_relu_pointwise(x_ptr, i0_ptr, i1_ptr, lam_ptr, wt_ptr, b_ptr, y_ptr, C, K, d, h, w, D, H, W,
                            RELU: tl.constexpr, HAS_BIAS: tl.constexpr, KP: tl.constexpr, BLOCK: tl.constexpr):
    """``y[n, k, p] = b[k] + Σ_c wt[k, c] · relu(trilinear(x[n, c])(p))`` over BLOCK output voxels (program 0: voxel
    block, 1: n), the interpolation from tables (:func:`_linear_sources`); KP ≥ K accumulators per voxel, float32."""
    pid = tl.program_id(0)
    n = tl.program_id(1)
    p = pid * BLOCK + tl.arange(0, BLOCK)
    m = p < D * H * W
    r00, r01, r10, r11, w0, w1, ld, lh, lw = _linear_sources(i0_ptr, i1_ptr, lam_ptr, p, m, h, w, D, H, W)
    kk = tl.arange(0, KP)
    km = kk < K
    acc = tl.zeros((KP, BLOCK), dtype=tl.float32)
    for c in range(C):
        v = _linear_value(x_ptr + (n * C + c).to(tl.int64) * d * h * w, r00, r01, r10, r11, w0, w1, ld, lh, lw, m)
        if RELU:
            v = _max_nan(v, 0.0)
        wc = tl.load(wt_ptr + kk * C + c, mask=km, other=0.0)
        acc += wc[:, None] * v[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + kk, mask=km, other=0.0)[:, None]
    out = y_ptr + (n * K + kk[:, None]).to(tl.int64) * D * H * W + p[None, :]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=km[:, None] & m[None, :])


@triton.jit(do_not_specialize=["d", "h", "w", "D", "H", "W"])
def upsample_relu(x_ptr, i0_ptr, i1_ptr, lam_ptr, y_ptr, d, h, w, D, H, W, RELU: tl.constexpr,
                  BLOCK: tl.constexpr):
    """``y[nc, p] = relu(trilinear(x[nc])(p))`` (RELU: with the ReLU) over BLOCK output voxels (program 0: voxel
    block, 1: n·C + c), the interpolation from tables (:func:`_linear_sources`) in float32."""
    pid = tl.program_id(0)
    nc = tl.program_id(1).to(tl.int64)
    p = pid * BLOCK + tl.arange(0, BLOCK)
    m = p < D * H * W
    r00, r01, r10, r11, w0, w1, ld, lh, lw = _linear_sources(i0_ptr, i1_ptr, lam_ptr, p, m, h, w, D, H, W)
    v = _linear_value(x_ptr + nc * d * h * w, r00, r01, r10, r11, w0, w1, ld, lh, lw, m)
    if RELU:
        v = _max_nan(v, 0.0)
    tl.store(y_ptr + nc * D * H * W + p, v.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _row2x(xb, r, c0, c1, m):
    """The two outputs of one input row's cells (columns ``c0``, ``c1``: a cell's two source columns) under a 2× linear
    upsampling with ``align_corners=False``: ``0.75·x[c0] + 0.25·x[c1]`` and ``0.25·x[c0] + 0.75·x[c1]``."""
    a = tl.load(xb + r + c0, mask=m, other=0.0).to(tl.float32)
    b = tl.load(xb + r + c1, mask=m, other=0.0).to(tl.float32)
    return 0.75 * a + 0.25 * b, 0.25 * a + 0.75 * b


@triton.jit
def _plane2x(xb, r0, r1, c0, c1, m):
    """A cell's 2×2 outputs of one input plane (rows ``r0``, ``r1``): output rows 0 and 1, each with the cell's two
    output columns interleaved (element 2i, 2i + 1: cell i's left and right column)."""
    a0, a1 = _row2x(xb, r0, c0, c1, m)
    b0, b1 = _row2x(xb, r1, c0, c1, m)
    return (tl.interleave(0.75 * a0 + 0.25 * b0, 0.75 * a1 + 0.25 * b1),
            tl.interleave(0.25 * a0 + 0.75 * b0, 0.25 * a1 + 0.75 * b1))


@triton.jit
def _cells2x(xb, z0, z1, r0, r1, c0, c1, m, hw, SD: tl.constexpr):
    """A cell's 2×2×2 outputs (SD=2: depth doubled too; SD=1: one depth row, the last two values repeat the first two)
    as (depth, height) = (0, 0), (0, 1), (1, 0), (1, 1), each with its two columns interleaved, float32."""
    p0, p1 = _plane2x(xb + z0 * hw, r0, r1, c0, c1, m)
    if SD == 2:
        q0, q1 = _plane2x(xb + z1 * hw, r0, r1, c0, c1, m)
        return 0.75 * p0 + 0.25 * q0, 0.75 * p1 + 0.25 * q1, 0.25 * p0 + 0.75 * q0, 0.25 * p1 + 0.75 * q1
    return p0, p1, p0, p1


@triton.jit
def _cell_geometry(pid, cz, d, h, w, SD: tl.constexpr, BLOCK: tl.constexpr):
    """Cells of a 2× linear upsampling (``align_corners=False``) of a d×h×w plane stack: cell (cz, cy, cx) lies between
    input voxels c and c + 1 on each doubled axis (c from -1, sources clamped to the volume: the two end outputs copy
    the end inputs) and gives outputs 2c + 1 and 2c + 2. Program ``pid`` takes BLOCK cells of depth row ``cz``
    (SD=1: depth not doubled, cell cz = input row cz). Returns the source offsets (depth rows as plane indices, rows and
    columns as element offsets), the mask of real cells, and the output coordinates: depth (scalar) and, interleaved
    as :func:`_plane2x` gives the values, the height of output row 0 and the columns."""
    q = pid * BLOCK + tl.arange(0, BLOCK)
    m = q < (h + 1) * (w + 1)
    cy = q // (w + 1) - 1
    cx = q % (w + 1) - 1
    if SD == 2:
        z0 = tl.maximum(cz, 0)
        z1 = tl.minimum(cz + 1, d - 1)
        oz = 2 * cz + 1
    else:
        z0 = cz
        z1 = cz
        oz = cz
    r0 = tl.maximum(cy, 0) * w
    r1 = tl.minimum(cy + 1, h - 1) * w
    c0 = tl.maximum(cx, 0)
    c1 = tl.minimum(cx + 1, w - 1)
    oy = tl.interleave(2 * cy + 1, 2 * cy + 1)
    ox = tl.interleave(2 * cx + 1, 2 * cx + 2)
    om = (tl.interleave(q, q) < (h + 1) * (w + 1)) & (ox >= 0) & (ox < 2 * w)  # (interleaving bools: no)
    return z0, z1, r0, r1, c0, c1, m, oz, oy, ox, om


@triton.jit
def _store2x(ptr, v, oz, oy, ox, om, sz: tl.constexpr, sy: tl.constexpr, D, H, W, KM, ROWS: tl.constexpr):
    """Store one (depth, height) sub-position of a block of cells (``v``: (KP, 2·BLOCK) with ROWS, ``KM`` its row
    mask; else (2·BLOCK,)) into the output at ``ptr`` (channel rows already offset)."""
    z = oz + sz + tl.zeros_like(oy)  # a tensor: a scalar's & with a tensor mask gives int32 in the interpreter
    y = oy + sy
    mask = om & (y >= 0) & (y < H) & (z >= 0) & (z < D)
    off = z * H * W + y * W + ox
    if ROWS:
        tl.store(ptr + off[None, :], v.to(ptr.dtype.element_ty), mask=KM & mask[None, :])
    else:
        tl.store(ptr + off, v.to(ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["C", "K", "d", "h", "w"])
def upsample2x_relu_pointwise(x_ptr, wt_ptr, b_ptr, y_ptr, C, K, d, h, w, RELU: tl.constexpr, HAS_BIAS: tl.constexpr,
                              SD: tl.constexpr, KP: tl.constexpr, BLOCK: tl.constexpr):
    """:func:`upsample_relu_pointwise` for an exact 2× upsampling of height and width (and depth: SD=2) with
    ``align_corners=False``: BLOCK cells (:func:`_cell_geometry`; program 0: cell block, 1: depth cell row, 2: n), each
    reading its 2×2×2 source voxels of a channel once for its 8 outputs, with the weights 0.75 and 0.25 as constants
    (the tabled kernel reads 8 sources per output voxel and channel)."""
    cz = tl.program_id(1) - (SD - 1)
    n = tl.program_id(2)
    z0, z1, r0, r1, c0, c1, m, oz, oy, ox, om = _cell_geometry(tl.program_id(0), cz, d, h, w, SD, BLOCK)
    kk = tl.arange(0, KP)
    km = kk < K
    a00 = tl.zeros((KP, 2 * BLOCK), dtype=tl.float32)
    a01, a10, a11 = a00, a00, a00
    for c in range(C):
        v00, v01, v10, v11 = _cells2x(x_ptr + (n * C + c).to(tl.int64) * d * h * w, z0, z1, r0, r1, c0, c1, m, h * w,
                                      SD)
        if RELU:
            v00, v01 = _max_nan(v00, 0.0), _max_nan(v01, 0.0)
            v10, v11 = _max_nan(v10, 0.0), _max_nan(v11, 0.0)
        wc = tl.load(wt_ptr + kk * C + c, mask=km, other=0.0)[:, None]
        a00 += wc * v00[None, :]
        a01 += wc * v01[None, :]
        if SD == 2:
            a10 += wc * v10[None, :]
            a11 += wc * v11[None, :]
    if HAS_BIAS:
        bias = tl.load(b_ptr + kk, mask=km, other=0.0)[:, None]
        a00, a01, a10, a11 = a00 + bias, a01 + bias, a10 + bias, a11 + bias
    D = SD * d
    H = 2 * h
    W = 2 * w
    out = y_ptr + (n * K + kk[:, None]).to(tl.int64) * D * H * W
    _store2x(out, a00, oz, oy, ox, om, 0, 0, D, H, W, km[:, None], True)
    _store2x(out, a01, oz, oy, ox, om, 0, 1, D, H, W, km[:, None], True)
    if SD == 2:
        _store2x(out, a10, oz, oy, ox, om, 1, 0, D, H, W, km[:, None], True)
        _store2x(out, a11, oz, oy, ox, om, 1, 1, D, H, W, km[:, None], True)


@triton.jit(do_not_specialize=["d", "h", "w"])
def upsample2x_relu(x_ptr, y_ptr, d, h, w, RELU: tl.constexpr, SD: tl.constexpr, BLOCK: tl.constexpr):
    """:func:`upsample_relu` for an exact 2× upsampling of height and width (and depth: SD=2) with
    ``align_corners=False`` by cells as in :func:`upsample2x_relu_pointwise` (program 2: n·C + c)."""
    cz = tl.program_id(1) - (SD - 1)
    nc = tl.program_id(2).to(tl.int64)
    z0, z1, r0, r1, c0, c1, m, oz, oy, ox, om = _cell_geometry(tl.program_id(0), cz, d, h, w, SD, BLOCK)
    v00, v01, v10, v11 = _cells2x(x_ptr + nc * d * h * w, z0, z1, r0, r1, c0, c1, m, h * w, SD)
    if RELU:
        v00, v01 = _max_nan(v00, 0.0), _max_nan(v01, 0.0)
        v10, v11 = _max_nan(v10, 0.0), _max_nan(v11, 0.0)
    D = SD * d
    H = 2 * h
    W = 2 * w
    out = y_ptr + nc * D * H * W
    _store2x(out, v00, oz, oy, ox, om, 0, 0, D, H, W, True, False)
    _store2x(out, v01, oz, oy, ox, om, 0, 1, D, H, W, True, False)
    if SD == 2:
        _store2x(out, v10, oz, oy, ox, om, 1, 0, D, H, W, True, False)
        _store2x(out, v11, oz, oy, ox, om, 1, 1, D, H, W, True, False)


@triton.jit
def _up2x_taps(i, n):
    """The four fine positions (clamped to ``[0, 2n)``) whose 2× linear upsampling reads coarse position ``i`` with
    weights 0.25, 0.75, 0.75, 0.25 (``align_corners=False``; the end outputs copy the end inputs, i.e. the clamped
    taps add up to weight 1)."""
    return (tl.maximum(2 * i - 1, 0), 2 * i, 2 * i + 1, tl.minimum(2 * i + 2, 2 * n - 1))


@triton.jit
def _up2x_row(acc, g_row, y_row, c0, c1, c2, c3, m, wt, RELU: tl.constexpr):
    """acc + wt · Σ_x w_x · g[row, c_x] (ReLU: where the forward's output ``y`` is positive) over the 4 column taps."""
    for t in tl.static_range(4):
        col = c0 if t == 0 else (c1 if t == 1 else (c2 if t == 2 else c3))
        wx = 0.25 if (t == 0) | (t == 3) else 0.75
        g = tl.load(g_row + col, mask=m, other=0.0).to(tl.float32)
        if RELU:
            g = tl.where(tl.load(y_row + col, mask=m, other=0.0) > 0, g, 0.0)
        acc += (wt * wx) * g
    return acc


@triton.jit(do_not_specialize=["d", "h", "w"])
def upsample2x_backward(g_ptr, y_ptr, gx_ptr, d, h, w, RELU: tl.constexpr, SD: tl.constexpr, BLOCK: tl.constexpr):
    """The gradient of :func:`upsample2x_relu` (2× linear upsampling, ``align_corners=False``, ReLU where RELU): each
    coarse voxel gathers the 4 (×4 ×4 with depth: SD=2) fine gradients that read it, each separable weight 0.25 or 0.75
    (:func:`_up2x_taps`), masked by ``y > 0`` with RELU (PyTorch's ReLU gradient). Program 0: BLOCK voxels of a
    coarse plane, 1: depth row, 2: n·C + c."""
    pid = tl.program_id(0)
    z = tl.program_id(1)
    nc = tl.program_id(2).to(tl.int64)
    q = pid * BLOCK + tl.arange(0, BLOCK)
    m = q < h * w
    yy = q // w
    xx = q % w
    H = 2 * h
    W = 2 * w
    D = SD * d
    r0, r1, r2, r3 = _up2x_taps(yy, h)
    c0, c1, c2, c3 = _up2x_taps(xx, w)
    gb = g_ptr + nc * D * H * W
    yb = y_ptr + nc * D * H * W
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    if SD == 2:
        z0, z1, z2, z3 = _up2x_taps(z, d)
    else:
        z0, z1, z2, z3 = z, z, z, z
    for tz in tl.static_range(4 if SD == 2 else 1):
        zf = z0 if tz == 0 else (z1 if tz == 1 else (z2 if tz == 2 else z3))
        wz = (0.25 if (tz == 0) | (tz == 3) else 0.75) if SD == 2 else 1.0
        for ty in tl.static_range(4):
            row = r0 if ty == 0 else (r1 if ty == 1 else (r2 if ty == 2 else r3))
            wy = 0.25 if (ty == 0) | (ty == 3) else 0.75
            off = zf.to(tl.int64) * H * W + row * W
            acc = _up2x_row(acc, gb + off, yb + off, c0, c1, c2, c3, m, wz * wy, RELU)
    tl.store(gx_ptr + nc * d * h * w + z * h * w + q, acc.to(gx_ptr.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=["d", "h", "w", "D", "H", "W"])
def max_pool2x(x_ptr, y_ptr, d, h, w, D, H, W, BLOCK: tl.constexpr):
    """``y[nc, p] = max`` of the (up to) 2×2×2 input voxels under output voxel p (kernel 2, stride 2; windows cut by
    the input's end, as ``ceil_mode=True`` cuts them), over BLOCK output voxels (program 0: block, 1: n·C + c)."""
    pid = tl.program_id(0)
    nc = tl.program_id(1).to(tl.int64)
    p = pid * BLOCK + tl.arange(0, BLOCK)
    m = p < D * H * W
    ow = p % W
    oh = (p // W) % H
    od = p // (W * H)
    xb = x_ptr + nc * d * h * w
    best = tl.full((BLOCK,), float("-inf"), tl.float32)
    for i in tl.static_range(8):
        zd = od * 2 + i // 4
        zh = oh * 2 + (i // 2) % 2
        zw = ow * 2 + i % 2
        inside = m & (zd < d) & (zh < h) & (zw < w)
        v = tl.load(xb + (zd * h + zh) * w + zw, mask=inside, other=float("-inf")).to(tl.float32)
        best = tl.where((v > best) | (v != v), v, best)  # NaN propagates, as in PyTorch
    tl.store(y_ptr + nc * D * H * W + p, best.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _stem_branch(a, e, wb_ptr, lo, hi, t, dx: tl.constexpr, r: tl.constexpr, K: tl.constexpr,
                 SKIP: tl.constexpr):
    """``a += wb[t]·e`` where tap ``t`` lies in the branch's centred K³ window: along W decided at compile time, along
    D and H (``lo``, ``hi``: the tap's smallest and largest offset from the centre) by a uniform branch (SKIP) or a
    weight of 0."""
    if (dx - r >= -(K // 2)) & (dx - r <= K // 2) & (K > 0):
        if SKIP:
            if (lo >= -(K // 2)) & (hi <= K // 2):
                a += tl.load(wb_ptr + t) * e
        else:
            a += tl.load(wb_ptr + t, mask=(lo >= -(K // 2)) & (hi <= K // 2), other=0.0) * e
    return a


@triton.jit
def _stem_tap(a0, a1, a2, x0, x1, valid, we_ptr, be_ptr, wb_ptr, lo_e, hi_e, j: tl.constexpr, dz, dy,
              dx: tl.constexpr, CIN: tl.constexpr, HC: tl.constexpr, M: tl.constexpr,
              K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, SKIP: tl.constexpr):
    """Hidden channel ``j``'s expanded activation at tap (dz, dy, dx) of the widest window, ``clamp(we[j]·x + be[j])``
    (0 outside the volume: the MKDC's zero padding), accumulated into every branch whose window holds the tap (along
    W decided at compile time; ``dz``, ``dy`` are loop variables: skipped (SKIP) or a weight of 0 outside the window).
    ``wb``: (3, HC, M³) taps of each branch in the widest window."""
    if j < HC:
        e = tl.load(we_ptr + j * CIN) * x0 + tl.load(be_ptr + j)
        if CIN > 1:
            e += tl.load(we_ptr + j * CIN + 1) * x1
        e = tl.where(valid, tl.minimum(tl.maximum(e, lo_e), hi_e), 0.0)
        r: tl.constexpr = M // 2
        t = (dz * M + dy) * M + dx
        lo = tl.minimum(dz, dy) - r  # the tap's offsets from the centre along D and H
        hi = tl.maximum(dz, dy) - r
        a0 = _stem_branch(a0, e, wb_ptr + j * M * M * M, lo, hi, t, dx, r, K0, SKIP)
        a1 = _stem_branch(a1, e, wb_ptr + (HC + j) * M * M * M, lo, hi, t, dx, r, K1, SKIP)
        a2 = _stem_branch(a2, e, wb_ptr + (2 * HC + j) * M * M * M, lo, hi, t, dx, r, K2, SKIP)
    return a0, a1, a2


@triton.jit
def _stem_hidden(a0, a1, a2, bb_ptr, lo0, hi0, lo1, hi1, lo2, hi2, j: tl.constexpr, HC: tl.constexpr,
                 K1: tl.constexpr, K2: tl.constexpr):
    """Hidden channel ``j`` after the MKDC: Σ_b clamp(a_b + bias_b[j], lo_b, hi_b) (zero when j ≥ HC)."""
    h = tl.zeros_like(a0)
    if j < HC:
        h = _branch_sum(a0, a1, a2, bb_ptr, j, HC, lo0, hi0, lo1, hi1, lo2, hi2, K1, K2)
    return h


@triton.jit(do_not_specialize=["D", "H", "W", "PH", "PW", "TH", "TW", "lo_e", "hi_e", "lo0", "hi0", "lo1", "hi1",
                               "lo2", "hi2"])
def stem_pooled(xp_ptr, we_ptr, be_ptr, wb_ptr, bb_ptr, wo_ptr, bo_ptr, y_ptr, D, H, W, PH, PW, TH, TW,
                lo_e, hi_e, lo0, hi0, lo1, hi1, lo2, hi2,
                CIN: tl.constexpr, HC: tl.constexpr, OC: tl.constexpr, K0: tl.constexpr, K1: tl.constexpr,
                K2: tl.constexpr, M: tl.constexpr, PBH: tl.constexpr, PBW: tl.constexpr, SKIP: tl.constexpr = True):
    """An encoder stage on a few-channel input, 2×2×2 max-pooled, in one pass (inference, norms folded):
    ``y = maxpool(Wo·[Σ_b clamp(DWC_b(e) + b_b), x] + bo)`` with ``e = clamp(We·x + be)``: the MKIR's expand (1×1),
    MKDC (up to three centred cubic depth-wise branches K0..K2 ≤ M, each clamped, summed), channel shuffle + project
    (folded into ``wo``'s column order) and shortcut (``wo``'s last CIN columns) for all OC output channels, of which
    only the pooled values are written. ``xp``: the (CIN-channel) input zero-padded by M//2; every tap's expanded
    value is recomputed from it (CIN·HC multiply-adds) instead of being read from a stored hidden tensor.

    A program takes one pooled depth row of a PBH×PBW pooled tile of sample n: its 8·PBH·PBW full-resolution voxels,
    the 8 voxels under each pooled voxel in 8 blocks of PBH·PBW (so each thread holds a pooled voxel's 8 and the pool
    is a reduction within the thread). SKIP: the narrower branches' taps outside their windows skipped by a uniform
    branch instead of multiplied by a weight of 0 (5³ + 3³ + 1³: 153 instead of 375 multiply-adds per hidden channel).
    """
    tile = tl.program_id(0)
    n = tl.program_id(1)
    tw = tile % TW
    th = (tile // TW) % TH
    pz = tile // (TW * TH)
    P: tl.constexpr = PBH * PBW
    R: tl.constexpr = M // 2
    q = tl.arange(0, 8 * P)
    s = q // P
    p = q % P
    py = th * PBH + p // PBW
    px = tw * PBW + p % PBW
    inside = (py < PH) & (px < PW)
    z = 2 * pz + s // 4
    y = 2 * py + (s // 2) % 2
    x = 2 * px + s % 2
    Hp = H + 2 * R
    Wp = W + 2 * R
    plane = (D + 2 * R) * Hp * Wp
    xs = xp_ptr + (n * CIN).to(tl.int64) * plane + z * Hp * Wp + y * Wp + x
    zero = tl.zeros((8 * P,), dtype=tl.float32)
    a00, a01, a02, a03 = zero, zero, zero, zero  # branch 0, hidden channels 0-3
    a10, a11, a12, a13 = zero, zero, zero, zero
    a20, a21, a22, a23 = zero, zero, zero, zero
    for dz in range(M):  # loops (taps along W unrolled): a kernel of M taps' code, not M³
        vz = (z + dz - R >= 0) & (z + dz - R < D)
        for dy in range(M):
            vzy = vz & (y + dy - R >= 0) & (y + dy - R < H)
            for dx in tl.static_range(M):
                valid = vzy & (x + dx - R >= 0) & (x + dx - R < W)
                off = dz * Hp * Wp + dy * Wp + dx
                x0 = tl.load(xs + off, mask=inside, other=0.0).to(tl.float32)
                x1 = x0
                if CIN > 1:
                    x1 = tl.load(xs + plane + off, mask=inside, other=0.0).to(tl.float32)
                a00, a10, a20 = _stem_tap(a00, a10, a20, x0, x1, valid, we_ptr, be_ptr, wb_ptr, lo_e, hi_e, 0, dz, dy,
                                          dx, CIN, HC, M, K0, K1, K2, SKIP)
                a01, a11, a21 = _stem_tap(a01, a11, a21, x0, x1, valid, we_ptr, be_ptr, wb_ptr, lo_e, hi_e, 1, dz, dy,
                                          dx, CIN, HC, M, K0, K1, K2, SKIP)
                a02, a12, a22 = _stem_tap(a02, a12, a22, x0, x1, valid, we_ptr, be_ptr, wb_ptr, lo_e, hi_e, 2, dz, dy,
                                          dx, CIN, HC, M, K0, K1, K2, SKIP)
                a03, a13, a23 = _stem_tap(a03, a13, a23, x0, x1, valid, we_ptr, be_ptr, wb_ptr, lo_e, hi_e, 3, dz, dy,
                                          dx, CIN, HC, M, K0, K1, K2, SKIP)
    h0 = _stem_hidden(a00, a10, a20, bb_ptr, lo0, hi0, lo1, hi1, lo2, hi2, 0, HC, K1, K2)
    h1 = _stem_hidden(a01, a11, a21, bb_ptr, lo0, hi0, lo1, hi1, lo2, hi2, 1, HC, K1, K2)
    h2 = _stem_hidden(a02, a12, a22, bb_ptr, lo0, hi0, lo1, hi1, lo2, hi2, 2, HC, K1, K2)
    h3 = _stem_hidden(a03, a13, a23, bb_ptr, lo0, hi0, lo1, hi1, lo2, hi2, 3, HC, K1, K2)
    centre = R * Hp * Wp + R * Wp + R
    c0 = tl.load(xs + centre, mask=inside, other=0.0).to(tl.float32)
    c1 = c0
    if CIN > 1:
        c1 = tl.load(xs + plane + centre, mask=inside, other=0.0).to(tl.float32)
    pp = tl.arange(0, P)
    oy = th * PBH + pp // PBW
    ox = tw * PBW + pp % PBW
    PD = D // 2
    yb = y_ptr + (n * OC).to(tl.int64) * PD * PH * PW + pz * PH * PW + oy * PW + ox
    out_mask = (oy < PH) & (ox < PW)
    NW: tl.constexpr = HC + CIN
    for o in tl.static_range(OC):
        v = tl.load(bo_ptr + o) + tl.load(wo_ptr + o * NW) * h0
        if HC > 1:
            v += tl.load(wo_ptr + o * NW + 1) * h1
        if HC > 2:
            v += tl.load(wo_ptr + o * NW + 2) * h2
        if HC > 3:
            v += tl.load(wo_ptr + o * NW + 3) * h3
        v += tl.load(wo_ptr + o * NW + HC) * c0
        if CIN > 1:
            v += tl.load(wo_ptr + o * NW + HC + 1) * c1
        pooled = tl.max(tl.reshape(v, (8, P)), axis=0)
        tl.store(yb + o * PD * PH * PW, pooled.to(y_ptr.dtype.element_ty), mask=out_mask)



@triton.jit
def _max_nan(a, b):
    """max that propagates NaN, as ``torch.amax``."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit(do_not_specialize=["S", "CH", "NCH"])
def plane_stats(x_ptr, sum_ptr, max_ptr, S, CH, NCH, BLOCK: tl.constexpr):
    """Per plane ``nc`` (program 1) and chunk ``k`` of CH voxels (program 0): the sum and the maximum (NaN
    propagating) of its voxels, float32, at ``nc·NCH + k``: Eq. 3's AAP and AMP in one read of x, reduced over the
    NCH chunks by :func:`_channel_hidden`."""
    k = tl.program_id(0)
    nc = tl.program_id(1).to(tl.int64)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    best = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
    end = tl.minimum(k * CH + CH, S)
    for start in range(k * CH, end, BLOCK):
        o = start + tl.arange(0, BLOCK)
        m = o < end
        v = tl.load(x_ptr + nc * S + o, mask=m, other=0.0).to(tl.float32)
        acc += v
        best = _max_nan(best, tl.where(m, v, float("-inf")))
    tl.store(sum_ptr + nc * NCH + k, tl.sum(acc, axis=0))
    tl.store(max_ptr + nc * NCH + k, tl.reduce(best, 0, _max_nan))


@triton.jit
def _channel_hidden(sum_ptr, max_ptr, w1_ptr, n, C, HID, S, NCH, CP: tl.constexpr, HP: tl.constexpr,
                    NP: tl.constexpr):
    """Eq. 3's shared MLP up to its second conv, for sample n: ``ReLU(W1·AAP(x)) + ReLU(W1·AMP(x))`` (HP,) from the
    NCH chunk sums and maxima of :func:`plane_stats` (the second, linear conv is applied once to the sum; ReLU keeps
    NaN, as PyTorch's)."""
    cc = tl.arange(0, CP)
    hh = tl.arange(0, HP)
    kk = tl.arange(0, NP)
    cm = cc < C
    w1 = tl.load(w1_ptr + hh[:, None] * C + cc[None, :], mask=(hh < HID)[:, None] & cm[None, :], other=0.0)
    parts = (n * C + cc)[:, None] * NCH + kk[None, :]
    pm = cm[:, None] & (kk < NCH)[None, :]
    avg = tl.sum(tl.load(sum_ptr + parts, mask=pm, other=0.0), axis=1) / S
    mx = tl.reduce(tl.load(max_ptr + parts, mask=pm, other=float("-inf")), 1, _max_nan)
    mx = tl.where(cm, mx, 0.0)
    return _max_nan(tl.sum(w1 * avg[None, :], axis=1), 0.0) + _max_nan(tl.sum(w1 * mx[None, :], axis=1), 0.0)


@triton.jit(do_not_specialize=["C", "HID", "S", "H", "W", "PD", "PH", "PW", "NCH"])
def cmfa_describe(x_ptr, sum_ptr, max_ptr, w1_ptr, w2_ptr, cw_ptr, desc_ptr, C, HID, S, H, W, PD, PH, PW, NCH,
                  CP: tl.constexpr, HP: tl.constexpr, NP: tl.constexpr, CB: tl.constexpr, BLOCK: tl.constexpr):
    """CMFA's channel attention and the spatial attention's descriptor in one pass over x (program 0: voxel block,
    1: sample n): the weights ``cw = σ(W2·(ReLU(W1·AAP) + ReLU(W1·AMP)))`` (Eq. 3, written by each sample's first
    program) and, over the channels of ``x·cw``, the maximum and the mean (Eq. 4's descriptor) written into the
    interior of ``desc`` (N, 2, D + 2·PD, H + 2·PH, W + 2·PW) (its zero border: the conv's padding); CB channels at a
    time."""
    pid = tl.program_id(0)
    n = tl.program_id(1)
    hsum = _channel_hidden(sum_ptr, max_ptr, w1_ptr, n, C, HID, S, NCH, CP, HP, NP)
    hh = tl.arange(0, HP)
    p = pid * BLOCK + tl.arange(0, BLOCK)
    m = p < S
    dsum = tl.zeros((BLOCK,), dtype=tl.float32)
    dmax = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
    xb = x_ptr + (n * C).to(tl.int64) * S
    for c0 in range(0, C, CB):
        rows = c0 + tl.arange(0, CB)
        rm = rows < C
        w2 = tl.load(w2_ptr + rows[:, None] * HID + hh[None, :], mask=rm[:, None] & (hh < HID)[None, :], other=0.0)
        cw = tl.sigmoid(tl.sum(w2 * hsum[None, :], axis=1))
        if pid == 0:
            tl.store(cw_ptr + n * C + rows, cw, mask=rm)
        mm = rm[:, None] & m[None, :]
        v = tl.load(xb + rows[:, None] * S + p[None, :], mask=mm, other=0.0).to(tl.float32) * cw[:, None]
        dsum += tl.sum(tl.where(mm, v, 0.0), axis=0)
        dmax = _max_nan(dmax, tl.reduce(tl.where(mm, v, float("-inf")), 0, _max_nan))
    Hp = H + 2 * PH
    Wp = W + 2 * PW
    plane = (S // (H * W) + 2 * PD) * Hp * Wp
    z = p // (H * W)
    off = ((z + PD) * Hp + (p // W) % H + PH) * Wp + p % W + PW
    db = desc_ptr + (n * 2).to(tl.int64) * plane
    tl.store(db + off, dmax.to(desc_ptr.dtype.element_ty), mask=m)
    tl.store(db + plane + off, (dsum / C).to(desc_ptr.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=["C", "S"])
def cmfa_apply(x_ptr, cw_ptr, a_ptr, y_ptr, C, S, G: tl.constexpr, CB: tl.constexpr, BLOCK: tl.constexpr):
    """CMFA's output ``x · cw · σ(Σ_g a_g)`` (Eq. 3 then Eq. 4: the spatial attention's conv given as its G summed
    planes ``a`` (N, G, S)), CB channels at a time (program 0: voxel block, 1: sample n)."""
    pid = tl.program_id(0)
    n = tl.program_id(1)
    p = pid * BLOCK + tl.arange(0, BLOCK)
    m = p < S
    ab = a_ptr + (n * G).to(tl.int64) * S
    att = tl.load(ab + p, mask=m, other=0.0).to(tl.float32)
    for g in tl.static_range(1, G):
        att += tl.load(ab + g * S + p, mask=m, other=0.0).to(tl.float32)
    att = tl.sigmoid(att)
    xb = x_ptr + (n * C).to(tl.int64) * S
    yb = y_ptr + (n * C).to(tl.int64) * S
    for c0 in range(0, C, CB):
        rows = c0 + tl.arange(0, CB)
        rm = rows < C
        cw = tl.load(cw_ptr + n * C + rows, mask=rm, other=0.0)
        mm = rm[:, None] & m[None, :]
        off = rows[:, None] * S + p[None, :]
        v = tl.load(xb + off, mask=mm, other=0.0).to(tl.float32) * cw[:, None] * att[None, :]
        tl.store(yb + off, v.to(y_ptr.dtype.element_ty), mask=mm)


@triton.jit(do_not_specialize=["C", "P", "D", "H", "W", "RD", "RH", "RW"])
def pack_pair(u_ptr, s_ptr, xp_ptr, C, P, D, H, W, RD, RH, RW, ROWS: tl.constexpr, BW: tl.constexpr):
    """:func:`gated_skip_sum`'s padded input in one pass: plane ``((n·G + g)·2 + t)·P + j`` of ``xp`` is channel
    ``g·P + j`` of u (t = 0) or s (t = 1), zero-padded by (RD, RH, RW) (program 0: ROWS padded rows of BW ≥ its width,
    1: the plane); every voxel of xp written once (no zero fill before)."""
    q = tl.program_id(1)
    j = q % P
    t = (q // P) % 2
    ng = q // (2 * P)
    G = C // P
    n = ng // G
    c = (ng % G) * P + j
    Hp = H + 2 * RH
    Wp = W + 2 * RW
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # padded rows (depth · Hp + height)
    xo = tl.arange(0, BW)
    z = r // Hp - RD
    y = r % Hp - RH
    x = xo - RW
    m = (r < (D + 2 * RD) * Hp)[:, None] & (xo < Wp)[None, :]
    inside = m & ((z >= 0) & (z < D) & (y >= 0) & (y < H))[:, None] & ((x >= 0) & (x < W))[None, :]
    src = (n * C + c).to(tl.int64) * D * H * W + ((z * H + y) * W)[:, None] + x[None, :]
    if t == 0:
        v = tl.load(u_ptr + src, mask=inside, other=0.0)
    else:
        v = tl.load(s_ptr + src, mask=inside, other=0.0)
    dst = q.to(tl.int64) * (D + 2 * RD) * Hp * Wp + (r * Wp)[:, None] + xo[None, :]
    tl.store(xp_ptr + dst, v.to(xp_ptr.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=["S"])
def gate_apply(u_ptr, s_ptr, g_ptr, wp_ptr, bp_ptr, y_ptr, S, C: tl.constexpr, G: tl.constexpr,
               BLOCK: tl.constexpr):
    """The end of a decoder's skip merge through its grouped attention gate (Eq. 6, norms folded):
    ``y = u + s · σ(bp + Σ_j wp[j] · g[j])`` over BLOCK voxels (program 0) of sample n (program 1), with ``g`` the
    gate's C/P channels after their ReLU (``mkdc_forward_grid`` with IPO = 2P) and u, s of C channels."""
    pid = tl.program_id(0)
    n = tl.program_id(1)
    p = pid * BLOCK + tl.arange(0, BLOCK)
    m = p < S
    gb = g_ptr + (n * G).to(tl.int64) * S
    psi = tl.zeros((BLOCK,), dtype=tl.float32) + tl.load(bp_ptr)
    for j in range(G):
        psi += tl.load(wp_ptr + j) * tl.load(gb + j * S + p, mask=m, other=0.0).to(tl.float32)
    psi = tl.sigmoid(psi)
    ub = u_ptr + (n * C).to(tl.int64) * S
    sb = s_ptr + (n * C).to(tl.int64) * S
    yb = y_ptr + (n * C).to(tl.int64) * S
    for c in range(C):
        u = tl.load(ub + c * S + p, mask=m, other=0.0).to(tl.float32)
        v = tl.load(sb + c * S + p, mask=m, other=0.0).to(tl.float32)
        tl.store(yb + c * S + p, (u + v * psi).to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _min_nan(a, b):
    """min that propagates NaN, as ``torch.clamp``."""
    return tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit(do_not_specialize=["S", "CH", "NCH"])
def bn_stats(z_ptr, part_ptr, S, CH, NCH, BLOCK: tl.constexpr):
    """Per plane ``nc`` (program 1) and chunk ``k`` of CH voxels (program 0): the chunk's mean and sum of squared
    deviations from it (float32, at ``part[nc, k]``), each block's merged into the chunk's by Chan et al.'s formula
    (as Welford's algorithm: no cancellation however far the values lie from 0)."""
    k = tl.program_id(0)
    nc = tl.program_id(1).to(tl.int64)
    n = 0.0
    mean = 0.0
    m2 = 0.0
    end = tl.minimum(k * CH + CH, S)
    for start in range(k * CH, end, BLOCK):
        o = start + tl.arange(0, BLOCK)
        m = o < end
        v = tl.load(z_ptr + nc * S + o, mask=m, other=0.0).to(tl.float32)
        nb = tl.minimum(end - start, BLOCK).to(tl.float32)
        bmean = tl.sum(v, axis=0) / nb
        dev = tl.where(m, v - bmean, 0.0)
        total = n + nb
        delta = bmean - mean
        mean += delta * (nb / total)
        m2 += tl.sum(dev * dev, axis=0) + delta * delta * (n * nb / total)
        n = total
    out = part_ptr + (nc * NCH + k) * 2
    tl.store(out, mean)
    tl.store(out + 1, m2)


@triton.jit
def _channel_sums(part_ptr, c, C, N, NCH, BLOCK: tl.constexpr):
    """Channel ``c``'s two partial sums of the (N, C, NCH, 2) ``part`` of :func:`bn_backward_stats`, each summed over
    samples and chunks in float64."""
    s1 = tl.zeros((BLOCK,), dtype=tl.float64)
    s2 = tl.zeros((BLOCK,), dtype=tl.float64)
    total = N * NCH
    for start in range(0, total, BLOCK):
        i = start + tl.arange(0, BLOCK)
        m = i < total
        row = ((i // NCH) * C + c) * NCH + i % NCH
        s1 += tl.load(part_ptr + row * 2, mask=m, other=0.0).to(tl.float64)
        s2 += tl.load(part_ptr + row * 2 + 1, mask=m, other=0.0).to(tl.float64)
    return tl.sum(s1, axis=0), tl.sum(s2, axis=0)


@triton.jit(do_not_specialize=["C", "N", "NCH", "S", "CH"])
def bn_finalize(part_ptr, w_ptr, b_ptr, rm_ptr, rv_ptr, par_ptr, C, N, NCH, S, CH, momentum, eps,
                HAS_W: tl.constexpr, HAS_B: tl.constexpr, TRACK: tl.constexpr, BLOCK: tl.constexpr):
    """Channel ``c`` (program 0): batch mean and variance from :func:`bn_stats`' chunk means and squared deviations
    (``M2 = Σ M2_k + Σ n_k μ_k² − M μ²``, in float64), the normalisation as ``y = z·a + b`` (``a = γ/σ``,
    ``b = β − μ·a``) into ``par[0..3, c] = (a, b, μ, 1/σ)``, and the running statistics updated as BatchNorm does
    (the unbiased variance, factor ``momentum``)."""
    c = tl.program_id(0)
    s1 = tl.zeros((BLOCK,), dtype=tl.float64)
    s2 = tl.zeros((BLOCK,), dtype=tl.float64)
    s3 = tl.zeros((BLOCK,), dtype=tl.float64)
    total = N * NCH
    for start in range(0, total, BLOCK):
        i = start + tl.arange(0, BLOCK)
        m = i < total
        k = i % NCH
        row = ((i // NCH) * C + c) * NCH + k
        nk = tl.where(m, tl.minimum(CH, S - k * CH), 0).to(tl.float64)
        mk = tl.load(part_ptr + row * 2, mask=m, other=0.0).to(tl.float64)
        s1 += nk * mk
        s2 += nk * mk * mk
        s3 += tl.load(part_ptr + row * 2 + 1, mask=m, other=0.0).to(tl.float64)
    count = N.to(tl.float64) * S
    mean = tl.sum(s1, axis=0) / count
    var = tl.maximum((tl.sum(s3, axis=0) + tl.sum(s2, axis=0) - count * mean * mean) / count, 0.0)
    invstd = 1.0 / tl.sqrt(var + eps)
    a = invstd
    if HAS_W:
        a = a * tl.load(w_ptr + c).to(tl.float64)
    b = -mean * a
    if HAS_B:
        b = b + tl.load(b_ptr + c).to(tl.float64)
    tl.store(par_ptr + c, a.to(tl.float32))
    tl.store(par_ptr + C + c, b.to(tl.float32))
    tl.store(par_ptr + 2 * C + c, mean.to(tl.float32))
    tl.store(par_ptr + 3 * C + c, invstd.to(tl.float32))
    if TRACK:
        rm = tl.load(rm_ptr + c).to(tl.float64)
        rv = tl.load(rv_ptr + c).to(tl.float64)
        tl.store(rm_ptr + c, ((1.0 - momentum) * rm + momentum * mean).to(rm_ptr.dtype.element_ty))
        tl.store(rv_ptr + c, ((1.0 - momentum) * rv + momentum * var * count / (count - 1.0)).to(rv_ptr.dtype.element_ty))


@triton.jit
def _bn_clamp_mask(pre, lo, hi, LO: tl.constexpr, HI: tl.constexpr):
    """Where the activation after the norm passes its gradient: ``lo < pre < hi`` (each bound where it exists)."""
    keep = pre == pre
    if LO:
        keep = keep & (pre > lo)
    if HI:
        keep = keep & (pre < hi)
    return keep


@triton.jit(do_not_specialize=["C", "S"])
def bn_apply(z_ptr, par_ptr, y_ptr, C, S, lo, hi, LO: tl.constexpr, HI: tl.constexpr, BLOCK: tl.constexpr):
    """``y = clamp(z·a + b, lo, hi)`` (each bound where it exists; NaN stays NaN) over BLOCK voxels (program 0) of
    plane ``nc`` (program 1)."""
    nc = tl.program_id(1).to(tl.int64)
    c = nc % C
    a = tl.load(par_ptr + c)
    b = tl.load(par_ptr + C + c)
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = o < S
    v = tl.load(z_ptr + nc * S + o, mask=m, other=0.0).to(tl.float32) * a + b
    if LO:
        v = _max_nan(v, lo)
    if HI:
        v = _min_nan(v, hi)
    tl.store(y_ptr + nc * S + o, v.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=["C", "S", "CH", "NCH"])
def bn_backward_stats(z_ptr, g_ptr, par_ptr, part_ptr, C, S, CH, NCH, lo, hi, LO: tl.constexpr, HI: tl.constexpr,
                      BLOCK: tl.constexpr):
    """Per plane and chunk (as :func:`bn_stats`): ``Σ g'`` and ``Σ g'·x̂`` with ``g'`` the output gradient where the
    activation passes it (:func:`_bn_clamp_mask` of the recomputed ``z·a + b``) and ``x̂ = (z − μ)/σ``."""
    k = tl.program_id(0)
    nc = tl.program_id(1).to(tl.int64)
    c = nc % C
    a = tl.load(par_ptr + c)
    b = tl.load(par_ptr + C + c)
    mean = tl.load(par_ptr + 2 * C + c)
    invstd = tl.load(par_ptr + 3 * C + c)
    s1 = tl.zeros((BLOCK,), dtype=tl.float32)
    s2 = tl.zeros((BLOCK,), dtype=tl.float32)
    end = tl.minimum(k * CH + CH, S)
    for start in range(k * CH, end, BLOCK):
        o = start + tl.arange(0, BLOCK)
        m = o < end
        v = tl.load(z_ptr + nc * S + o, mask=m, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + nc * S + o, mask=m, other=0.0).to(tl.float32)
        g = tl.where(_bn_clamp_mask(v * a + b, lo, hi, LO, HI) & m, g, 0.0)
        s1 += g
        s2 += g * ((v - mean) * invstd)
    out = part_ptr + (nc * NCH + k) * 2
    tl.store(out, tl.sum(s1, axis=0))
    tl.store(out + 1, tl.sum(s2, axis=0))


@triton.jit(do_not_specialize=["C", "N", "NCH", "S"])
def bn_backward_finalize(part_ptr, w_ptr, par_ptr, dw_ptr, db_ptr, C, N, NCH, S, HAS_W: tl.constexpr,
                         BLOCK: tl.constexpr):
    """Channel ``c``: ``dβ = Σ g'``, ``dγ = Σ g'·x̂`` (float32 into ``dw``/``db``) and, for the input gradient,
    ``par[4..6, c] = (mean g', mean g'·x̂, γ/σ)``."""
    c = tl.program_id(0)
    sg, sgx = _channel_sums(part_ptr, c, C, N, NCH, BLOCK)
    count = N.to(tl.float64) * S
    scale = tl.load(par_ptr + 3 * C + c).to(tl.float64)
    if HAS_W:
        scale = scale * tl.load(w_ptr + c).to(tl.float64)
    tl.store(dw_ptr + c, sgx.to(tl.float32))
    tl.store(db_ptr + c, sg.to(tl.float32))
    tl.store(par_ptr + 4 * C + c, (sg / count).to(tl.float32))
    tl.store(par_ptr + 5 * C + c, (sgx / count).to(tl.float32))
    tl.store(par_ptr + 6 * C + c, scale.to(tl.float32))


@triton.jit(do_not_specialize=["C", "S"])
def bn_backward_apply(z_ptr, g_ptr, par_ptr, dz_ptr, C, S, lo, hi, LO: tl.constexpr, HI: tl.constexpr,
                      BLOCK: tl.constexpr):
    """``dz = (γ/σ)·(g' − mean g' − x̂·mean g'·x̂)``, BatchNorm's input gradient with batch statistics."""
    nc = tl.program_id(1).to(tl.int64)
    c = nc % C
    a = tl.load(par_ptr + c)
    b = tl.load(par_ptr + C + c)
    mean = tl.load(par_ptr + 2 * C + c)
    invstd = tl.load(par_ptr + 3 * C + c)
    k1 = tl.load(par_ptr + 4 * C + c)
    k2 = tl.load(par_ptr + 5 * C + c)
    scale = tl.load(par_ptr + 6 * C + c)
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = o < S
    v = tl.load(z_ptr + nc * S + o, mask=m, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + nc * S + o, mask=m, other=0.0).to(tl.float32)
    g = tl.where(_bn_clamp_mask(v * a + b, lo, hi, LO, HI), g, 0.0)
    dz = scale * (g - k1 - (v - mean) * invstd * k2)
    tl.store(dz_ptr + nc * S + o, dz.to(dz_ptr.dtype.element_ty), mask=m)
