"""Colour augmentation of the released DTF/SIFA train transform (``dtf_jax.data.ops``) against
NumPy/colorsys references written from torchvision's definitions, and through ``train_dataset``.

Clips are ``T H W 3`` float in 0..255; the references work in float64 on [0, 1].
"""

import colorsys

import numpy as np
import pytest

pytest.importorskip('tensorflow')

from dtf_jax.data import ops, pipeline  # noqa: E402
import tensorflow as tf  # noqa: E402
# The pattern-video records and helpers of the pipeline tests (the fixture is module-scoped).
from test_data_pipeline import MEAN, STD, _pixels, _train, records  # noqa: E402,F401

LUMA = np.array([0.299, 0.587, 0.114])
RELEASED = (0.4, 0.4, 0.4, 0.1)


def _clip(seed=0, shape=(3, 5, 6, 3)):
  """Random clip in 0..255 whose frames differ in brightness (so per-frame statistics differ)."""
  rng = np.random.default_rng(seed)
  x = rng.uniform(0, 255, shape)
  return (x * np.linspace(0.3, 1.0, shape[0])[:, None, None, None]).astype(np.float32)


# NumPy references on float64 [0, 1] (torchvision's float-tensor formulas).

def np_gray(x):
  return (x @ LUMA)[..., None]


def np_brightness(x, f):
  return np.clip(x * f, 0, 1)


def np_contrast(x, f):
  mean = np_gray(x).mean(axis=(1, 2, 3), keepdims=True)  # per frame
  return np.clip(f * x + (1 - f) * mean, 0, 1)


def np_saturation(x, f):
  return np.clip(f * x + (1 - f) * np_gray(x), 0, 1)


def np_hue(x, shift):
  out = np.empty_like(x)
  for idx in np.ndindex(x.shape[:-1]):
    h, s, v = colorsys.rgb_to_hsv(*x[idx])
    out[idx] = colorsys.hsv_to_rgb((h + shift) % 1.0, s, v)
  return out


NP_ADJUST = (np_brightness, np_contrast, np_saturation, np_hue)


def np_jitter(x, order, factors):
  for k in order:
    x = NP_ADJUST[k](x, factors[k])
  return x


def np_blur(x, sigma, radius=6):
  k = np.arange(-radius, radius + 1)
  w = np.exp(-k**2 / (2 * sigma**2))
  w /= w.sum()
  for axis in (1, 2):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (radius, radius)
    p = np.pad(x, pad, mode='edge')
    n = x.shape[axis]
    x = sum(w[j] * np.take(p, np.arange(j, j + n), axis=axis) for j in range(2 * radius + 1))
  return x


def _seed(s, t=0):
  return tf.constant([s, t], tf.int64)


def test_brightness_contrast_saturation_vs_numpy():
  x = _clip() / 255.0
  tx = tf.constant(x, tf.float32)
  for f in (0.0, 0.6, 1.0, 1.4):
    np.testing.assert_allclose(ops.adjust_brightness(tx, f), np_brightness(x, f), atol=1e-6)
    np.testing.assert_allclose(ops.adjust_contrast(tx, f), np_contrast(x, f), atol=1e-6)
    np.testing.assert_allclose(ops.adjust_saturation(tx, f), np_saturation(x, f), atol=1e-6)
  # The contrast mean is per frame, not over the clip (the frames differ in brightness here).
  clip_mean = np.clip(0.6 * x + 0.4 * np_gray(x).mean(), 0, 1)
  assert np.abs(np_contrast(x, 0.6) - clip_mean).max() > 0.05
  np.testing.assert_allclose(ops.grayscale(tx), np_gray(x), atol=1e-6)


def test_hue_vs_colorsys():
  x = _clip(1, (2, 3, 4, 3)) / 255.0
  x[0, 0, 0] = [0.5, 0.5, 0.5]  # gray: no hue
  x[0, 0, 1] = [1.0, 0.0, 0.0]  # pure red: crosses h = 0 with a negative shift
  for shift in (-0.1, 0.03, 0.1, 0.5):
    got = ops.adjust_hue(tf.constant(x, tf.float32), shift).numpy()
    np.testing.assert_allclose(got, np_hue(x, shift), atol=2e-6, err_msg=f'shift {shift}')


