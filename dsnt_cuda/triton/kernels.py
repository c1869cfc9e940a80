"""Triton kernels of the fused DSNT transform (csrc/OPS.md, ../shared/DESIGN.md §1-2).

One program per map. A map is `N = SD * SH * SW` contiguous elements (unused leading axes have
size 1); the flat index decomposes as `i = (d * SH + h) * SW + w`. Outputs per map are given in
(x, y, z) order: slot 0 is the W axis, slot 1 the H axis, slot 2 the D axis.

Mode switches are `tl.constexpr` ints, mirroring csrc/dsnt_math.h:
  NORM: 0 softmax, 1 abs, 2 relu, 3 sigmoid, 4 none;  REG: 0 none, 1 js, 2 kl, 3 var.
`ACC` is the accumulation dtype (float32, or float64 when FP64: float64 logits); every element is cast
to it right after `tl.load` (the interpreter cannot do bf16 arithmetic, and it is the right
numerics on the GPU too) and cast back to the logits' dtype on store.

AXIS_BLOCK (next power of 2 of the longest axis, capped) sizes the O(S_k) loops over single axes
that build the Gaussian target's per-axis sums.

Two code paths, chosen by `SINGLE`:
  - the map fits one block: it is loaded once and every reduction runs in registers, with the
    variance computed two-pass about the exact mean;
  - larger maps loop over BLOCK-sized chunks: forward = one online max/sum pass (which also finds
    the argmax) + one pass for moments and regularizer; backward = one reduction pass (sum p G
    and the target-gradient sums) + one write pass. Moments of the looped path are accumulated
    about the argmax, so the variance never comes from E[u^2] - c^2 about a far-away origin
    (sharp maps sit near their argmax, broad maps have a large variance: either way there is no
    catastrophic cancellation).

The variance is in pixel^2 in centred pixel coordinates `u = j - (S-1)/2` (the reference's
definition, equal to dsntnn's normalized-grid variance times (S/2)^2 also for maps that do not
sum to 1); normalized coordinates are then exactly `c = (2/S) * sum p u`.

Scalars `beta` and `sigma_t` arrive as (hi, lo) float32 pairs (Triton passes Python floats as
float32) and are rebuilt as hi + lo in ACC, so float64 runs see them to ~1e-15.
"""

import triton
import triton.language as tl

# dsntnn's epsilon in the logarithms and in the target's normalizer; a normal number in float32.
_EPS = tl.constexpr(1e-24)


@triton.jit
def _rectify(z, NORM: tl.constexpr):
    # abs / relu / sigmoid. relu is written so that NaN propagates (NaN < 0 is false).
    if NORM == 1:
        r = tl.abs(z)
    elif NORM == 2:
        r = tl.where(z < 0, 0.0, z)
    else:
        r = 1.0 / (1.0 + tl.exp(-z))
    return r


@triton.jit
def _rectify_grad(z, NORM: tl.constexpr):
    # r'(z) with autograd's conventions at the kinks: abs'(0) = 0, relu'(0) = 0.
    if NORM == 1:
        g = tl.where(z > 0, 1.0, tl.where(z < 0, -1.0, 0.0))
    elif NORM == 2:
        g = tl.where(z > 0, 1.0, 0.0)
    else:
        s = 1.0 / (1.0 + tl.exp(-z))
        g = s * (1.0 - s)
    return g


@triton.jit
def _probs(z, mask, shift, denom, N, beta, NORM: tl.constexpr):
    # p of a chunk from the per-map normalizer (shift, denom); 0 on masked lanes.
    if NORM == 0:
        # shift = max z. beta (z - shift), never beta z - shift: on a GPU the latter compiles to an
        # fma here but not where denom was summed, and for a large beta z the two roundings put
        # the largest p far from 1 / denom (sum p != 1; inf for logits of 1e30).
        p = tl.exp(beta * (z - shift)) / denom
    elif NORM == 4:
        p = z
    else:
        r = _rectify(z, NORM)
        # A rectified sum of exactly 0 has no preferred location: the uniform map 1/N.
        # (1/N is formed in r's dtype: a float32 1/N would cost float64 maps 1e-8.)
        p = tl.where(denom == 0, (r * 0.0 + 1.0) / N, r / denom)
    return tl.where(mask, p, 0.0)


@triton.jit
def _centred(j, S, ACC: tl.constexpr):
    # u = j - (S - 1)/2 in the accumulation dtype.
    return j.to(ACC) - (S - 1) * 0.5


