"""C2D ResNet-50 (c2d_r50, no temporal module): the paper's recipe (``base.resnet_config``: epochs,
eval views and flip per dataset, the released augmentation).

    python main.py --config=configs/c2d_r50.py --workdir=...           # 16 frames, Kinetics-400
    python main.py --config=configs/c2d_r50.py:32 --workdir=...        # 32 frames (16, 32 or 64)
    python main.py --config=configs/c2d_r50.py:16,ssv2 --workdir=...   # Something-Something V2
    python main.py --config=configs/c2d_r50.py --workdir=... --config.init_from=/path/resnet50-19c8e357.pth

The last line starts from ImageNet, as the paper does: any torchvision ResNet-50 ``.pth`` or
``.safetensors`` file is inflated (README, "Fine-tune from ImageNet").

One file per model, so that a run names its model in its command line; they share everything else.
"""

from configs import base


def get_config(arg=None):
  return base.resnet_config('c2d_r50', arg)
