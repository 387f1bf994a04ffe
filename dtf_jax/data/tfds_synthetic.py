"""TensorFlow Datasets builder ``dtf_synthetic``: the built-in synthetic dataset (``synthetic.py``).

Each example is one clip of ``dtf_jax.data.synthetic`` (task ``motion`` or ``long_range``):
  video  ``uint8 T H W 3`` RGB (T = frames, H = W = size, see the configs), stored as one JPEG per
         frame (``tf.image.encode_jpeg``, quality 95)
  label  class index, names ``synthetic.task_classes(task)`` (8 for motion, 2 for long_range);
         clip ``i`` has label ``i % num_classes``
  id     ``{split}/{i:06d}``, the clip's path in ``python -m dtf_jax.data.synthetic``'s ``videos/``

Configs (all seed 0): task ``motion``, 16 x 64 x 64: ``default`` (800 train / 200 validation clips,
as ``synthetic.generate``) and ``small`` (48 / 16, for tests); task ``long_range``:
``long_range`` (800 / 200, 32 x 64 x 64, as ``--task long_range``) and ``long_range_small``
(24 / 8, 32 x 32 x 32, for tests). Clip ``i`` of a split is rendered from the same generator as in
``synthetic.generate``, written as the same mp4 and decoded back with PyAV, so its frames are those
of the mp4 the CLI writes (up to the JPEG storage). Nothing is downloaded.

    import dtf_jax.data.tfds_synthetic  # registers the builder (import dtf_jax.data before TF)
    tfds.builder('dtf_synthetic/small', data_dir=D).download_and_prepare()
    ds = tfds.load('dtf_synthetic', split='train', data_dir=D)     # prepares it if needed

The trainer selects it with ``dataset = 'tfds:dtf_synthetic'``. To decode only sampled frames,
read with ``decoders={'video': tfds.decode.SkipDecoding()}``: ``video`` is then a ``tf.string``
tensor of shape ``(T,)`` holding the JPEG bytes of each frame.
"""

import dataclasses
import os
import tempfile

import tensorflow_datasets as tfds

from dtf_jax.data import synthetic
from dtf_jax.data import video as video_lib


@dataclasses.dataclass
class DtfSyntheticConfig(tfds.core.BuilderConfig):
  """Task (``synthetic.TASKS``), clips per split, frames per clip, frame size (H = W, a multiple
  of 4), seed, mp4 fps."""
  task: str = 'motion'
  num_train: int = 800
  num_val: int = 200
  frames: int = 16
  size: int = 64
  seed: int = 0
  fps: int = 12


class DtfSynthetic(tfds.core.GeneratorBasedBuilder):
  """The synthetic temporal datasets: 8 motion classes or 2 long-range classes (``synthetic``)."""

  # Follows the newest rendering version of ``synthetic.VERSIONS``. The long-range configs were
  # added in 2.0.0 without a bump: the existing configs' data and features were unchanged.
  VERSION = tfds.core.Version(f'{max(synthetic.VERSIONS.values())}.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release: clips rendered, encoded to mp4, decoded with PyAV.',
                   '2.0.0': 'Larger, faster rotations (motion version 2).',
                   '3.0.0': 'Long-range task: one flash pair of a large disk, 2 classes '
                            '(long_range version 3); the motion configs are unchanged.'}
  BUILDER_CONFIGS = [
      DtfSyntheticConfig(name='default', description='800 train / 200 validation clips, '
                         '16 frames of 64x64, seed 0 (synthetic.generate defaults).'),
      DtfSyntheticConfig(name='small', num_train=48, num_val=16,
                         description='48 train / 16 validation clips, 16 frames of 64x64, seed 0.'),
      DtfSyntheticConfig(name='long_range', task='long_range', frames=32,
                         description='Task long_range: 800 train / 200 validation clips, 32 '
                         'frames of 64x64, seed 0 (synthetic --task long_range defaults).'),
      DtfSyntheticConfig(name='long_range_small', task='long_range', num_train=24, num_val=8,
                         frames=32, size=32,
                         description='Task long_range: 24 train / 8 validation clips, 32 frames '
                         'of 32x32, seed 0.'),
  ]
  DEFAULT_CONFIG_NAME = 'default'
  # tfds 4.9.10 derives ``code_path`` through the ``importlib_resources`` backport, which it only
  # requires on Python < 3.9 (tensorflow/datasets#11212): without it ``download_and_prepare``
  # raises ModuleNotFoundError. The value it would compute is simply this file.
  code_path = tfds.core.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.size
    classes = synthetic.task_classes(self.builder_config.task)
    return self.dataset_info_from_configs(
        description=synthetic.__doc__.split('\n\n')[0],
        features=tfds.features.FeaturesDict({
            'video': tfds.features.Video(shape=(None, size, size, 3), encoding_format='jpeg'),
            'label': tfds.features.ClassLabel(names=classes),
            'id': tfds.features.Text(),
        }),
        supervised_keys=('video', 'label'),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Rendered locally: nothing to download.
    cfg = self.builder_config
    counts = {'train': cfg.num_train, 'validation': cfg.num_val}
    return {split: self._generate_examples(split, code, counts[split])
            for split, code, _ in synthetic.SPLITS}

  def _generate_examples(self, split: str, split_code: int, count: int):
    """Yields ``(i, {'video': uint8 T H W 3, 'label': i % num_classes, 'id': f'{split}/{i:06d}'})``.
    """
    cfg = self.builder_config
    num_classes = len(synthetic.task_classes(cfg.task))
    codec = video_lib.video_codec()
    shape = (cfg.frames, cfg.size, cfg.size, 3)
    with tempfile.TemporaryDirectory(prefix='dtf_synthetic_') as tmp:
      path = os.path.join(tmp, 'clip.mp4')
      for i in range(count):
        label = i % num_classes
        clip = synthetic.render(cfg.task, label, synthetic.clip_rng(cfg.seed, split_code, i),
                                cfg.frames, cfg.size)
        video_lib.write_mp4(path, clip, cfg.fps, codec)
        frames, _ = video_lib.decode_video(path, short_side=None)
        if frames.shape != shape:
          raise ValueError(f'{split} clip {i}: decoded {frames.shape}, expected {shape}')
        yield i, {'video': frames, 'label': label, 'id': f'{split}/{i:06d}'}