@triton.jit
def _axis_offset(mu, S, coef):
    # The smallest exponent coef (v(j) - mu)^2 on an axis (0 when mu lies within its pixel
    # centres; NaN stays NaN), taken out of the stored factors so that the largest is ~1: a
    # target a few pixels outside the map otherwise made every factor tiny and the far ones
    # subnormal, and float32 KL's log(q + eps) with q >> eps lost its digits.
    below = (1.0 / S - 1.0) - mu
    above = mu - (1.0 - 1.0 / S)
    dist = tl.where(above > below, above, below)
    dist = tl.where(dist > 0, dist, tl.where(dist != dist, dist, 0.0))
    e0 = coef * dist * dist
    return tl.where(e0 == float("inf"), 0.0, e0)  # an infinite mean: every factor is 0, as unscaled


@triton.jit
def _gauss_axis(mu, S, coef, e0, BLOCK: tl.constexpr, ACC: tl.constexpr):
    # Sums of the scaled 1-D target factor g(j) = exp(-(coef (v(j) - mu)^2 - e0)) over one axis
    # of length S, on the normalized grid: (G = sum g, sum g (v - mu)). O(S) per map.
    lanes = tl.arange(0, BLOCK)
    acc_g = tl.zeros([BLOCK], dtype=ACC)
    acc_gd = tl.zeros([BLOCK], dtype=ACC)
    for start in range(0, S, BLOCK):
        j = start + lanes
        v = (2 * j + 1).to(ACC) / S - 1.0
        dv = v - mu
        g = tl.where(j < S, tl.exp(-(coef * dv * dv - e0)), 0.0)
        acc_g += g
        acc_gd += g * dv
    return tl.sum(acc_g, axis=0), tl.sum(acc_gd, axis=0)


@triton.jit
def _target_exponent(j, S, mu, coef, ACC: tl.constexpr):
    # coef (v(j) - mu)^2 for one axis; the target is exp(-sum over axes) / (prod G + eps).
    v = (2 * j + 1).to(ACC) / S - 1.0
    dv = v - mu
    return coef * dv * dv


@triton.jit
def _target_setup(target_ptr, pid, SD, SH, SW, sigma, NDIM: tl.constexpr, BLOCK: tl.constexpr,
                  ACC: tl.constexpr):
    # Per-map target parameters: means (W, H, D), per-axis coef = 1/(2 s^2) with s = 2 sigma / S,
    # per-axis G and sum g (v - mu) of the factors scaled by exp(e0_k) (_axis_offset), e0 = sum
    # e0_k, and inv_z = exp(-e0) / (prod G_true + eps) = 1 / (prod G + eps exp(e0)), formed in
    # logs (exp(e0) may overflow while q is still far above eps): q = exp(-(e - e0)) inv_z.
    mu_w = tl.load(target_ptr + pid * NDIM).to(ACC)
    # S / (8 sigma^2) * S, not S * S: the sizes are int32, and S * S wraps from S = 46341 on.
    coef_w = SW / (8.0 * sigma * sigma) * SW
    e0_w = _axis_offset(mu_w, SW, coef_w)
    g_w, gd_w = _gauss_axis(mu_w, SW, coef_w, e0_w, BLOCK, ACC)
    e0 = e0_w
    mu_h = mu_w * 0.0
    coef_h = coef_w * 0.0
    g_h = g_w * 0.0 + 1.0
    gd_h = gd_w * 0.0
    mu_d = mu_h
    coef_d = coef_h
    g_d = g_h
    gd_d = gd_h
    if NDIM >= 2:
        mu_h = tl.load(target_ptr + pid * NDIM + 1).to(ACC)
        coef_h = SH / (8.0 * sigma * sigma) * SH
        e0_h = _axis_offset(mu_h, SH, coef_h)
        g_h, gd_h = _gauss_axis(mu_h, SH, coef_h, e0_h, BLOCK, ACC)
        e0 += e0_h
    if NDIM == 3:
        mu_d = tl.load(target_ptr + pid * NDIM + 2).to(ACC)
        coef_d = SD / (8.0 * sigma * sigma) * SD
        e0_d = _axis_offset(mu_d, SD, coef_d)
        g_d, gd_d = _gauss_axis(mu_d, SD, coef_d, e0_d, BLOCK, ACC)
        e0 += e0_d
    total = g_w * g_h * g_d
    a = tl.log(total)
    b = e0 + tl.log(e0 * 0.0 + 1e-24)  # log(eps exp(e0)), in ACC
    hi = tl.maximum(a, b)
    inv_z = tl.exp(-(hi + tl.log(tl.exp(a - hi) + tl.exp(b - hi))))
    return (mu_w, mu_h, mu_d, coef_w, coef_h, coef_d, g_w, g_h, g_d, gd_w, gd_h, gd_d, total, inv_z,
            e0)


