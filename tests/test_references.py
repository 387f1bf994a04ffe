"""Self-checks of the test-only references (torch_reference.py, numpy_reference.py)."""

import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from numpy_reference import dtf_block_numpy  # noqa: E402
from torch_reference import (  # noqa: E402
    DTFBlock,
    ReferenceResNet,
    ReferenceSwin,
    randomize_,
    swin_block_info,
)


def _n_params(model):
    return sum(p.numel() for p in model.parameters())


def _np(t):
    return t.detach().double().numpy().copy()


def _numpy_args(blk):
    return dict(
        filter_weight=_np(blk.filter_g.weight),
        complex_weight=_np(blk.linear1.complex_weight),
        alpha=_np(blk.alpha1).reshape(-1),
        bias=_np(blk.bias).reshape(-1),
        running_mean=_np(blk.norm1.norm.running_mean),
        running_var=_np(blk.norm1.norm.running_var),
        weights_cor=_np(blk.weights_cor),
    )


def _random_block(C, T, seed):
    blk = randomize_(DTFBlock(C, clip_len=T), seed)
    x = torch.randn(2, C, T, 5, 6, generator=torch.Generator().manual_seed(seed + 100))
    return blk, x


# ---------------------------------------------------------------------------
# DTF block: torch reference vs numpy reference
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("C,T", [(16, 4), (8, 5), (8, 8), (8, 1)])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_dtf_block_eval_matches_numpy(C, T, dtype, tol):
    blk, x = _random_block(C, T, seed=C + T)
    blk = blk.to(dtype).eval()
    with torch.no_grad():
        y = blk(x.to(dtype))
    ref = dtf_block_numpy(_np(x), **_numpy_args(blk))
    # the FFT branch must actually contribute
    assert np.abs(ref - _np(x)).max() > 0.1
    np.testing.assert_allclose(_np(y), ref, rtol=tol, atol=tol * 10)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_dtf_block_train_matches_numpy(dtype, tol):
    blk, x = _random_block(16, 4, seed=7)
    blk = blk.to(dtype).train()
    args = _numpy_args(blk)
    with torch.no_grad():
        y = blk(x.to(dtype))
    ref, rm, rv = dtf_block_numpy(_np(x), train=True, **args)
    np.testing.assert_allclose(_np(y), ref, rtol=tol, atol=tol * 10)
    np.testing.assert_allclose(_np(blk.norm1.norm.running_mean), rm, rtol=tol, atol=tol)
    np.testing.assert_allclose(_np(blk.norm1.norm.running_var), rv, rtol=tol, atol=tol)
    assert int(blk.norm1.norm.num_batches_tracked) == 1


def test_dtf_block_uses_weights_cor():
    blk, x = _random_block(16, 4, seed=3)
    blk = blk.double().eval()
    with torch.no_grad():
        y0 = blk(x.double())
        blk.weights_cor.copy_(torch.rand(blk.weights_cor.shape, dtype=torch.float64) / 4)
        y1 = blk(x.double())
    assert (y1 - y0).abs().max() > 1e-3
    ref = dtf_block_numpy(_np(x), **_numpy_args(blk))
    np.testing.assert_allclose(_np(y1), ref, rtol=1e-10, atol=1e-9)


def test_numpy_weights_cor_default_is_one_over_c():
    blk, x = _random_block(8, 4, seed=11)
    args = _numpy_args(blk)
    args.pop("weights_cor")
    np.testing.assert_allclose(
        dtf_block_numpy(_np(x), **args),
        dtf_block_numpy(_np(x), weights_cor=np.full((8, 4, 3, 3), 1 / 8), **args))


@pytest.mark.parametrize("train", [False, True])
def test_dtf_block_identity_at_init(train):
    blk, x = _random_block(16, 4, seed=5)  # random filter, mixing and BN stats
    with torch.no_grad():
        blk.alpha1.zero_()
        blk.bias.zero_()
        y = blk.train(train)(x)
    assert torch.equal(y, x)


def test_dtf_block_official_shapes():
    sd = DTFBlock(64, clip_len=4).state_dict()
    expected = {
        "alpha1": (1, 64, 1, 1, 1),
        "bias": (1, 64, 1, 1, 1),
        "weights_cor": (64, 4, 3, 3),
        "filter_g.weight": (24, 292, 1, 1),
        "linear1.complex_weight": (64, 64, 2),
        "norm1.norm.running_mean": (64,),
        "norm1.norm.running_var": (64,),
        "norm1.norm.num_batches_tracked": (),
    }
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    blk = DTFBlock(64, clip_len=4)
    assert not blk.weights_cor.requires_grad
    assert torch.all(blk.alpha1 == 0) and torch.all(blk.bias == 0)


