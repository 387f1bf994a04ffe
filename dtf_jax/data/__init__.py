"""Video data: conversion of video datasets into sharded TFRecords (``dtf_jax.data.convert``).

TensorFlow serves only as a CPU library here (records, JPEG codec, later tf.data): importing this
package hides every GPU from TensorFlow, so that TF never takes accelerator memory from JAX. It does
not set ``CUDA_VISIBLE_DEVICES`` (that would hide the GPUs from JAX in the same process too); the
converter's own processes, which never run JAX, do.
"""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')  # no INFO lines from TensorFlow's C++ side

import tensorflow as tf  # noqa: E402  pylint: disable=wrong-import-position


def _hide_accelerators_from_tf():
  try:
    tf.config.set_visible_devices([], 'GPU')
  except (RuntimeError, ValueError):  # TF already initialised its devices elsewhere.
    if tf.config.get_visible_devices('GPU'):
      import warnings  # pylint: disable=import-outside-toplevel
      warnings.warn('TensorFlow was initialised before dtf_jax.data and sees a GPU.')


_hide_accelerators_from_tf()