@triton.jit
def _target_q(w, h, d, mask, SD, SH, SW, mu_w, mu_h, mu_d, coef_w, coef_h, coef_d, inv_z, e0,
              NDIM: tl.constexpr, ACC: tl.constexpr):
    # q of a chunk, from the separable factors (one exp per element); 0 on masked lanes.
    e = _target_exponent(w, SW, mu_w, coef_w, ACC)
    if NDIM >= 2:
        e += _target_exponent(h, SH, mu_h, coef_h, ACC)
    if NDIM == 3:
        e += _target_exponent(d, SD, mu_d, coef_d, ACC)
    return tl.where(mask, tl.exp(-(e - e0)) * inv_z, 0.0)


@triton.jit
def _divergence(p, q, REG: tl.constexpr):
    # (summand, d summand / dp, d summand / dq) of KL(p||q) (REG 2) or JS(p, q) (REG 1).
    # eps = 1e-24 is added in ACC only, so p = 0 gives 0 * log(eps) = 0, never NaN.
    log_p = tl.log(p + _EPS)
    log_q = tl.log(q + _EPS)
    if REG == 2:
        value = p * (log_p - log_q)
        d_p = log_p - log_q + p / (p + _EPS)
        d_q = -p / (q + _EPS)
    else:
        m = 0.5 * (p + q)
        log_m = tl.log(m + _EPS)
        m_ratio = m / (m + _EPS)
        value = 0.5 * (p * (log_p - log_m) + q * (log_q - log_m))
        d_p = 0.5 * (log_p - log_m + p / (p + _EPS) - m_ratio)
        d_q = 0.5 * (log_q - log_m + q / (q + _EPS) - m_ratio)
    return value, d_p, d_q


@triton.jit
def _split(offs, SH, SW):
    # flat index -> (d, h, w)
    w = offs % SW
    hd = offs // SW
    return hd // SH, hd % SH, w