def test_colour_jitter_matches_numpy_in_the_drawn_order():
  x = _clip(2, (2, 3, 4, 3))
  for s in range(4):
    out = ops.colour_jitter(tf.constant(x), _seed(s), *RELEASED, prob=1.0).numpy()
    # Documented seed use: split_seeds(seed, 2)[1] draws the order and the factors.
    order, factors = ops.colour_jitter_params(ops.split_seeds(_seed(s), 2)[1], *RELEASED)
    expected = np_jitter(x / 255.0, order.numpy(), factors.numpy().astype(np.float64)) * 255
    np.testing.assert_allclose(out, expected, atol=2e-3, err_msg=f'seed {s}')


def test_random_order_is_a_varying_permutation():
  # Brightness and contrast commute except through clamping: white and black pixels make the
  # two orders differ whenever a factor > 1 clamps them.
  x = _clip(3)
  x[:, 0, :3], x[:, 1, :3] = 255.0, 0.0
  told = {True: 0, False: 0}  # seeds whose order is visible, by "brightness first"
  for s in range(32):
    out = ops.colour_jitter(tf.constant(x), _seed(s), 0.4, 0.4, 0.0, 0.0, prob=1.0).numpy()
    order, factors = ops.colour_jitter_params(ops.split_seeds(_seed(s), 2)[1], 0.4, 0.4, 0, 0)
    order = list(order.numpy())
    b, c = factors.numpy()[:2].astype(np.float64)
    b_first = np_contrast(np_brightness(x / 255, b), c) * 255
    c_first = np_brightness(np_contrast(x / 255, c), b) * 255
    brightness_first = order.index(0) < order.index(1)
    drawn, other = (b_first, c_first) if brightness_first else (c_first, b_first)
    np.testing.assert_allclose(out, drawn, atol=2e-3, err_msg=f'seed {s}')
    if np.abs(b_first - c_first).max() > 0.5:
      assert np.abs(out - other).max() > 0.5
      told[brightness_first] += 1
  assert told[True] >= 4 and told[False] >= 4, told
  orders = set()
  factors = []
  for s in range(200):
    order, f = ops.colour_jitter_params(_seed(s, 5), *RELEASED)
    assert sorted(order.numpy()) == [0, 1, 2, 3]
    orders.add(tuple(order.numpy()))
    factors.append(f.numpy())
  assert len(orders) >= 20  # of 24 permutations
  factors = np.array(factors)
  assert np.all(factors[:, :3] >= 0.6) and np.all(factors[:, :3] <= 1.4)
  assert np.all(np.abs(factors[:, 3]) <= 0.1)
  assert np.all(factors.min(0) < [0.65, 0.65, 0.65, -0.09])
  assert np.all(factors.max(0) > [1.35, 1.35, 1.35, 0.09])


def test_random_grayscale_vs_numpy():
  x = _clip(4)
  out = ops.random_grayscale(tf.constant(x), _seed(0), prob=1.0).numpy()
  np.testing.assert_allclose(out, np.repeat(np_gray(x.astype(np.float64)), 3, -1), atol=1e-4)
  np.testing.assert_array_equal(ops.random_grayscale(tf.constant(x), _seed(0), prob=0.0), x)


def test_gaussian_blur_vs_numpy():
  x = _clip(5, (2, 5, 17, 3))  # height 5 < radius 6: the edge padding repeats the border
  for sigma in (0.5, 1.3, 2.0):
    got = ops.gaussian_blur(tf.constant(x), sigma).numpy()
    np.testing.assert_allclose(got, np_blur(x.astype(np.float64), sigma), atol=1e-3,
                               err_msg=f'sigma {sigma}')
  kernel = ops.gaussian_kernel(1.3, 6).numpy()
  assert kernel.shape == (13,) and abs(kernel.sum() - 1) < 1e-6
  np.testing.assert_allclose(kernel, kernel[::-1])
  # A tiny sigma is the identity; a larger one lowers the variance of noise; a constant stays.
  np.testing.assert_allclose(ops.gaussian_blur(tf.constant(x), 0.1), x, atol=1e-3)
  noise = np.random.default_rng(0).uniform(0, 255, (1, 32, 32, 3)).astype(np.float32)
  variance = {sigma: ops.gaussian_blur(tf.constant(noise), sigma).numpy()[:, 8:-8, 8:-8].var()
              for sigma in (0.5, 1.0, 2.0)}
  assert 0.1 * noise.var() > variance[1.0] > variance[2.0], (noise.var(), variance)
  assert noise.var() > variance[0.5] > variance[1.0], (noise.var(), variance)
  flat = np.full((1, 8, 8, 3), 100.0, np.float32)
  np.testing.assert_allclose(ops.gaussian_blur(tf.constant(flat), 2.0), flat, atol=1e-3)


