"""Video data: decoding, conversion into sharded TFRecords, and tf.data input pipelines.

TensorFlow serves only as a CPU library here (records, JPEG codec, tf.data). Importing these
modules changes nothing about devices. An entry point that runs JAX on an accelerator calls
:func:`hide_accelerators_from_tf` once, before TensorFlow creates its devices, so that TensorFlow
never takes accelerator memory from JAX (``main.py`` and ``dtf_jax.train.setup`` do). The pinned
install uses ``tensorflow-cpu``, which sees no GPU anyway. The converter's own processes, which
never run JAX, hide the GPUs from themselves with ``CUDA_VISIBLE_DEVICES``.
"""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')  # no INFO lines from TensorFlow's C++ side

# Something-Something V2 classes that a horizontal flip turns into each other (left <-> right).
SSV2_FLIP_PAIRS = ((86, 87), (93, 94), (166, 167))


def hide_accelerators_from_tf() -> None:
  """Makes TensorFlow see no GPU (JAX still does). Call before TensorFlow creates its devices; if
  it already did and sees a GPU, this warns."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  try:
    tf.config.set_visible_devices([], 'GPU')
  except (RuntimeError, ValueError):  # TF already initialised its devices elsewhere.
    if tf.config.get_visible_devices('GPU'):
      import warnings  # pylint: disable=import-outside-toplevel
      warnings.warn('TensorFlow created its devices before hide_accelerators_from_tf() and sees '
                    'a GPU: it may take accelerator memory from JAX.')