@triton.jit
def _dsnt_fwd_kernel(
    logits_ptr, target_ptr, coords_ptr, var_ptr, reg_ptr, stats_ptr,
    N, SD, SH, SW,
    beta_hi, beta_lo, sigma_hi, sigma_lo,
    NDIM: tl.constexpr, NORM: tl.constexpr, REG: tl.constexpr, NORMALIZED: tl.constexpr,
    SINGLE: tl.constexpr, BLOCK: tl.constexpr, AXIS_BLOCK: tl.constexpr, FP64: tl.constexpr,
):
    # logits: (maps, N) contiguous, any float dtype; target: (maps, NDIM) ACC (only REG 1/2);
    # coords, var: (maps, NDIM) ACC; reg: (maps,) ACC; stats: (maps, 2) ACC = [shift, denom].
    # Program `pid` handles map `pid`; everything accumulates in ACC.
    ACC: tl.constexpr = tl.float64 if FP64 else tl.float32
    pid = tl.program_id(0).to(tl.int64)
    base = logits_ptr + pid * N
    beta = tl.cast(beta_hi, ACC) + tl.cast(beta_lo, ACC)
    sigma = tl.cast(sigma_hi, ACC) + tl.cast(sigma_lo, ACC)
    lanes = tl.arange(0, BLOCK)
    zero = tl.sum(tl.zeros([BLOCK], dtype=ACC), axis=0)

    if REG == 1 or REG == 2:
        (mu_w, mu_h, mu_d, coef_w, coef_h, coef_d, g_w, g_h, g_d, gd_w, gd_h, gd_d, total,
         inv_z, e0) = _target_setup(target_ptr, pid, SD, SH, SW, sigma, NDIM, AXIS_BLOCK, ACC)

    if SINGLE:
        # ---- the whole map in registers --------------------------------------------------
        mask = lanes < N
        z = tl.load(base + lanes, mask=mask, other=0.0).to(ACC)
        if NORM == 0:
            # max-subtraction keeps exp in range; -inf logits give p = 0; an all -inf or a NaN
            # map gives NaN (as torch.softmax).
            x = tl.where(mask, z, float("-inf"))
            shift = tl.max(x, axis=0)
            denom = tl.sum(tl.where(mask, tl.exp(beta * (x - shift)), 0.0), axis=0)
        elif NORM == 4:
            shift = zero
            denom = zero + 1.0
        else:
            shift = zero
            denom = tl.sum(tl.where(mask, _rectify(z, NORM), 0.0), axis=0)
        p = _probs(z, mask, shift, denom, N, beta, NORM)
        total_p = tl.sum(p, axis=0)
        d, h, w = _split(lanes, SH, SW)
        u_w = _centred(w, SW, ACC)
        cu_w = tl.sum(p * u_w, axis=0)
        var_w = tl.sum(p * (u_w - cu_w) * (u_w - cu_w), axis=0)
        if NDIM >= 2:
            u_h = _centred(h, SH, ACC)
            cu_h = tl.sum(p * u_h, axis=0)
            var_h = tl.sum(p * (u_h - cu_h) * (u_h - cu_h), axis=0)
        if NDIM == 3:
            u_d = _centred(d, SD, ACC)
            cu_d = tl.sum(p * u_d, axis=0)
            var_d = tl.sum(p * (u_d - cu_d) * (u_d - cu_d), axis=0)
        if REG == 1 or REG == 2:
            q = _target_q(w, h, d, mask, SD, SH, SW, mu_w, mu_h, mu_d, coef_w, coef_h, coef_d,
                          inv_z, e0, NDIM, ACC)
            value, d_p, d_q = _divergence(p, q, REG)
            div = tl.sum(tl.where(mask, value, 0.0), axis=0)
    else:
        # ---- pass 1: online normalizer and argmax ------------------------------------------
        m_vec = tl.full([BLOCK], float("-inf"), dtype=ACC)
        s_vec = tl.zeros([BLOCK], dtype=ACC)
        nan_vec = tl.zeros([BLOCK], dtype=ACC)
        idx_vec = tl.zeros([BLOCK], dtype=tl.int32)
        for start in range(0, N, BLOCK):
            offs = start + lanes
            mask = offs < N
            z = tl.load(base + offs, mask=mask, other=0.0).to(ACC)
            if NORM == 0:
                x = tl.where(mask, z, float("-inf"))
                new_m = tl.maximum(m_vec, x)
                # Lanes that have seen only -inf keep (max, sum) = (-inf, 0).
                alpha = tl.where(new_m == float("-inf"), 0.0, tl.exp(beta * (m_vec - new_m)))
                e = tl.where(new_m == float("-inf"), 0.0, tl.exp(beta * (x - new_m)))
                s_vec = s_vec * alpha + e
                # the guards above could hide a NaN logit: remember it explicitly
                nan_vec = tl.where(z != z, z, nan_vec)
            elif NORM == 4:
                x = tl.where(mask, z, float("-inf"))
                new_m = tl.maximum(m_vec, x)
            else:
                r = tl.where(mask, _rectify(z, NORM), 0.0)
                s_vec += r
                x = tl.where(mask, r, float("-inf"))
                new_m = tl.maximum(m_vec, x)
            idx_vec = tl.where(x > m_vec, offs.to(tl.int32), idx_vec)  # N < 2^31 (ops.py)
            m_vec = new_m
        best = tl.max(m_vec, axis=0)
        arg = tl.min(tl.where(m_vec == best, idx_vec, N), axis=0)
        arg = tl.where(arg < N, arg, 0)
        if NORM == 0:
            shift = best
            scale = tl.where(m_vec == float("-inf"), 0.0, tl.exp(beta * (m_vec - best)))
            denom = tl.sum(s_vec * scale, axis=0) + tl.sum(nan_vec, axis=0)
        elif NORM == 4:
            shift = zero
            denom = zero + 1.0
        else:
            shift = zero
            denom = tl.sum(s_vec, axis=0)
        a_d, a_h, a_w = _split(arg, SH, SW)

        # ---- pass 2: moments about the argmax, regularizer ---------------------------------
        p_vec = tl.zeros([BLOCK], dtype=ACC)
        m1_w = tl.zeros([BLOCK], dtype=ACC)
        m2_w = tl.zeros([BLOCK], dtype=ACC)
        m1_h = tl.zeros([BLOCK], dtype=ACC)
        m2_h = tl.zeros([BLOCK], dtype=ACC)
        m1_d = tl.zeros([BLOCK], dtype=ACC)
        m2_d = tl.zeros([BLOCK], dtype=ACC)
        div_vec = tl.zeros([BLOCK], dtype=ACC)
        for start in range(0, N, BLOCK):
            offs = start + lanes
            mask = offs < N
            z = tl.load(base + offs, mask=mask, other=0.0).to(ACC)
            p = _probs(z, mask, shift, denom, N, beta, NORM)
            p_vec += p
            d, h, w = _split(offs, SH, SW)
            t = (w - a_w).to(ACC)
            m1_w += p * t
            m2_w += p * t * t
            if NDIM >= 2:
                t = (h - a_h).to(ACC)
                m1_h += p * t
                m2_h += p * t * t
            if NDIM == 3:
                t = (d - a_d).to(ACC)
                m1_d += p * t
                m2_d += p * t * t
            if REG == 1 or REG == 2:
                q = _target_q(w, h, d, mask, SD, SH, SW, mu_w, mu_h, mu_d, coef_w, coef_h,
                              coef_d, inv_z, e0, NDIM, ACC)
                value, d_p, d_q = _divergence(p, q, REG)
                div_vec += tl.where(mask, value, 0.0)
        total_p = tl.sum(p_vec, axis=0)
        # sum p (u - cu)^2 = m2 - 2 dc m1 + P dc^2, with u - u_a = j - a and dc = cu - u_a.
        m1 = tl.sum(m1_w, axis=0)
        ua = _centred(a_w, SW, ACC)
        cu_w = m1 + ua * total_p
        dc = cu_w - ua
        var_w = tl.sum(m2_w, axis=0) - 2.0 * dc * m1 + total_p * dc * dc
        if NDIM >= 2:
            m1 = tl.sum(m1_h, axis=0)
            ua = _centred(a_h, SH, ACC)
            cu_h = m1 + ua * total_p
            dc = cu_h - ua
            var_h = tl.sum(m2_h, axis=0) - 2.0 * dc * m1 + total_p * dc * dc
        if NDIM == 3:
            m1 = tl.sum(m1_d, axis=0)
            ua = _centred(a_d, SD, ACC)
            cu_d = m1 + ua * total_p
            dc = cu_d - ua
            var_d = tl.sum(m2_d, axis=0) - 2.0 * dc * m1 + total_p * dc * dc
        if REG == 1 or REG == 2:
            div = tl.sum(div_vec, axis=0)

    # ---- outputs ----------------------------------------------------------------------------
    out = pid * NDIM
    # normalized: v = (2/S) u exactly; pixel: j = u + (S-1)/2.
    if NORMALIZED:
        c_w = cu_w * 2.0 / SW
    else:
        c_w = cu_w + (SW - 1) * 0.5 * total_p
    tl.store(coords_ptr + out, c_w)
    tl.store(var_ptr + out, var_w)
    reg_val = zero
    if REG == 3:
        reg_val = (var_w - sigma * sigma) * (var_w - sigma * sigma)
    if NDIM >= 2:
        if NORMALIZED:
            c_h = cu_h * 2.0 / SH
        else:
            c_h = cu_h + (SH - 1) * 0.5 * total_p
        tl.store(coords_ptr + out + 1, c_h)
        tl.store(var_ptr + out + 1, var_h)
        if REG == 3:
            reg_val += (var_h - sigma * sigma) * (var_h - sigma * sigma)
    if NDIM == 3:
        if NORMALIZED:
            c_d = cu_d * 2.0 / SD
        else:
            c_d = cu_d + (SD - 1) * 0.5 * total_p
        tl.store(coords_ptr + out + 2, c_d)
        tl.store(var_ptr + out + 2, var_d)
        if REG == 3:
            reg_val += (var_d - sigma * sigma) * (var_d - sigma * sigma)
    if REG == 1 or REG == 2:
        reg_val = div
    tl.store(reg_ptr + pid, reg_val)
    tl.store(stats_ptr + pid * 2, shift)
    tl.store(stats_ptr + pid * 2 + 1, denom)


