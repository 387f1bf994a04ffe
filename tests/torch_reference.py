"""Plain-PyTorch (CPU) reference models for parity tests. TEST-ONLY.

Re-implements, from SPEC.md sections 1-3, the modules of the official DTF code
(``FuchenUSTC/DTF``, which relies on CUDA/CuPy kernels) without any custom kernel,
so that it runs on a CPU in float32 or float64. The ``state_dict()`` keys and
shapes of every model here are exactly those of the official models, which lets
a weight converter be tested against these modules.

Layout is PyTorch's: videos are ``B C T H W``.

Public API:
    DTFBlock(dim, clip_len, K=3, factor_G=16)
    ReferenceResNet(layers=(3, 4, 6, 3), num_classes=400, clip_length=16, early_stride=4,
                    dtf_stages=(1, 2, 3, 4), dropout=0.5, widths=(64, 128, 256, 512))
    ReferenceSwin(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7,
                  img_size=224, clip_length=16, early_stride=4, patch_size=4, mlp_ratio=4.0,
                  num_classes=400, dtf=True, drop_path_rate=0.0, dropout=0.0, in_chans=3)
    randomize_(model, seed)
    swin_block_info(model) -> list of (prefix, effective_shift)
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "FFTLinear",
    "FFTBatchNorm",
    "DTFBlock",
    "Bottleneck",
    "ReferenceResNet",
    "WindowAttention",
    "SwinBlock",
    "PatchMerging",
    "SwinStage",
    "TubeletEmbed",
    "ReferenceSwin",
    "randomize_",
    "swin_block_info",
]


# ---------------------------------------------------------------------------
# DTF block
# ---------------------------------------------------------------------------


class FFTLinear(nn.Module):
    """Complex channel mixing without bias.

    ``complex_weight``: ``[C_out, C_in, 2]`` (real, imag). Input/output: complex ``B C t H W``.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.complex_weight = nn.Parameter(torch.randn(out_features, in_features, 2) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.complex(self.complex_weight[..., 0], self.complex_weight[..., 1])
        return torch.einsum("oc,bcfhw->bofhw", w, x)


class FFTBatchNorm(nn.Module):
    """Affine-free BatchNorm over channels of a complex ``B C t H W`` tensor.

    Real and imaginary parts are treated as extra positions along W (view as real, then
    ``W*2``), exactly as the official module; key prefix ``norm`` holds a ``BatchNorm3d``.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.norm = nn.BatchNorm3d(dim, affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, T, H, W = x.shape
        r = torch.view_as_real(x).reshape(B, C, T, H, W * 2)
        r = self.norm(r).reshape(B, C, T, H, W, 2).contiguous()
        return torch.view_as_complex(r)


class DTFBlock(nn.Module):
    """Dynamic Temporal Filter block (SPEC section 1). Input/output ``B C T H W``, ``T == clip_len``.

    State-dict entries (official names): ``alpha1 [1,C,1,1,1]``, ``bias [1,C,1,1,1]``,
    ``weights_cor [C,T,K,K]`` (fixed, 1/C), ``filter_g.weight [C*t*2//G, (C+K*K)*T, 1, 1]``,
    ``linear1.complex_weight [C,C,2]``, ``norm1.norm.{running_mean,running_var,num_batches_tracked}``.
    """

    def __init__(self, dim: int, clip_len: int = 16, K: int = 3, factor_G: int = 16):
        super().__init__()
        n_freq = clip_len // 2 + 1
        if (dim * n_freq * 2) % factor_G != 0:
            raise ValueError("dim * (clip_len//2+1) * 2 must be divisible by factor_G")
        self.dim = dim
        self.clip_len = clip_len
        self.K = K
        self.factor_G = factor_G
        # Same registration order as the official module.
        self.filter_g = nn.Conv2d((dim + K * K) * clip_len, dim * n_freq * 2 // factor_G,
                                  kernel_size=1, bias=False)
        self.linear1 = FFTLinear(dim, dim)
        self.norm1 = FFTBatchNorm(dim)
        self.alpha1 = nn.Parameter(torch.zeros(1, dim, 1, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, dim, 1, 1, 1))
        self.weights_cor = nn.Parameter(torch.ones(dim, clip_len, K, K) / dim, requires_grad=False)

    def _neighbours(self, x: torch.Tensor):
        """Yield ``(k, n_k)`` where ``n_k[b,c,t,h,w] = x[b,c,t,h+i-K//2,w+j-K//2]`` (zero outside)."""
        K = self.K
        p = K // 2
        H, W = x.shape[-2:]
        xp = F.pad(x, (p, p, p, p))
        for i in range(K):
            for j in range(K):
                yield i * K + j, i, j, xp[..., i:i + H, j:j + W]

    def correlation(self, x: torch.Tensor) -> torch.Tensor:
        """``w_o: B K*K T H W``; frame t against query frame max(t-1, 0), weighted by weights_cor."""
        T = x.shape[2]
        query = x[:, :, [max(t - 1, 0) for t in range(T)]]
        out = []
        for _, i, j, nb in self._neighbours(x):
            wc = self.weights_cor[:, :, i, j][None, :, :, None, None]  # 1 C T 1 1
            out.append((wc * query * nb).sum(dim=1))
        return torch.stack(out, dim=1)

    def aggregation(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """``agg[b,c,t,h,w] = sum_k attn[b,k,t,h,w] * n_k[b,c,t,h,w]``; attn is ``B K*K T H W``."""
        agg = torch.zeros_like(x)
        for k, _, _, nb in self._neighbours(x):
            agg = agg + attn[:, k:k + 1] * nb
        return agg

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, T, H, W = x.shape
        KK = self.K * self.K
        n_freq = T // 2 + 1
        identity = x

        # 1. frame-wise aggregation
        w_o = self.correlation(x)
        agg = self.aggregation(x, torch.softmax(w_o, dim=1))
        shifted = torch.zeros_like(agg)
        shifted[:, :, :-1] = agg[:, :, 1:]  # next frame's aggregation, last frame masked
        x = x + shifted

        # 2. spectrum
        spec = torch.fft.rfft(x, dim=2, norm="ortho")  # B C t H W

        # 3. filter estimator; each output channel repeated factor_G times in place
        g = self.filter_g(torch.cat([x, w_o], dim=1).reshape(B, (C + KK) * T, H, W))
        g = g.unsqueeze(2).expand(B, g.shape[1], self.factor_G, H, W)
        g = g.reshape(B, C, n_freq, 2, H, W)
        filt = torch.complex(g[:, :, :, 0], g[:, :, :, 1])

        # 4-6. modulation, complex channel mixing, FFT batch norm
        y = self.norm1(self.linear1(spec * filt))

        # 7-8. back to time, residual
        out = torch.fft.irfft(y * self.alpha1, n=T, dim=2, norm="ortho")
        return identity + out + self.bias


# ---------------------------------------------------------------------------
# C2D / DTF ResNet
# ---------------------------------------------------------------------------


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck with 1x1x1 / 1x3x3 (stride here) / 1x1x1 convs; optional DTF after conv2."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, clip_len: int = 4, use_dtf: bool = True):
        super().__init__()
        self.conv1 = nn.Conv3d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = nn.Conv3d(planes, planes, kernel_size=[1, 3, 3], stride=[1, stride, stride],
                               padding=[0, 1, 1], bias=False)
        if use_dtf:
            self.dtf_blk = DTFBlock(planes, clip_len=clip_len)
        self.bn2 = nn.BatchNorm3d(planes)
        self.conv3 = nn.Conv3d(planes, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm3d(planes * self.expansion)
        self.relu = nn.ReLU()
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.conv2(out)
        if hasattr(self, "dtf_blk"):
            out = self.dtf_blk(out)
        out = self.relu(self.bn2(out))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ReferenceResNet(nn.Module):
    """C2D ResNet (``dtf_stages=()``) or DTF-Net (DTF in the listed stages, 1-based).

    Input ``B 3 clip_length H W``; output logits ``B num_classes``. ``widths`` are the bottleneck
    planes per stage (the stem has ``widths[0]`` channels); the default is the real ResNet.
    """

    def __init__(self, layers: Sequence[int] = (3, 4, 6, 3), num_classes: int = 400,
                 clip_length: int = 16, early_stride: int = 4,
                 dtf_stages: Sequence[int] = (1, 2, 3, 4), dropout: float = 0.5,
                 widths: Sequence[int] = (64, 128, 256, 512)):
        super().__init__()
        self.early_stride = early_stride
        clip_len = clip_length // early_stride
        self.inplanes = widths[0]
        self.conv1 = nn.Conv3d(3, widths[0], kernel_size=[early_stride, 7, 7],
                               stride=[early_stride, 2, 2], padding=[0, 3, 3], bias=False)
        self.bn1 = nn.BatchNorm3d(widths[0])
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool3d(kernel_size=[1, 3, 3], stride=[1, 2, 2], padding=[0, 1, 1])
        for s, (n_blocks, planes) in enumerate(zip(layers, widths)):
            stage = self._make_stage(planes, n_blocks, stride=1 if s == 0 else 2,
                                     clip_len=clip_len, use_dtf=(s + 1) in tuple(dtf_stages))
            setattr(self, f"layer{s + 1}", stage)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(widths[-1] * Bottleneck.expansion, num_classes)

    def _make_stage(self, planes, n_blocks, stride, clip_len, use_dtf):
        out_planes = planes * Bottleneck.expansion
        downsample = None
        if stride != 1 or self.inplanes != out_planes:
            downsample = nn.Sequential(
                nn.Conv3d(self.inplanes, out_planes, kernel_size=1, stride=[1, stride, stride],
                          bias=False),
                nn.BatchNorm3d(out_planes),
            )
        blocks = [Bottleneck(self.inplanes, planes, stride, downsample, clip_len, use_dtf)]
        self.inplanes = out_planes
        for _ in range(1, n_blocks):
            blocks.append(Bottleneck(self.inplanes, planes, 1, None, clip_len, use_dtf))
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = x.mean(dim=(2, 3, 4))
        return self.fc(self.drop(x))


# ---------------------------------------------------------------------------
# C2D / DTF Swin
# ---------------------------------------------------------------------------


def _to_windows(x: torch.Tensor, ws: int) -> torch.Tensor:
    """``N H W C -> (N*nW) (ws*ws) C`` (windows row-major within each image)."""
    N, H, W, C = x.shape
    x = x.reshape(N, H // ws, ws, W // ws, ws, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws * ws, C)


def _from_windows(win: torch.Tensor, ws: int, H: int, W: int) -> torch.Tensor:
    """Inverse of :func:`_to_windows`: ``(N*nW) (ws*ws) C -> N H W C``."""
    C = win.shape[-1]
    x = win.reshape(-1, H // ws, W // ws, ws, ws, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, H, W, C)


def _relative_position_index(ws: int) -> torch.Tensor:
    """``[ws*ws, ws*ws]`` int64 index into the ``((2ws-1)^2, heads)`` bias table."""
    yy, xx = torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")
    ys, xs = yy.flatten(), xx.flatten()
    dy = ys[:, None] - ys[None, :] + ws - 1
    dx = xs[:, None] - xs[None, :] + ws - 1
    return dy * (2 * ws - 1) + dx


def _shift_mask(H: int, W: int, ws: int, shift: int) -> torch.Tensor:
    """``[nW, ws*ws, ws*ws]`` float mask: 0 within a region, -100 across regions."""
    region = torch.zeros(H, W)
    bounds = ((0, -ws), (-ws, -shift), (-shift, None))
    label = 0
    for hs, he in bounds:
        for wsl, wel in bounds:
            region[slice(hs, he), slice(wsl, wel)] = label
            label += 1
    win = _to_windows(region[None, :, :, None], ws)[..., 0]  # nW, ws*ws
    diff = win[:, None, :] - win[:, :, None]
    return torch.where(diff != 0, torch.tensor(-100.0), torch.tensor(0.0))


class DropPath(nn.Module):
    """Per-sample stochastic depth (identity in eval mode or when ``p == 0``)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


class WindowAttention(nn.Module):
    """Windowed MHSA with relative position bias. Input/output ``(N*nW) (ws*ws) C``."""

    def __init__(self, dim: int, window_size: int, num_heads: int):
        super().__init__()
        self.dim = dim
        self.window_size = window_size
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", _relative_position_index(window_size))
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        Bw, N, C = x.shape
        h = self.num_heads
        qkv = self.qkv(x).reshape(Bw, N, 3, h, C // h).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]
        attn = q @ k.transpose(-2, -1)  # Bw h N N
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        attn = attn + bias.reshape(N, N, h).permute(2, 0, 1)[None]
        if mask is not None:
            nW = mask.shape[0]
            attn = attn.reshape(Bw // nW, nW, h, N, N) + mask[None, :, None]
            attn = attn.reshape(Bw, h, N, N)
        attn = attn.softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(Bw, N, C)
        return self.proj(out)


class Mlp(nn.Module):
    """``fc1 -> exact GELU -> fc2``."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwinBlock(nn.Module):
    """Swin block on tokens ``(B*T') (H*W) C``; with ``dtf=True`` it owns ``conv`` and ``dtf_block``.

    The DTF block runs only where the effective shift is 0, between the attention residual and
    the MLP residual, over ``B C T' H W`` (T' = ``clip_len``).
    """

    def __init__(self, dim: int, input_resolution, num_heads: int, window_size: int = 7,
                 shift_size: int = 0, mlp_ratio: float = 4.0, drop_path: float = 0.0,
                 dtf: bool = False, clip_len: int = 4):
        super().__init__()
        self.dim = dim
        self.input_resolution = tuple(input_resolution)
        if min(self.input_resolution) <= window_size:
            window_size = min(self.input_resolution)
            shift_size = 0
        self.window_size = window_size
        self.shift_size = shift_size
        self.clip_len = clip_len
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        H, W = self.input_resolution
        self.register_buffer("attn_mask",
                             _shift_mask(H, W, window_size, shift_size) if shift_size > 0 else None)
        self.has_dtf = dtf
        if dtf:
            # The official block always owns these two; `conv` is never used.
            self.conv = nn.Conv2d(dim, dim, kernel_size=[1, 3], padding=[0, 1], bias=False)
            self.dtf_block = DTFBlock(dim, clip_len=clip_len)

    def _apply_dtf(self, x: torch.Tensor) -> torch.Tensor:
        NT, L, C = x.shape
        H, W = self.input_resolution
        n = NT // self.clip_len
        v = x.transpose(1, 2).reshape(n, self.clip_len, C, H, W).transpose(1, 2)  # B C T' H W
        v = self.dtf_block(v)
        return v.transpose(1, 2).reshape(NT, C, L).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = self.input_resolution
        N, L, C = x.shape
        ws, s = self.window_size, self.shift_size
        h = self.norm1(x).reshape(N, H, W, C)
        if s > 0:
            h = torch.roll(h, shifts=(-s, -s), dims=(1, 2))
        h = _from_windows(self.attn(_to_windows(h, ws), self.attn_mask), ws, H, W)
        if s > 0:
            h = torch.roll(h, shifts=(s, s), dims=(1, 2))
        x = x + self.drop_path(h.reshape(N, L, C))
        if self.has_dtf and s == 0:
            x = self._apply_dtf(x)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2x2 token merge: concat ``[x(0,0), x(1,0), x(0,1), x(1,1)]`` -> LayerNorm(4C) -> Linear(4C, 2C)."""

    def __init__(self, input_resolution, dim: int):
        super().__init__()
        self.input_resolution = tuple(input_resolution)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = self.input_resolution
        N, L, C = x.shape
        x = x.reshape(N, H, W, C)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x.reshape(N, -1, 4 * C)))


class SwinStage(nn.Module):
    """``blocks`` (shift 0 for even index, ``window//2`` for odd) then optional ``downsample``."""

    def __init__(self, dim, input_resolution, depth, num_heads, window_size, mlp_ratio,
                 drop_paths, downsample: bool, dtf: bool, clip_len: int):
        super().__init__()
        self.blocks = nn.ModuleList([
            SwinBlock(dim, input_resolution, num_heads, window_size,
                      0 if i % 2 == 0 else window_size // 2, mlp_ratio, drop_paths[i],
                      dtf=dtf, clip_len=clip_len)
            for i in range(depth)])
        self.downsample = PatchMerging(input_resolution, dim) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return x if self.downsample is None else self.downsample(x)


class TubeletEmbed(nn.Module):
    """``proj``: Conv3d with bias, kernel = stride = ``(early_stride, p, p)``; no patch norm."""

    def __init__(self, early_stride: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        k = (early_stride, patch_size, patch_size)
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=k, stride=k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``N C es H W -> N (H/p*W/p) D``."""
        return self.proj(x).flatten(2).transpose(1, 2)


class ReferenceSwin(nn.Module):
    """C2D Swin (``dtf=False``) or DTF-Transformer (``dtf=True``).

    Input ``B C T H W`` with ``T == clip_length``; each group of ``early_stride`` consecutive
    frames is one image (batch ``B*T'``). Output logits ``B num_classes`` (per-step logits averaged
    over ``T'``).
    """

    def __init__(self, embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2),
                 num_heads: Sequence[int] = (3, 6, 12, 24), window_size: int = 7,
                 img_size: int = 224, clip_length: int = 16, early_stride: int = 4,
                 patch_size: int = 4, mlp_ratio: float = 4.0, num_classes: int = 400,
                 dtf: bool = True, drop_path_rate: float = 0.0, dropout: float = 0.0,
                 in_chans: int = 3):
        super().__init__()
        self.early_stride = early_stride
        clip_len = clip_length // early_stride
        res = img_size // patch_size
        n = len(depths)
        self.patch_embed = TubeletEmbed(early_stride, patch_size, in_chans, embed_dim)
        total = sum(depths)
        dpr = [drop_path_rate * k / max(total - 1, 1) for k in range(total)]  # linear decay rule
        self.layers = nn.ModuleList()
        for i in range(n):
            start = sum(depths[:i])
            self.layers.append(SwinStage(
                embed_dim * 2 ** i, (res // 2 ** i, res // 2 ** i), depths[i], num_heads[i],
                window_size, mlp_ratio, dpr[start:start + depths[i]],
                downsample=i < n - 1, dtf=dtf, clip_len=clip_len))
        self.num_features = embed_dim * 2 ** (n - 1)
        self.norm = nn.LayerNorm(self.num_features)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(self.num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, T, H, W = x.shape
        es = self.early_stride
        steps = T // es
        x = x.reshape(B, C, steps, es, H, W).transpose(1, 2).reshape(B * steps, C, es, H, W)
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        x = self.norm(x).mean(dim=1)
        x = self.fc(self.drop(x))
        return x.reshape(B, steps, -1).mean(dim=1)


def swin_block_info(model: ReferenceSwin):
    """List of ``(state-dict prefix, effective shift)`` for every Swin block of ``model``."""
    info = []
    for i, layer in enumerate(model.layers):
        for j, blk in enumerate(layer.blocks):
            info.append((f"layers.{i}.blocks.{j}.", blk.shift_size))
    return info


# ---------------------------------------------------------------------------
# Randomisation for parity tests
# ---------------------------------------------------------------------------


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0,
               calib_input: Optional[torch.Tensor] = None) -> nn.Module:
    """Fill every parameter and meaningful buffer of ``model`` with random values, in place.

    Scales: convs and linears ``N(0, 1/fan_in)`` (the ``fc`` head half that), biases
    ``N(0, 0.1^2)``, BN/LN affine ``N(1, 0.2^2)`` / ``N(0, 0.2^2)``, BN ``running_mean``
    ``N(0, 0.3^2)``, ``running_var`` ``U(0.5, 2)``, DTF ``alpha1``/``bias`` ``N(0, 0.5^2)``,
    ``complex_weight`` ``N(0, 1/(2C))`` per part, relative-position tables ``N(0, 0.5^2)``.
    ``weights_cor`` is reset to ``1/C``; ``relative_position_index``, ``attn_mask`` and
    ``num_batches_tracked`` keep their values.

    Random BN statistics do not track the real activation scale, and the DTF branch is cubic in
    its input (correlation x filter x spectrum), so a deep network in eval mode blows up with them.
    For a whole network pass ``calib_input`` (a model input, e.g. ``B 3 T H W``): one eval-mode
    forward pass then sets each BN's running stats, in forward order, to the statistics of its
    actual input, perturbed at random (mean + ``N(0, 0.1^2)``·std, var × ``U(0.8, 1.25)``), which
    keeps activations O(1) at any depth. Returns ``model``.
    """
    gen = torch.Generator().manual_seed(seed)

    def normal_(t: torch.Tensor, mean: float, std: float):
        t.copy_(torch.randn(t.shape, generator=gen, dtype=torch.float64) * std + mean)

    def uniform_(t: torch.Tensor, lo: float, hi: float):
        t.copy_(torch.rand(t.shape, generator=gen, dtype=torch.float64) * (hi - lo) + lo)

    for name, m in model.named_modules():
        if isinstance(m, DTFBlock):
            normal_(m.alpha1, 0.0, 0.5)
            normal_(m.bias, 0.0, 0.5)
            m.weights_cor.fill_(1.0 / m.dim)
        elif isinstance(m, FFTLinear):
            normal_(m.complex_weight, 0.0, 1.0 / math.sqrt(2 * m.in_features))
        elif isinstance(m, (nn.Conv2d, nn.Conv3d)):
            fan_in = m.weight[0].numel()
            normal_(m.weight, 0.0, 1.0 / math.sqrt(fan_in))
            if m.bias is not None:
                normal_(m.bias, 0.0, 0.1)
        elif isinstance(m, nn.Linear):
            std = 1.0 / math.sqrt(m.in_features)
            if name == "fc":
                std *= 0.5
            normal_(m.weight, 0.0, std)
            if m.bias is not None:
                normal_(m.bias, 0.0, 0.1)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            if m.affine:
                normal_(m.weight, 1.0, 0.2)
                normal_(m.bias, 0.0, 0.2)
            if m.track_running_stats:
                normal_(m.running_mean, 0.0, 0.3)
                uniform_(m.running_var, 0.5, 2.0)
        elif isinstance(m, nn.LayerNorm):
            normal_(m.weight, 1.0, 0.2)
            normal_(m.bias, 0.0, 0.2)
        elif isinstance(m, WindowAttention):
            normal_(m.relative_position_bias_table, 0.0, 0.5)
    if calib_input is not None:
        _calibrate_bn_(model, calib_input, gen)
    return model


@torch.no_grad()
def _calibrate_bn_(model: nn.Module, x: torch.Tensor, gen: torch.Generator) -> None:
    """Set BN running stats from one eval-mode forward pass (see :func:`randomize_`)."""

    def set_stats(bn, inputs):
        inp = inputs[0]
        dims = [d for d in range(inp.dim()) if d != 1]
        mean = inp.mean(dim=dims)
        var = inp.var(dim=dims, unbiased=False)
        noise = torch.randn(mean.shape, generator=gen, dtype=torch.float64).to(mean)
        scale = (torch.rand(var.shape, generator=gen, dtype=torch.float64) * 0.45 + 0.8).to(var)
        bn.running_mean.copy_(mean + 0.1 * var.sqrt() * noise)
        bn.running_var.copy_(var * scale)

    hooks = [m.register_forward_pre_hook(set_stats) for m in model.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    was_training = model.training
    model.eval()
    try:
        model(x.to(next(model.parameters()).dtype))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