def _chain(clip, seed):
  clip = ops.colour_jitter(clip, seed, *RELEASED, prob=0.8)
  clip = ops.random_grayscale(clip, ops.split_seeds(seed, 2)[0], 0.2)
  return ops.random_gaussian_blur(clip, ops.split_seeds(seed, 2)[1], 0.5, (0.1, 2.0))


def test_all_frames_share_the_parameters():
  frame = _clip(6, (1, 8, 8, 3))
  clip = tf.constant(np.repeat(frame, 4, 0))
  for s in range(6):
    for out in (ops.colour_jitter(clip, _seed(s), *RELEASED, prob=1.0),
                ops.random_gaussian_blur(clip, _seed(s), prob=1.0),
                _chain(clip, _seed(s))):
      out = out.numpy()
      assert np.ptp(out, axis=0).max() < 1e-3
      assert out.min() >= 0 and out.max() <= 255 + 1e-3
  # Distinct frames, brightness only (no clamping): one factor for the whole clip.
  x = _clip(7) * 0.5
  out = ops.colour_jitter(tf.constant(x), _seed(1), 0.4, 0, 0, 0, prob=1.0).numpy()
  ratio = out / np.maximum(x, 1e-3)
  factor = np.median(ratio)
  assert abs(factor - 1) > 1e-3
  np.testing.assert_allclose(ratio[x > 1], factor, rtol=1e-4)


def test_application_probabilities():
  x = tf.constant(_clip(8, (2, 8, 8, 3)))
  jitter = tf.function(lambda s: ops.colour_jitter(x, s, *RELEASED, prob=0.8))
  gray = tf.function(lambda s: ops.random_grayscale(x, s, prob=0.2))
  blur = tf.function(lambda s: ops.random_gaussian_blur(x, s, prob=0.5, sigma_range=(1.0, 2.0)))
  counts = {'jitter': 0, 'gray': 0, 'blur': 0}
  for s in range(200):
    seed = _seed(s, 3)
    counts['jitter'] += not np.array_equal(jitter(seed).numpy(), x.numpy())
    counts['gray'] += not np.array_equal(gray(seed).numpy(), x.numpy())
    counts['blur'] += not np.array_equal(blur(seed).numpy(), x.numpy())
  # Expected 160, 40, 100 (standard deviations 5.7, 5.7, 7.1).
  assert 140 <= counts['jitter'] <= 180, counts
  assert 20 <= counts['gray'] <= 60, counts
  assert 78 <= counts['blur'] <= 122, counts


def test_deterministic_by_seed():
  x = tf.constant(_clip(9))
  outs = [_chain(x, _seed(s)).numpy() for s in (0, 0, 1, 2, 3)]
  np.testing.assert_array_equal(outs[0], outs[1])
  assert not any(np.array_equal(outs[0], o) for o in outs[2:])


def test_argument_errors():
  x = tf.constant(_clip())
  for kwargs, match in (({'brightness': -0.1}, 'brightness must be >= 0'),
                        ({'hue': 0.6}, 'hue must be <= 0.5'),
                        ({'prob': 1.5}, r'colour jitter prob must be a probability in \[0, 1\]')):
    with pytest.raises(ValueError, match=match):
      ops.colour_jitter(x, _seed(0), **kwargs)
  with pytest.raises(ValueError, match='grayscale prob must be a probability'):
    ops.random_grayscale(x, _seed(0), -0.1)
  for sigma_range in ((0.0, 1.0), (2.0, 1.0)):
    with pytest.raises(ValueError, match='0 < lo <= hi'):
      ops.random_gaussian_blur(x, _seed(0), 0.5, sigma_range)


