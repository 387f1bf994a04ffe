"""TFDS builder ``dtf_synthetic`` (``dtf_jax/data/tfds_synthetic.py``), configs ``small`` and
``long_range_small``.

Measured (seed 0, 16x64x64): PSNR of the stored JPEG frames against the PyAV-decoded mp4 of the
same clip min 37.2 dB, mean 38.3 dB; preparing ``small`` (64 clips) takes about 2 s on 2 cores.
"""

import numpy as np
import pytest

av = pytest.importorskip('av')
tfds = pytest.importorskip('tensorflow_datasets')

from dtf_jax.data import synthetic  # noqa: E402  (hides GPUs from TF before TF is used)
import tensorflow as tf  # noqa: E402
from dtf_jax.data import tfds_synthetic  # noqa: E402  (registers 'dtf_synthetic')
from dtf_jax.data import video  # noqa: E402

FRAMES, SIZE = 16, 64
COUNTS = {'train': 48, 'validation': 16}


def _psnr(a, b):
  mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
  return 10 * np.log10(255.0 ** 2 / max(mse, 1e-10))


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('tfds'))
  tfds.builder('dtf_synthetic/small', data_dir=path).download_and_prepare()
  return path


def _load(data_dir, split, **kwargs):
  """``{index: example}`` of a split (numpy), the index parsed from ``id`` (``split/NNNNNN``)."""
  ds = tfds.load('dtf_synthetic/small', data_dir=data_dir, split=split, download=False, **kwargs)
  out = {}
  for ex in tfds.as_numpy(ds):
    name, index = ex['id'].decode().split('/')
    assert name == split and int(index) not in out
    out[int(index)] = ex
  return out


def test_builder_registered_and_configs():
  assert 'dtf_synthetic' in tfds.list_builders(with_community_datasets=False)  # offline
  assert tfds.builder_cls('dtf_synthetic') is tfds_synthetic.DtfSynthetic
  configs = {c.name: c for c in tfds_synthetic.DtfSynthetic.BUILDER_CONFIGS}
  assert (configs['default'].num_train, configs['default'].num_val) == (800, 200)
  assert (configs['small'].num_train, configs['small'].num_val) == tuple(COUNTS.values())
  for name in ('default', 'small'):
    c = configs[name]
    assert (c.task, c.frames, c.size, c.seed) == ('motion', FRAMES, SIZE, 0)
  c = configs['long_range']
  assert (c.task, c.num_train, c.num_val, c.frames, c.size, c.seed) == ('long_range', 800, 200, 32,
                                                                         64, 0)
  c = configs['long_range_small']
  assert (c.task, c.num_train, c.num_val, c.frames, c.size) == ('long_range', 24, 8, 32, 32)


def test_info_classes_and_splits(data_dir):
  info = tfds.builder('dtf_synthetic/small', data_dir=data_dir).info
  assert info.features['label'].names == list(synthetic.CLASSES)
  assert info.features['video'].shape == (None, SIZE, SIZE, 3)
  assert {name: s.num_examples for name, s in info.splits.items()} == COUNTS
  assert str(info.version) == '3.0.0'


@pytest.mark.parametrize('split', sorted(COUNTS))
def test_load_counts_shapes_labels(data_dir, split):
  examples = _load(data_dir, split)
  assert sorted(examples) == list(range(COUNTS[split]))
  for index, ex in examples.items():
    assert ex['video'].dtype == np.uint8 and ex['video'].shape == (FRAMES, SIZE, SIZE, 3)
    assert ex['label'] == index % len(synthetic.CLASSES)


def test_frames_match_pyav_decoded_mp4(data_dir, tmp_path):
  """Every stored clip against the mp4 that synthetic's own functions write for it."""
  psnrs = []
  for split, code, _ in synthetic.SPLITS:
    for index, ex in _load(data_dir, split).items():
      path = str(tmp_path / f'{split}_{index:06d}.mp4')
      rendered = synthetic.render_clip(index % 8, synthetic.clip_rng(0, code, index), FRAMES, SIZE)
      video.write_mp4(path, rendered)
      with av.open(path) as container:
        decoded = np.stack([f.to_ndarray(format='rgb24') for f in container.decode(video=0)])
      assert decoded.shape == ex['video'].shape
      psnrs.append(_psnr(ex['video'], decoded))
  print(f'TFDS JPEG vs decoded mp4 PSNR: min {min(psnrs):.1f} dB, mean {np.mean(psnrs):.1f} dB')
  # The only difference is the JPEG storage (quality 95, 4:2:0 chroma): min 37.2 dB on these
  # noisy 64x64 frames. The errors this guards against score lower: a clip shifted by one frame
  # in time reaches 30.8 dB (slowly changing clips), a time-reversed clip 24.2 dB, another clip
  # (seed, index) 17.6 dB (maxima over 64 rendered clips). 34 dB leaves ~3 dB on both sides.
  assert min(psnrs) > 34