@triton.jit
def _grad_p(p, w, h, d, q, SD, SH, SW, gc_w, gc_h, gc_d, nu_w, nu_h, nu_d, cu_w, cu_h, cu_d,
            lin_w, lin_h, lin_d, omega, NDIM: tl.constexpr, REG: tl.constexpr,
            NORMALIZED: tl.constexpr, ACC: tl.constexpr):
    # G = dLoss/dp of a chunk (DESIGN.md §2):
    #   coordinates  gc_k v_k;  variance  nu_k ((u_k - cu_k)^2 - lin_k u_k)  where
    #   lin_k = 2 cu_k (1 - P) is the path through cu_k (non-zero only for `none` maps);
    #   KL / JS  omega * d summand / dp.
    u = _centred(w, SW, ACC)
    if NORMALIZED:
        v = u * 2.0 / SW
    else:
        v = w.to(ACC)
    G = gc_w * v + nu_w * ((u - cu_w) * (u - cu_w) - lin_w * u)
    if NDIM >= 2:
        u = _centred(h, SH, ACC)
        if NORMALIZED:
            v = u * 2.0 / SH
        else:
            v = h.to(ACC)
        G += gc_h * v + nu_h * ((u - cu_h) * (u - cu_h) - lin_h * u)
    if NDIM == 3:
        u = _centred(d, SD, ACC)
        if NORMALIZED:
            v = u * 2.0 / SD
        else:
            v = d.to(ACC)
        G += gc_d * v + nu_d * ((u - cu_d) * (u - cu_d) - lin_d * u)
    if REG == 1 or REG == 2:
        value, d_p, d_q = _divergence(p, q, REG)
        G += omega * d_p
    return G


