"""Float64 NumPy reference of the DTF block, written directly from SPEC section 1. TEST-ONLY.

Deliberately literal: the correlation and the aggregation loop explicitly over the frame ``t``
and the window offsets ``(i, j)``; the filter expansion evaluates the index formula
``filter[b, c, f, r] = g[b, (c*2t + 2f + r) // G]`` element by element.
"""

from __future__ import annotations

import numpy as np

__all__ = ["dtf_block_numpy"]


def _neighbour(frame: np.ndarray, di: int, dj: int) -> np.ndarray:
    """``out[..., h, w] = frame[..., h+di, w+dj]`` where in range, else 0 (zero padding)."""
    H, W = frame.shape[-2:]
    out = np.zeros_like(frame)
    h0, h1 = max(0, -di), min(H, H - di)
    w0, w1 = max(0, -dj), min(W, W - dj)
    if h1 > h0 and w1 > w0:
        out[..., h0:h1, w0:w1] = frame[..., h0 + di:h1 + di, w0 + dj:w1 + dj]
    return out


def dtf_block_numpy(x, filter_weight, complex_weight, alpha, bias, running_mean=None,
                    running_var=None, train=False, K=3, G=16, eps=1e-5, momentum=0.1,
                    weights_cor=None, return_filter=False):
    """DTF block forward in float64.

    Args:
        x: ``B C T H W`` input.
        filter_weight: ``[C*t*2//G, (C+K*K)*T]`` (trailing ``1, 1`` allowed), ``t = T//2+1``.
        complex_weight: ``[C, C, 2]`` (out, in, real/imag).
        alpha, bias: ``[C]`` (any shape with C elements).
        running_mean, running_var: ``[C]`` FFT-BatchNorm statistics (default 0 and 1).
        train: use batch statistics (biased variance) and update the running stats
            PyTorch-style (``momentum``, unbiased variance for ``running_var``).
        weights_cor: optional ``[C, T, K, K]`` correlation weights (default ``1/C``).

        return_filter: also return the estimated filter ``B C t H W`` (complex), last.

    Returns:
        ``out`` (``B C T H W``) in eval mode; ``(out, new_running_mean, new_running_var)`` in
        train mode; with ``return_filter`` the filter follows.
    """
    x = np.asarray(x, dtype=np.float64)
    B, C, T, H, W = x.shape
    KK = K * K
    p = K // 2
    nf = T // 2 + 1
    wf = np.asarray(filter_weight, dtype=np.float64).reshape(-1, (C + KK) * T)
    cw = np.asarray(complex_weight, dtype=np.float64)
    alpha = np.asarray(alpha, dtype=np.float64).reshape(C)
    bias = np.asarray(bias, dtype=np.float64).reshape(C)
    rm = np.zeros(C) if running_mean is None else np.asarray(running_mean, np.float64).reshape(C)
    rv = np.ones(C) if running_var is None else np.asarray(running_var, np.float64).reshape(C)
    wc = (np.full((C, T, K, K), 1.0 / C) if weights_cor is None
          else np.asarray(weights_cor, dtype=np.float64).reshape(C, T, K, K))

    # 1a. correlation w_o[b, i*K+j, t, h, w]
    w_o = np.zeros((B, KK, T, H, W))
    for t in range(T):
        q = x[:, :, max(t - 1, 0)]  # B C H W
        for i in range(K):
            for j in range(K):
                nb = _neighbour(x[:, :, t], i - p, j - p)
                w_o[:, i * K + j, t] = np.einsum("c,bchw,bchw->bhw", wc[:, t, i, j], q, nb)

    # 1b. softmax over the K*K axis
    e = np.exp(w_o - w_o.max(axis=1, keepdims=True))
    a = e / e.sum(axis=1, keepdims=True)

    # 1c. aggregation per frame
    agg = np.zeros_like(x)
    for t in range(T):
        for i in range(K):
            for j in range(K):
                nb = _neighbour(x[:, :, t], i - p, j - p)
                agg[:, :, t] += a[:, None, i * K + j, t] * nb

    # 1d. x'[t] = x[t] + agg[t+1] for t < T-1
    xs = x.copy()
    for t in range(T - 1):
        xs[:, :, t] += agg[:, :, t + 1]

    # 2. spectrum
    S = np.fft.rfft(xs, axis=2, norm="ortho")  # B C nf H W

    # 3. filter estimator
    xc = np.concatenate([xs, w_o], axis=1).reshape(B, (C + KK) * T, H, W)
    g = np.einsum("oi,bihw->bohw", wf, xc)
    filt = np.zeros((B, C, nf, H, W), dtype=np.complex128)
    for c in range(C):
        for f in range(nf):
            re = g[:, (c * 2 * nf + 2 * f + 0) // G]
            im = g[:, (c * 2 * nf + 2 * f + 1) // G]
            filt[:, c, f] = re + 1j * im

    # 4-5. modulation and complex channel mixing
    Wc = cw[..., 0] + 1j * cw[..., 1]
    S2 = np.einsum("oc,bcfhw->bofhw", Wc, S * filt)

    # 6. batch norm over channels, real and imaginary parts as extra positions
    parts = np.stack([S2.real, S2.imag], axis=-1)  # B C nf H W 2
    axes = (0, 2, 3, 4, 5)
    if train:
        n = parts.size // C
        mean = parts.mean(axis=axes)
        var = parts.var(axis=axes)
        new_rm = (1 - momentum) * rm + momentum * mean
        new_rv = (1 - momentum) * rv + momentum * var * n / (n - 1)
    else:
        mean, var = rm, rv
    shape = (1, C, 1, 1, 1, 1)
    parts = (parts - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps)
    S3 = parts[..., 0] + 1j * parts[..., 1]

    # 7-8. back to time and residual
    out = np.fft.irfft(S3 * alpha.reshape(1, C, 1, 1, 1), n=T, axis=2, norm="ortho")
    out = x + out + bias.reshape(1, C, 1, 1, 1)
    extra = (filt,) if return_filter else ()
    if train:
        return (out, new_rm, new_rv) + extra
    return (out,) + extra if return_filter else out