# ---------------------------------------------------------------------------
# ResNet: official naming and parameter counts (meta device: no memory, no init cost)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("layers,clip_length,dtf_stages,expected", [
    ((3, 4, 6, 3), 16, (), 24_355_856),
    ((3, 4, 6, 3), 16, (1, 2, 3, 4), 28_951_472),
    ((3, 4, 6, 3), 32, (1, 2, 3, 4), 33_607_504),
    ((3, 4, 6, 3), 64, (1, 2, 3, 4), 50_668_304),
    ((3, 4, 23, 3), 16, (), 43_347_984),
    ((3, 4, 23, 3), 16, (1, 2, 3, 4), 52_067_120),
    ((3, 4, 23, 3), 64, (1, 2, 3, 4), 93_283_088),
])
def test_resnet_parameter_counts(layers, clip_length, dtf_stages, expected):
    with torch.device("meta"):
        m = ReferenceResNet(layers=layers, num_classes=400, clip_length=clip_length,
                            dtf_stages=dtf_stages)
    assert _n_params(m) == expected


def test_resnet_state_dict_keys():
    with torch.device("meta"):
        sd = ReferenceResNet(num_classes=400, clip_length=16).state_dict()
        c2d = ReferenceResNet(num_classes=400, dtf_stages=()).state_dict()
        trainable = sum(p.numel() for p in ReferenceResNet(num_classes=400).parameters()
                        if p.requires_grad)
    assert trainable == 28_815_536
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert shapes["conv1.weight"] == (64, 3, 4, 7, 7)
    assert shapes["bn1.running_var"] == (64,)
    assert shapes["layer1.0.dtf_blk.filter_g.weight"] == (24, 292, 1, 1)
    assert shapes["layer1.0.dtf_blk.weights_cor"] == (64, 4, 3, 3)
    assert shapes["layer1.0.downsample.0.weight"] == (256, 64, 1, 1, 1)
    assert shapes["layer2.0.conv2.weight"] == (128, 128, 1, 3, 3)
    assert shapes["layer2.0.downsample.1.running_mean"] == (512,)
    assert shapes["layer4.2.dtf_blk.linear1.complex_weight"] == (512, 512, 2)
    assert shapes["layer4.2.dtf_blk.norm1.norm.num_batches_tracked"] == ()
    assert shapes["layer4.2.bn3.weight"] == (2048,)
    assert shapes["fc.weight"] == (400, 2048)
    assert "layer1.1.downsample.0.weight" not in shapes
    # C2D = DTF-Net minus the dtf_blk entries
    assert set(c2d) == {k for k in sd if ".dtf_blk." not in k}
    assert not any("pool" in k or "drop" in k for k in sd)


def test_tiny_resnet_forward_and_zero_alpha_equals_c2d():
    kw = dict(layers=(1, 2, 1, 1), num_classes=10, clip_length=8, early_stride=2,
              widths=(8, 8, 16, 16), dropout=0.5)
    x = torch.randn(2, 3, 8, 32, 32, dtype=torch.float64)
    dtf = randomize_(ReferenceResNet(dtf_stages=(1, 2, 3, 4), **kw).double(), 0, x).eval()
    c2d = ReferenceResNet(dtf_stages=(), **kw).double().eval()
    c2d.load_state_dict({k: v for k, v in dtf.state_dict().items() if ".dtf_blk." not in k})
    with torch.no_grad():
        y = dtf(x)
        assert y.shape == (2, 10) and torch.isfinite(y).all()
        assert (y - c2d(x)).abs().max() > 1e-3
        for m in dtf.modules():
            if isinstance(m, DTFBlock):
                m.alpha1.zero_()
                m.bias.zero_()
        torch.testing.assert_close(dtf(x), c2d(x), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------
# Swin: official naming and parameter counts
# ---------------------------------------------------------------------------

SWIN_B = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=7,
              img_size=224, num_classes=400)


def test_swin_b_counts_and_keys():
    with torch.device("meta"):
        c2d = ReferenceSwin(dtf=False, clip_length=64, **SWIN_B)
        dtf = ReferenceSwin(dtf=True, clip_length=64, **SWIN_B)
    assert _n_params(c2d) == 87_171_400
    sd = {k: tuple(v.shape) for k, v in c2d.state_dict().items()}
    assert sd["patch_embed.proj.weight"] == (128, 3, 4, 4, 4)
    assert sd["patch_embed.proj.bias"] == (128,)
    assert not any(k.startswith("patch_embed.norm") for k in sd)
    assert sd["layers.0.blocks.0.attn.relative_position_bias_table"] == (169, 4)
    assert sd["layers.0.blocks.0.attn.relative_position_index"] == (49, 49)
    assert sd["layers.0.blocks.0.attn.qkv.weight"] == (384, 128)
    assert sd["layers.0.blocks.1.attn_mask"] == (64, 49, 49)
    assert "layers.0.blocks.0.attn_mask" not in sd
    assert "layers.3.blocks.1.attn_mask" not in sd  # 7x7 tokens: shift forced to 0
    assert sd["layers.2.blocks.17.mlp.fc1.weight"] == (2048, 512)
    assert sd["layers.0.downsample.reduction.weight"] == (256, 512)
    assert sd["layers.0.downsample.norm.weight"] == (512,)
    assert not any(k.startswith("layers.3.downsample") for k in sd)
    assert sd["norm.weight"] == (1024,) and sd["fc.weight"] == (400, 1024)

    dsd = {k: tuple(v.shape) for k, v in dtf.state_dict().items()}
    assert set(sd) <= set(dsd)
    assert dsd["layers.0.blocks.1.conv.weight"] == (128, 128, 1, 3)
    assert dsd["layers.0.blocks.1.dtf_block.filter_g.weight"] == (144, 2192, 1, 1)
    assert dsd["layers.3.blocks.0.dtf_block.weights_cor"] == (1024, 16, 3, 3)
    # every block owns conv + dtf_block; only the 13 effective-shift-0 blocks use the DTF
    info = swin_block_info(dtf)
    assert all(p + "conv.weight" in dsd and p + "dtf_block.alpha1" in dsd for p, _ in info)
    assert sum(1 for _, s in info if s == 0) == 13
    total = _n_params(dtf)
    unused = 0
    for prefix, shift in info:
        for k, p in dtf.named_parameters():
            if k == prefix + "conv.weight" or (shift > 0 and k.startswith(prefix + "dtf_block.")):
                unused += p.numel()
    assert round(total / 1e5) == 2514  # 251.4M in the state dict
    assert round((total - unused) / 1e5) == 1801  # 180.1M used by the forward pass


