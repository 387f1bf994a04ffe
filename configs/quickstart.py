"""Quickstart: a small DTF ResNet on the built-in synthetic dataset, minutes on a CPU.

    python -m dtf_jax.data.synthetic --output data/synthetic
    python main.py --config=configs/quickstart.py --workdir=runs/quickstart
    python main.py --config=configs/quickstart.py --workdir=runs/quickstart_c2d \\
        --config.model.name=c2d_r50          # the same network without DTF: ~chance on direction

The 8 classes are 4 motions x 2 directions in time; a frame-wise network (C2D) can tell the motion
kind but not its direction, DTF can. Clips are 8 frames (every 2nd of 16) at 32x32; the stem does
not fold frames (early_stride 1), so C2D really sees frames one by one.
"""

from configs import base


def get_config(arg=None):
  if arg:
    raise ValueError(f'configs/quickstart.py takes no argument, got {arg!r}')
  c = base.get_base_config()
  c.model.name = 'dtf_r50'
  c.model.stage_sizes = (1, 1, 1, 1)  # one bottleneck per stage
  c.model.width = 16                  # stem / stage-1 channels (64 in ResNet-50)
  c.model.early_stride = 1            # no temporal folding in the stem
  c.model.dropout_rate = 0.0
  c.compute_dtype = 'float32'         # CPU: float32 is the fast path

  c.data.dataset = 'tfrecord:data/synthetic/tfrecords'
  c.data.num_classes = 8
  c.data.clip_length = 8             # every 2nd frame: the whole 16-frame clip
  c.data.stride = 2
  c.data.size = 32                    # frames are rendered at 64x64; 32x32 keeps CPU steps short
  c.data.crop = 'scale_jitter'        # short side to 32..36, random 32x32 crop
  c.data.scale_range = (32, 36)
  c.data.colour_jitter = (0.0, 0.0, 0.0, 0.0)  # no colour jitter, grayscale or blur
  c.data.colour_jitter_prob = 0.0
  c.data.grayscale_prob = 0.0
  c.data.blur_prob = 0.0
  c.data.flip = 'swap_pairs'          # a flip turns left into right and clockwise into counter-
  c.data.flip_pairs = ((0, 1), (6, 7))  # clockwise: swap those labels
  c.data.shuffle_buffer = 800
  c.data.eval_size = 32
  c.data.num_clips = 1
  c.data.num_crops = 1

  c.batch_size = 32
  c.num_epochs = 12
  c.optimizer.name = 'adamw'
  c.optimizer.weight_decay = 0.05
  c.optimizer.grad_clip_norm = 1.0
  c.lr.base = 4e-3                    # 2e-3 learned the rotation pair too late on some seeds
  c.lr.base_batch = 32
  c.lr.warmup_epochs = 1.0
  c.log_every_steps = 25
  c.checkpoint_every_steps = 100
  c.eval_batch_size = 40
  return c