def test_train_dataset_argument_errors(records):  # noqa: F811
  source = pipeline.make_source(f'tfrecord:{records}', 'train', process_count=1)
  for kwargs, match in (({'colour_jitter': 0.4}, 'colour_jitter must be 4 strengths'),
                        ({'colour_jitter': (0.4, 0.4, 0.4)}, 'colour_jitter must be 4'),
                        ({'colour_jitter': (0.4, -1, 0.4, 0.1)}, 'contrast must be >= 0'),
                        ({'colour_jitter_prob': 1.2}, 'colour_jitter_prob must be a probability'),
                        ({'grayscale_prob': -0.5}, 'grayscale_prob must be a probability'),
                        ({'blur_prob': 2}, 'blur_prob must be a probability'),
                        ({'blur_sigma': (0.5, 0.1)}, '0 < lo <= hi')):
    with pytest.raises(ValueError, match=match):
      pipeline.train_dataset(source, batch_size=1, clip_length=4, process_index=0, **kwargs)


def test_train_dataset_released_chain(records):  # noqa: F811
  crop = dict(crop='random_resized_crop', area_range=(0.2, 1.0), aspect_range=(3 / 4, 4 / 3))
  off = next(_train(records, **crop))
  released = next(_train(records, **pipeline.RELEASED_AUGMENTATION))
  assert released['video'].shape == (5, 4, 32, 32, 3) and released['video'].dtype == np.float32
  lo, hi = (0 - MEAN) / STD, (255 - MEAN) / STD
  assert np.all(released['video'] >= lo - 1e-3) and np.all(released['video'] <= hi + 1e-3)
  np.testing.assert_array_equal(released['label'], off['label'])
  changed = [not np.allclose(a, b, atol=1e-3) for a, b in zip(released['video'], off['video'])]
  assert sum(changed) >= 3, changed  # P(none of jitter, gray, blur) = 0.2 * 0.8 * 0.5 per clip
  # Strengths on but probabilities 0: exactly the chain-off stream (no extra draws move the
  # clip offset, crop or flip seeds).
  zero = next(_train(records, **dict(pipeline.RELEASED_AUGMENTATION, colour_jitter_prob=0.0,
                                     grayscale_prob=0.0, blur_prob=0.0)))
  np.testing.assert_array_equal(zero['video'], off['video'])
  # Grayscale always on: the luma of the same crops and flips.
  gray = next(_train(records, grayscale_prob=1.0, **crop))
  np.testing.assert_allclose(_pixels(gray['video']), np.repeat(np_gray(_pixels(off['video'])), 3,
                                                              -1), atol=1e-3)


def test_configs_released_chain_and_quickstart_off(records):  # noqa: F811
  from configs import base, quickstart  # pylint: disable=import-outside-toplevel
  from dtf_jax import train  # pylint: disable=import-outside-toplevel
  for dataset, flip in (('k400', 'flip'), ('ssv2', 'none')):
    data = base.get_base_config(dataset).data
    assert {k: (tuple(data[k]) if isinstance(data[k], tuple) else data[k])
            for k in pipeline.RELEASED_AUGMENTATION} == pipeline.RELEASED_AUGMENTATION
    assert data.flip == flip
  data = quickstart.get_config().data
  assert data.crop == 'scale_jitter' and not any(data.colour_jitter)
  assert data.colour_jitter_prob == data.grayscale_prob == data.blur_prob == 0
  # train.train_data passes the config's chain to train_dataset.
  config = base.get_base_config('k400')
  config.batch_size, config.data.clip_length, config.data.stride = 5, 4, 2
  config.data.size, config.data.shuffle_buffer = 32, 8

  class Setup:  # the one field train_data reads
    train_source = pipeline.make_source(f'tfrecord:{records}', 'train', process_count=1)
  got = next(train.train_data(config, Setup(), 0).as_numpy_iterator())
  expected = next(_train(records, **pipeline.RELEASED_AUGMENTATION))
  np.testing.assert_array_equal(got['video'], expected['video'])