def test_skip_decoding_gives_jpeg_bytes_per_frame(data_dir):
  decoded = _load(data_dir, 'validation')
  ds = tfds.load('dtf_synthetic/small', data_dir=data_dir, split='validation', download=False,
                 decoders={'video': tfds.decode.SkipDecoding()})
  assert ds.element_spec['video'].dtype == tf.string
  assert ds.element_spec['video'].shape.rank == 1
  count = 0
  for ex in ds:
    jpegs = ex['video']
    assert jpegs.dtype == tf.string and jpegs.shape == (FRAMES,)
    assert all(j.startswith(b'\xff\xd8') for j in jpegs.numpy())  # JPEG start-of-image marker
    frames = np.stack([tf.io.decode_jpeg(j).numpy() for j in jpegs])
    index = int(ex['id'].numpy().decode().split('/')[1])
    np.testing.assert_array_equal(frames, decoded[index]['video'])
    count += 1
  assert count == COUNTS['validation']


def test_pipeline_reads_tfds_source(data_dir):
  """``dataset='tfds:NAME'``: train batches, and every eval video once over 2 simulated hosts."""
  from dtf_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  source = pipeline.make_source('tfds:dtf_synthetic/small', 'train', data_dir, process_count=1)
  assert source.is_jpeg and source.class_names == synthetic.CLASSES and source.num_videos == 48
  batch = next(pipeline.train_dataset(source, batch_size=4, clip_length=8, size=48,
                                      scale_range=(48, 64), process_index=0).as_numpy_iterator())
  assert batch['video'].shape == (4, 8, 48, 48, 3) and batch['video'].dtype == np.float32
  assert set(batch['label']) <= set(range(8))
  labels = {}
  for p in range(2):
    source = pipeline.make_source('tfds:dtf_synthetic/small', 'validation', data_dir,
                                  process_count=2)
    data = pipeline.eval_dataset(source, batch_size=3, clip_length=16, size=64, num_clips=2,
                                 process_index=p)
    for b in data.dataset.as_numpy_iterator():
      for i in np.flatnonzero(b['mask']):
        labels.setdefault(int(b['video_index'][i]), []).append(
            (b['video_id'][i].decode(), int(b['label'][i])))
  assert sorted(labels) == list(range(16))
  ids = set()
  for views in labels.values():  # 2 clips x 1 crop of one video per index
    assert len(views) == 2 and views[0] == views[1]
    video_id, label = views[0]
    ids.add(video_id)
    assert label == int(video_id.split('/')[1]) % 8
  assert ids == {f'validation/{i:06d}' for i in range(16)}
  with pytest.raises(ValueError, match="no split 'test'"):
    pipeline.make_source('tfds:dtf_synthetic/small', 'test', data_dir, process_count=1)
  with pytest.raises(FileNotFoundError, match='not prepared'):
    pipeline.make_source('tfds:dtf_synthetic/small', 'train', str(data_dir) + '_empty',
                         process_count=1)


def test_long_range_small(tmp_path):
  """Config ``long_range_small``: the long-range class names, labels and clips (32 x 32 x 32)."""
  builder = tfds.builder('dtf_synthetic/long_range_small', data_dir=str(tmp_path))
  builder.download_and_prepare()
  info = builder.info
  assert info.features['label'].names == list(synthetic.LONG_RANGE_CLASSES)
  assert {name: s.num_examples for name, s in info.splits.items()} == {'train': 24,
                                                                        'validation': 8}
  assert str(info.version) == '3.0.0'
  psnrs = []
  for split, code, _ in synthetic.SPLITS:
    for ex in tfds.as_numpy(builder.as_dataset(split=split)):
      index = int(ex['id'].decode().split('/')[1])
      assert ex['label'] == index % 2 and ex['video'].shape == (32, 32, 32, 3)
      rendered = synthetic.render_long_range_clip(index % 2, synthetic.clip_rng(0, code, index),
                                                  32, 32)
      psnrs.append(_psnr(ex['video'], rendered))
  assert len(psnrs) == 32 and min(psnrs) > 25, min(psnrs)
