"""Shared training/evaluation config: every field the trainer reads, with its meaning.

Model configs call ``get_base_config()`` and change what differs. Override any field on the command
line: ``--config.batch_size=64 --config.data.dataset=tfrecord:/data/k400``.

Batch and learning rate: ``batch_size`` is global (all devices and hosts) and the learning rate is
``lr.base * batch_size / lr.base_batch`` (linear scaling), so a config's ``lr.base`` holds for any
batch size. The paper's recipe: batch 256, lr 0.04 (DTF-Net, SGD) or 0.01 (DTF-Transformer).
"""

import ml_collections

from dtf_jax.data import SSV2_FLIP_PAIRS

# Per-dataset defaults: classes, flip policy (Something-Something has direction classes), epochs,
# eval views (clips x crops) as in the paper.
DATASETS = {
    'k400': dict(dataset='tfrecord:data/k400', num_classes=400, flip='flip', num_epochs=128,
                 num_clips=10, num_crops=3),
    'ssv2': dict(dataset='tfrecord:data/ssv2', num_classes=174, flip='none', num_epochs=64,
                 num_clips=1, num_crops=3),
    'ssv1': dict(dataset='tfrecord:data/ssv1', num_classes=174, flip='none', num_epochs=64,
                 num_clips=1, num_crops=3),
}


def parse_arg(arg, **defaults):
  """Config argument -> dict: ``'32,ssv2'`` or ``'frames=32,dataset=ssv2'`` (a bare number sets
  ``frames``, a bare dataset name sets ``dataset``); keys are those of ``defaults``."""
  out = dict(defaults)
  for part in filter(None, (arg or '').split(',')):
    key, eq, value = part.partition('=')
    if not eq:
      if not (part.isdigit() or part in DATASETS):
        raise ValueError(f'config argument {arg!r}: {part!r} is neither a frame count nor a '
                         f'dataset ({", ".join(sorted(DATASETS))})')
      key, value = ('frames', part) if part.isdigit() else ('dataset', part)
    if key not in out:
      raise ValueError(f'config argument {arg!r}: unknown key {key!r} (keys: {sorted(out)})')
    out[key] = int(value) if value.isdigit() else value
  if 'dataset' in out and out['dataset'] not in DATASETS:
    raise ValueError(f'config argument {arg!r}: dataset must be one of {sorted(DATASETS)}')
  if 'frames' in out and not isinstance(out['frames'], int):
    raise ValueError(f'config argument {arg!r}: frames must be an integer')
  return out