TINY_SWIN = dict(embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4, img_size=64,
                 clip_length=8, early_stride=2, num_classes=5, patch_size=4)


def test_tiny_swin_forward_and_dtf_placement():
    x = torch.randn(2, 3, 8, 64, 64, dtype=torch.float64)
    dtf = randomize_(ReferenceSwin(dtf=True, **TINY_SWIN).double(), 1, x).eval()
    c2d = ReferenceSwin(dtf=False, **TINY_SWIN).double().eval()
    sd = dtf.state_dict()
    c2d.load_state_dict({k: v for k, v in sd.items() if ".conv." not in k and ".dtf_block." not in k})
    info = swin_block_info(dtf)
    assert [s for _, s in info] == [0, 2, 0, 2]
    with torch.no_grad():
        y = dtf(x)
        assert y.shape == (2, 5) and torch.isfinite(y).all()
        assert (y - c2d(x)).abs().max() > 1e-3
        # parameters of the unused conv and of DTF blocks in shifted blocks do not matter
        for prefix, shift in info:
            blk = dtf.get_submodule(prefix[:-1])
            blk.conv.weight.normal_()
            if shift > 0:
                blk.dtf_block.alpha1.normal_()
        torch.testing.assert_close(dtf(x), y, rtol=0, atol=0)
        # with zero alpha/bias the DTF-Transformer reduces to the C2D Swin
        for m in dtf.modules():
            if isinstance(m, DTFBlock):
                m.alpha1.zero_()
                m.bias.zero_()
        torch.testing.assert_close(dtf(x), c2d(x), rtol=1e-12, atol=1e-12)


def test_swin_small_resolution_forces_zero_shift():
    kw = dict(TINY_SWIN, img_size=32)  # stage 2 has 4x4 tokens == window
    m = ReferenceSwin(dtf=True, **kw)
    assert [s for _, s in swin_block_info(m)] == [0, 2, 0, 0]
    sd = m.state_dict()
    assert "layers.1.blocks.1.attn_mask" not in sd and "layers.0.blocks.1.attn_mask" in sd


def test_randomize_keeps_fixed_buffers():
    m = ReferenceSwin(dtf=True, **TINY_SWIN)
    before = {k: v.clone() for k, v in m.state_dict().items()
              if k.endswith(("relative_position_index", "attn_mask", "weights_cor"))}
    randomize_(m, 3)
    after = m.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    assert after["layers.0.blocks.0.dtf_block.alpha1"].abs().sum() > 0
    assert after["layers.0.blocks.0.dtf_block.norm1.norm.running_var"].min() >= 0.5
    assert after["layers.0.blocks.0.attn.relative_position_bias_table"].abs().sum() > 0


@pytest.mark.parametrize("kind", ["resnet", "swin"])
def test_randomize_with_calibration_keeps_deep_models_bounded(kind):
    """Full-depth (narrow) models: O(1) logits, float32 close to float64."""
    torch.manual_seed(0)
    if kind == "resnet":
        make = lambda: ReferenceResNet(layers=(3, 4, 6, 3), widths=(16, 16, 32, 32),  # noqa: E731
                                       num_classes=10, clip_length=16)
        x = torch.randn(2, 3, 16, 64, 64)
    else:
        make = lambda: ReferenceSwin(embed_dim=32, depths=(2, 2, 6, 2),  # noqa: E731
                                     num_heads=(2, 4, 8, 16), window_size=4, img_size=64,
                                     clip_length=8, early_stride=2, num_classes=10)
        x = torch.randn(2, 3, 8, 64, 64)
    m32 = randomize_(make(), 0, x).eval()
    m64 = make().double().eval()
    m64.load_state_dict(m32.state_dict())
    with torch.no_grad():
        y32, y64 = m32(x), m64(x.double())
    assert torch.isfinite(y32).all() and 0.05 < y64.abs().max() < 20
    torch.testing.assert_close(y32.double(), y64, rtol=1e-4, atol=1e-4)
