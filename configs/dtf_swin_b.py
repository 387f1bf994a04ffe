"""DTF-Transformer (Swin-B with DTF) with the paper's recipe (configs/base.py, swin_config).

    python main.py --config=configs/dtf_swin_b.py --workdir=...          # 64 frames, Kinetics-400
    python main.py --config=configs/dtf_swin_b.py:64,ssv2 --workdir=...  # Something-Something V2

SGD lr 0.01 at batch 256 (scaled linearly with --config.batch_size), warm-up 1 epoch, cosine,
dropout 0.5, stochastic depth 0.5, bfloat16 compute. Kinetics-400: 128 epochs, 4 clips x 3 crops of
224² at eval; Something-Something: 64 epochs, no flip, 1 clip x 3 crops. For memory, use
--config.grad_accum_steps (the released code accumulates 4) or --config.mesh.fsdp.
Training augmentation: the released chain (random resized crop, colour jitter, grayscale, blur,
flip); Video-Swin-style mixup/CutMix with --config.mixup_alpha=0.8 --config.cutmix_alpha=1.0.

Start from ImageNet: pass an ImageNet Swin-B checkpoint, official (e.g.
swin_base_patch4_window7_224_22k.pth, ImageNet-22K) or timm (.pth or .safetensors); any window
(a window-12 384² checkpoint is resized to window 7). The patch embedding is inflated
(--config.init_stem=center|average), its LayerNorm kept (config.model.patch_norm=True; set False
for the official architecture, which lost it), DTF blocks start as the identity, the head is new:

    python main.py --config=configs/dtf_swin_b.py --workdir=... \
        --config.init_from=/path/swin_base_patch4_window7_224_22k.pth
"""

from configs import base


def get_config(arg=None):
  c = base.swin_config('dtf_swin_b', arg)
  c.model.drop_path_rate = 0.5
  return c
