"""Triton kernels of :mod:`ul3d.networks.depthwise` (imported only when they run: importing Triton takes time).

Both kernels read a zero-padded copy of the input (``k//2`` on each side), so every kernel tap is one load at a fixed
offset from the tile's pointers, with one mask (the output tile's bounds) shared by all taps.
"""

import triton
import triton.language as tl

__all__ = ["dw_forward", "dw_weight_grad"]

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


@triton.jit(do_not_specialize=_INTS)
def dw_forward(xp_ptr, w_ptr, y_ptr, C, D, H, W, TH, TW,
               KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
               BD: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr):
    """y[n, c, p] = Σ_t w[c, t] xp[n, c, p + t] over one tile (program 0: tile, 1: n·C + c); xp is x zero-padded
    by k//2."""
    tile = tl.program_id(0)
    nc = tl.program_id(1)
    c = nc % C
    Hp = H + KH - 1
    Wp = W + KW - 1
    out_off, in_off, mask = _tile(tile, D, H, W, TH, TW, KD, KH, KW, BD, BH, BW)
    xs = xp_ptr + nc.to(tl.int64) * (D + KD - 1) * Hp * Wp + in_off
    ws = w_ptr + c * (KD * KH * KW)
    acc = tl.zeros((BD, BH, BW), dtype=tl.float32)
    for kd in tl.static_range(KD):
        for kh in tl.static_range(KH):
            for kw in tl.static_range(KW):
                wv = tl.load(ws + (kd * KH + kh) * KW + kw).to(tl.float32)
                xv = tl.load(xs + (kd * Hp * Wp + kh * Wp + kw), mask=mask, other=0.0).to(tl.float32)
                acc += wv * xv
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