@triton.jit
def _target_grad_terms(p, q, w, h, d, SD, SH, SW, mu_w, mu_h, mu_d, REG: tl.constexpr,
                       NDIM: tl.constexpr, ACC: tl.constexpr):
    # t = (d summand / dq) * q and t * (v_k - mu_k): the pieces of dLoss/dmu (DESIGN.md §2).
    value, d_p, d_q = _divergence(p, q, REG)
    t = d_q * q
    t_w = t * ((2 * w + 1).to(ACC) / SW - 1.0 - mu_w)
    t_h = t * 0.0
    t_d = t * 0.0
    if NDIM >= 2:
        t_h = t * ((2 * h + 1).to(ACC) / SH - 1.0 - mu_h)
    if NDIM == 3:
        t_d = t * ((2 * d + 1).to(ACC) / SD - 1.0 - mu_d)
    return t, t_w, t_h, t_d


@triton.jit
def _centred_means(c_w, c_h, c_d, total_p, SD, SH, SW, NORM: tl.constexpr, NORMALIZED: tl.constexpr):
    # cu_k = sum p u_k from the saved coordinates (normalized: c = (2/S) cu; pixel:
    # c = cu + (S-1)/2 P), and lin_k = 2 cu_k (1 - P), the variance's path through cu_k, which
    # is non-zero only for `none` maps.
    if NORMALIZED:
        cu_w = c_w * SW * 0.5
        cu_h = c_h * SH * 0.5
        cu_d = c_d * SD * 0.5
    else:
        cu_w = c_w - (SW - 1) * 0.5 * total_p
        cu_h = c_h - (SH - 1) * 0.5 * total_p
        cu_d = c_d - (SD - 1) * 0.5 * total_p
    lin_w = total_p * 0.0
    lin_h = lin_w
    lin_d = lin_w
    if NORM == 4:
        lin_w = 2.0 * cu_w * (1.0 - total_p)
        lin_h = 2.0 * cu_h * (1.0 - total_p)
        lin_d = 2.0 * cu_d * (1.0 - total_p)
    return cu_w, cu_h, cu_d, lin_w, lin_h, lin_d


@triton.jit
def _grad_z(z, p, G, pg, beta, denom, NORM: tl.constexpr):
    # dLoss/dz from G = dLoss/dp and pg = sum p G: softmax beta p (G - pg); rectified
    # r'(z)/R (G - pg), 0 for a uniform-fallback map (R = 0); `none` G itself.
    if NORM == 4:
        gz = G
    elif NORM == 0:
        gz = beta * p * (G - pg)
    else:
        gz = tl.where(denom == 0, 0.0, _rectify_grad(z, NORM) / denom * (G - pg))
    return gz


