"""DTF-Net ResNet-50 (dtf_r50) with the paper's recipe (configs/base.py, resnet_config).

    python main.py --config=configs/dtf_r50.py --workdir=...           # 16 frames, Kinetics-400
    python main.py --config=configs/dtf_r50.py:32 --workdir=...        # 32 frames (16, 32 or 64)
    python main.py --config=configs/dtf_r50.py:16,ssv2 --workdir=...   # Something-Something V2

Kinetics-400: 128 epochs, random flip, 10 clips x 3 crops of 256² at eval. Something-Something:
64 epochs, no flip (direction classes), 1 clip x 3 crops.
Training augmentation: the released chain (random resized crop, colour jitter, grayscale, blur,
flip).

Start from ImageNet, as the paper does: pass the torchvision ResNet-50 checkpoint file (the released
code uses resnet50-19c8e357.pth; any torchvision ResNet-50 .pth or .safetensors works). Its 2D
kernels are inflated (stem: --config.init_stem=center|average), the DTF blocks start as the
identity and the classifier is new:

    python main.py --config=configs/dtf_r50.py --workdir=... --config.init_from=/path/resnet50-19c8e357.pth
"""

from configs import base


def get_config(arg=None):
  return base.resnet_config('dtf_r50', arg)