def get_base_config(dataset: str = 'k400') -> ml_collections.ConfigDict:
  d = DATASETS[dataset]
  c = ml_collections.ConfigDict()
  c.seed = 0                       # init, data order and augmentation, dropout

  c.model = ml_collections.ConfigDict()
  c.model.name = 'dtf_r50'         # dtf_jax.models.list_models()
  c.model.dropout_rate = 0.5       # before the classifier
  c.model.drop_path_rate = 0.0     # stochastic depth
  c.model.remat = 'none'           # recomputed in the backward pass to save memory: 'none',
                                   # 'block' (each bottleneck / Swin block), 'dtf' (DTF blocks)
  c.model.fa_impl = 'auto'         # DTF frame-wise aggregation: 'scan', 'xla', 'pallas' or
                                   # 'auto' (per platform; dtf_jax/layers/aggregation.py)
  c.model.spectral_impl = 'auto'   # DTF time DFTs: 'direct', 'matmul', 'fft' or 'auto' (per
                                   # platform and clip steps; dtf_jax/layers/spectral.py)
  c.model.block_impl = 'auto'      # the whole DTF block: 'parts' (the two above), 'fused' (Pallas
                                   # TPU kernels, forward and backward) or 'auto' (fused on TPU;
                                   # dtf_jax/layers/dtf.py)
  # Any other create_model argument may be added by a config (e.g. early_stride, width).
  c.compute_dtype = 'bfloat16'     # activations; parameters and optimizer state stay float32

  c.data = ml_collections.ConfigDict()
  c.data.dataset = d['dataset']    # 'tfrecord:DIR' (dtf_jax.data.convert output) or 'tfds:NAME'
  c.data.data_dir = ''             # TFDS data_dir ('' = TFDS default)
  c.data.train_split = 'train'
  c.data.eval_split = 'validation'
  c.data.num_classes = d['num_classes']  # checked against the dataset's label map
  c.data.clip_length = 16          # frames per clip T
  c.data.stride = 1                # frame sampling stride (consecutive frames, as the paper)
  c.data.size = 224                # train crop
  # Train augmentation: the released DTF/SIFA chain (random resized crop, colour jitter with
  # p 0.8, grayscale with p 0.2, Gaussian blur with p 0.5, flip per dataset), clip-consistent.
  c.data.crop = 'random_resized_crop'  # or 'scale_jitter' (scale_range)
  c.data.scale_range = (256, 340)  # scale_jitter: random short side
  c.data.area_range = (0.2, 1.0)   # random_resized_crop: fraction of the frame
  c.data.aspect_range = (3 / 4, 4 / 3)  # random_resized_crop: aspect ratio w/h
  c.data.flip = d['flip']          # 'flip', 'none' or 'swap_pairs' (flip and swap flip_pairs)
  c.data.flip_pairs = SSV2_FLIP_PAIRS  # classes a flip turns into each other (SSv2's)
  c.data.colour_jitter = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue (0s = off)
  c.data.colour_jitter_prob = 0.8  # probability of applying the colour jitter
  c.data.grayscale_prob = 0.2      # probability of a grayscale clip
  c.data.blur_prob = 0.5           # probability of a Gaussian blur
  c.data.blur_sigma = (0.1, 2.0)   # blur: sigma ~ U[lo, hi] in pixels
  c.data.shuffle_buffer = 1024     # records per host
  c.data.skip_corrupt_records = False  # True: read damaged TFRecord files up to the damage and
                                       # print what is skipped (False: stop, naming the files)
  c.data.eval_size = 256           # eval crop (short side resized to it)
  c.data.num_clips = d['num_clips']  # eval clips per video
  c.data.num_crops = d['num_crops']  # eval crops per clip: 3 (along the long side) or 1 (centre)

  c.batch_size = 256               # global clips per step
  c.grad_accum_steps = 1           # micro-batches per step (batch_size / grad_accum_steps each)
  c.num_epochs = d['num_epochs']   # epochs over the train split
  c.total_steps = 0                # > 0: fixed number of steps instead of num_epochs

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = 'sgd'         # 'sgd' or 'adamw'
  c.optimizer.momentum = 0.9       # sgd
  c.optimizer.nesterov = False     # sgd (the official configs name it, their code never uses it)
  c.optimizer.b1 = 0.9             # adamw
  c.optimizer.b2 = 0.999           # adamw
  c.optimizer.weight_decay = 1e-4  # all parameters (sgd: added to the gradient; adamw: decoupled)
  c.optimizer.grad_clip_norm = 40.0  # global-norm clipping (0 = off)
  c.label_smoothing = 0.0
  c.mixup_alpha = 0.0              # > 0: mixup with Beta(a, a) (on the device, soft labels)
  c.cutmix_alpha = 0.0             # > 0: CutMix with Beta(a, a); both on: one or the other per batch

  c.lr = ml_collections.ConfigDict()
  c.lr.base = 0.04                 # at lr.base_batch clips per step; scaled linearly with batch
  c.lr.base_batch = 256
  c.lr.warmup_epochs = 1.0         # linear warm-up from lr / 100
  c.lr.end = 1e-6                  # cosine decay to this value at the last step

  c.mesh = ml_collections.ConfigDict()
  c.mesh.fsdp = 1                  # devices sharding params and optimizer state; the rest: data

  c.log_every_steps = 50           # train metrics (loss, accuracy, lr, grad norm, clips/s)
  c.checkpoint_every_steps = 1000  # and at the end, and on SIGTERM
  c.preemption_check_steps = 10    # several hosts: steps between their checks for a SIGTERM
                                   # (a host sync; one host alone checks every step)
  c.keep_checkpoints = 3           # the last k, plus the one of the best eval top-1 (if any)
  c.eval_every_steps = 0           # train_and_eval: evaluate every N steps (0 = at the end only)
  c.eval_batch_size = 32           # global views per eval batch (chunks of the multi-view set)
  c.eval_checkpoint_step = -1      # --mode=eval: checkpoint step (-1 = latest)
  # Start from: a checkpoint file (.pth/.pt/.safetensors: ImageNet ResNet/Swin, inflated, or an
  # official DTF one; the layout is read from its keys), a convert_torch output dir, or a workdir.
  c.init_from = ''
  c.init_stem = 'center'           # ImageNet inflation of the stem / patch embedding: 'center'
                                   # (2D kernel at the middle frame, the released code) or 'average'

  c.distributed = ml_collections.ConfigDict()
  # jax.distributed.initialize(): 'auto' where a multi-host environment is detected (Cloud TPU
  # pod slices, SLURM, Open MPI, JAX_COORDINATOR_ADDRESS; see dtf_jax/multihost.py), 'yes', 'no'.
  c.distributed.initialize = 'auto'
  c.distributed.coordinator_address = ''  # '' = auto-detect (TPU pods, SLURM, ...)
  c.distributed.num_processes = 0
  c.distributed.process_id = -1
  c.distributed.cpu_collectives = ''  # 'gloo' for multi-process runs on CPU
  return c


def resnet_config(model: str, arg=None) -> ml_collections.ConfigDict:
  """DTF-Net / C2D ResNet recipe: SGD lr 0.04 at batch 256, 224² train crops, 256² eval views.

  ``arg``: frames and dataset, e.g. ``'32'``, ``'16,ssv2'`` (defaults 16, k400)."""
  a = parse_arg(arg, frames=16, dataset='k400')
  c = get_base_config(a['dataset'])
  c.model.name = model
  c.data.clip_length = a['frames']
  c.data.eval_size = 256
  c.lr.base = 0.04
  return c


def swin_config(model: str, arg=None) -> ml_collections.ConfigDict:
  """DTF-Transformer / C2D Swin recipe: SGD lr 0.01 at batch 256, 224² crops (train and eval),
  4 clips x 3 crops on Kinetics. ``arg``: frames and dataset (defaults 64, k400)."""
  a = parse_arg(arg, frames=64, dataset='k400')
  c = get_base_config(a['dataset'])
  c.model.name = model
  # ImageNet Swin checkpoints have a patch-embedding LayerNorm: kept, the inflated model starts as
  # the 2D network. False = the official DTF-Transformer (no norm), as its checkpoints need.
  c.model.patch_norm = True
  c.data.clip_length = a['frames']
  c.data.eval_size = 224           # Swin's windows are laid out for 224² frames
  if a['dataset'] == 'k400':
    c.data.num_clips = 4
  c.lr.base = 0.01
  return c