@triton.jit
def _dsnt_bwd_kernel(
    gcoords_ptr, gvar_ptr, greg_ptr, logits_ptr, target_ptr, coords_ptr, var_ptr, stats_ptr,
    glogits_ptr, gtarget_ptr,
    N, SD, SH, SW,
    beta_hi, beta_lo, sigma_hi, sigma_lo,
    NDIM: tl.constexpr, NORM: tl.constexpr, REG: tl.constexpr, NORMALIZED: tl.constexpr,
    TARGET_GRAD: tl.constexpr, SINGLE: tl.constexpr, BLOCK: tl.constexpr,
    AXIS_BLOCK: tl.constexpr, FP64: tl.constexpr,
):
    # Upstream grads gcoords, gvar: (maps, NDIM) ACC; greg: (maps,) ACC (zeros when absent).
    # logits: (maps, N) contiguous; coords, var: (maps, NDIM) ACC; stats: (maps, 2) ACC.
    # Writes glogits: (maps, N) in the logits' dtype; gtarget: (maps, NDIM) ACC (TARGET_GRAD).
    # Program `pid` handles map `pid`. p is recomputed from the logits and stats, never saved.
    ACC: tl.constexpr = tl.float64 if FP64 else tl.float32
    pid = tl.program_id(0).to(tl.int64)
    base = logits_ptr + pid * N
    gbase = glogits_ptr + pid * N
    beta = tl.cast(beta_hi, ACC) + tl.cast(beta_lo, ACC)
    sigma = tl.cast(sigma_hi, ACC) + tl.cast(sigma_lo, ACC)
    lanes = tl.arange(0, BLOCK)
    zero = tl.sum(tl.zeros([BLOCK], dtype=ACC), axis=0)
    out = pid * NDIM
    shift = tl.load(stats_ptr + pid * 2)
    denom = tl.load(stats_ptr + pid * 2 + 1)
    omega = tl.load(greg_ptr + pid)

    # per-axis upstream grads; the variance regularizer adds 2 omega (var_k - sigma^2)
    gc_w = tl.load(gcoords_ptr + out)
    nu_w = tl.load(gvar_ptr + out)
    c_w = tl.load(coords_ptr + out)
    if REG == 3:
        nu_w += 2.0 * omega * (tl.load(var_ptr + out) - sigma * sigma)
    gc_h = zero
    nu_h = zero
    c_h = zero
    gc_d = zero
    nu_d = zero
    c_d = zero
    if NDIM >= 2:
        gc_h = tl.load(gcoords_ptr + out + 1)
        nu_h = tl.load(gvar_ptr + out + 1)
        c_h = tl.load(coords_ptr + out + 1)
        if REG == 3:
            nu_h += 2.0 * omega * (tl.load(var_ptr + out + 1) - sigma * sigma)
    if NDIM == 3:
        gc_d = tl.load(gcoords_ptr + out + 2)
        nu_d = tl.load(gvar_ptr + out + 2)
        c_d = tl.load(coords_ptr + out + 2)
        if REG == 3:
            nu_d += 2.0 * omega * (tl.load(var_ptr + out + 2) - sigma * sigma)

    mu_w = zero
    mu_h = zero
    mu_d = zero
    coef_w = zero
    coef_h = zero
    coef_d = zero
    inv_z = zero
    e0 = zero
    if REG == 1 or REG == 2:
        (mu_w, mu_h, mu_d, coef_w, coef_h, coef_d, g_w, g_h, g_d, gd_w, gd_h, gd_d, total,
         inv_z, e0) = _target_setup(target_ptr, pid, SD, SH, SW, sigma, NDIM, AXIS_BLOCK, ACC)

    # The centred means cu_k come from the saved coordinates; for `none` maps they also need
    # P = sum p, known only after a reduction (P = 1 for every other mode).
    if SINGLE:
        mask = lanes < N
        z = tl.load(base + lanes, mask=mask, other=0.0).to(ACC)
        p = _probs(z, mask, shift, denom, N, beta, NORM)
        d, h, w = _split(lanes, SH, SW)
        q = p
        if REG == 1 or REG == 2:
            q = _target_q(w, h, d, mask, SD, SH, SW, mu_w, mu_h, mu_d, coef_w, coef_h, coef_d,
                          inv_z, e0, NDIM, ACC)
        total_p = zero + 1.0
        if NORM == 4:
            total_p = tl.sum(p, axis=0)
        cu_w, cu_h, cu_d, lin_w, lin_h, lin_d = _centred_means(c_w, c_h, c_d, total_p, SD, SH, SW,
                                                               NORM, NORMALIZED)
        G = _grad_p(p, w, h, d, q, SD, SH, SW, gc_w, gc_h, gc_d, nu_w, nu_h, nu_d, cu_w, cu_h,
                    cu_d, lin_w, lin_h, lin_d, omega, NDIM, REG, NORMALIZED, ACC)
        pg = zero
        if NORM != 4:
            pg = tl.sum(tl.where(mask, p * G, 0.0), axis=0)
        gz = _grad_z(z, p, G, pg, beta, denom, NORM)
        tl.store(gbase + lanes, gz.to(glogits_ptr.dtype.element_ty), mask=mask)
        if TARGET_GRAD:
            t, t_w, t_h, t_d = _target_grad_terms(p, q, w, h, d, SD, SH, SW, mu_w, mu_h, mu_d,
                                                  REG, NDIM, ACC)
            s_t = tl.sum(tl.where(mask, t, 0.0), axis=0)
            s_w = tl.sum(tl.where(mask, t_w, 0.0), axis=0)
            s_h = tl.sum(tl.where(mask, t_h, 0.0), axis=0)
            s_d = tl.sum(tl.where(mask, t_d, 0.0), axis=0)
    else:
        # ---- pass 1: sum p G (`none`: sum p), and the target-gradient sums ------------------
        total_p = zero + 1.0
        cu_w, cu_h, cu_d, lin_w, lin_h, lin_d = _centred_means(c_w, c_h, c_d, total_p, SD, SH, SW,
                                                               NORM, NORMALIZED)
        red_vec = tl.zeros([BLOCK], dtype=ACC)
        st_vec = tl.zeros([BLOCK], dtype=ACC)
        sw_vec = tl.zeros([BLOCK], dtype=ACC)
        sh_vec = tl.zeros([BLOCK], dtype=ACC)
        sd_vec = tl.zeros([BLOCK], dtype=ACC)
        for start in range(0, N, BLOCK):
            offs = start + lanes
            mask = offs < N
            z = tl.load(base + offs, mask=mask, other=0.0).to(ACC)
            p = _probs(z, mask, shift, denom, N, beta, NORM)
            d, h, w = _split(offs, SH, SW)
            q = p
            if REG == 1 or REG == 2:
                q = _target_q(w, h, d, mask, SD, SH, SW, mu_w, mu_h, mu_d, coef_w, coef_h, coef_d,
                              inv_z, e0, NDIM, ACC)
            if NORM == 4:
                red_vec += p
            else:
                G = _grad_p(p, w, h, d, q, SD, SH, SW, gc_w, gc_h, gc_d, nu_w, nu_h, nu_d, cu_w,
                            cu_h, cu_d, lin_w, lin_h, lin_d, omega, NDIM, REG, NORMALIZED, ACC)
                red_vec += tl.where(mask, p * G, 0.0)
            if TARGET_GRAD:
                t, t_w, t_h, t_d = _target_grad_terms(p, q, w, h, d, SD, SH, SW, mu_w, mu_h, mu_d,
                                                      REG, NDIM, ACC)
                st_vec += tl.where(mask, t, 0.0)
                sw_vec += tl.where(mask, t_w, 0.0)
                sh_vec += tl.where(mask, t_h, 0.0)
                sd_vec += tl.where(mask, t_d, 0.0)
        pg = zero
        if NORM == 4:
            total_p = tl.sum(red_vec, axis=0)
            cu_w, cu_h, cu_d, lin_w, lin_h, lin_d = _centred_means(c_w, c_h, c_d, total_p, SD, SH,
                                                                   SW, NORM, NORMALIZED)
        else:
            pg = tl.sum(red_vec, axis=0)
        s_t = tl.sum(st_vec, axis=0)
        s_w = tl.sum(sw_vec, axis=0)
        s_h = tl.sum(sh_vec, axis=0)
        s_d = tl.sum(sd_vec, axis=0)
        # ---- pass 2: write dLoss/dz -------------------------------------------------------------
        for start in range(0, N, BLOCK):
            offs = start + lanes
            mask = offs < N
            z = tl.load(base + offs, mask=mask, other=0.0).to(ACC)
            p = _probs(z, mask, shift, denom, N, beta, NORM)
            d, h, w = _split(offs, SH, SW)
            q = p
            if REG == 1 or REG == 2:
                q = _target_q(w, h, d, mask, SD, SH, SW, mu_w, mu_h, mu_d, coef_w, coef_h, coef_d,
                              inv_z, e0, NDIM, ACC)
            G = _grad_p(p, w, h, d, q, SD, SH, SW, gc_w, gc_h, gc_d, nu_w, nu_h, nu_d, cu_w, cu_h,
                        cu_d, lin_w, lin_h, lin_d, omega, NDIM, REG, NORMALIZED, ACC)
            gz = _grad_z(z, p, G, pg, beta, denom, NORM)
            tl.store(gbase + offs, gz.to(glogits_ptr.dtype.element_ty), mask=mask)

    if TARGET_GRAD:
        # dLoss/dmu_k = omega / s_k^2 * sum_i t_i (v_k - mu_k - f (mu~_k - mu_k)), with
        # mu~_k - mu_k = sum g (v - mu) / G_k the target's own mean offset along the axis and
        # f = prod G / (prod G + eps) from the normalizer. A target so far outside the map that
        # G_k underflows has q = 0 everywhere: its gradient is 0, not 0/0.
        f = total * inv_z
        off_w = tl.where(g_w > 0, gd_w / g_w, 0.0)
        tl.store(gtarget_ptr + out, omega * 2.0 * coef_w * (s_w - f * off_w * s_t))
        if NDIM >= 2:
            off_h = tl.where(g_h > 0, gd_h / g_h, 0.0)
            tl.store(gtarget_ptr + out + 1, omega * 2.0 * coef_h * (s_h - f * off_h * s_t))
        if NDIM == 3:
            off_d = tl.where(g_d > 0, gd_d / g_d, 0.0)
            tl.store(gtarget_ptr + out + 2, omega * 2.0 * coef_d * (s_d - f * off_d * s_t))
