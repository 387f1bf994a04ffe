"""Export for serving (issue 14, item 4): ``dtf_jax.export`` and ``python -m dtf_jax.tools.export``.

One tiny DTF ResNet (4 frames of 32x32, width 8, one bottleneck per stage) is saved with
``save_pretrained`` and exported by the CLI once per module; a fresh Python process loads the
export (``jax.export.deserialize`` and the stored arrays, no model code) and its logits match
``model.apply(variables, video, train=False)`` at two batch sizes (the batch is symbolic), to
``ATOL`` (float32). Lowering for CUDA and TPU is checked on this CPU for each model family.
"""

import contextlib
import io
import json
import os
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dtf_jax import export
from dtf_jax.data import ops
from dtf_jax.models import create_model
from dtf_jax.pretrained import save_pretrained
from dtf_jax.tools import export as export_tool

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ATOL = 1e-5  # float32 logits of the reloaded function vs the Flax model (measured: 0)
TINY = dict(num_classes=5, clip_length=4, width=8, stage_sizes=(1, 1, 1, 1), dtf_stages=(4,),
            early_stride=1)
SIZE = 32
CLASSES = ['walk', 'run', 'jump', 'sit', 'wave']
BATCHES = (1, 3)

# Runs in a fresh process: loads the export and writes the logits of each saved video.
_RELOAD = """
import sys
import numpy as np
from dtf_jax import export
directory, videos, logits = sys.argv[1:4]
fn = export.load(directory)
with np.load(videos) as stored:
  out = {name: np.asarray(fn(stored[name])) for name in stored.files}
np.savez(logits, **out)
print('class_names', fn.class_names)
print('model code imported', any(m.startswith(('flax', 'dtf_jax.models')) for m in sys.modules))
"""


def _variables(model, seed):
  """Random variables of ``model`` (nothing compiled), batch statistics included.
  ``{'params', 'batch_stats'}``."""
  video = jax.ShapeDtypeStruct((1, model.clip_length, SIZE, SIZE, 3), jnp.float32)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), video)
  rng = np.random.default_rng(seed)
  flat = {}
  for path, leaf in flax.traverse_util.flatten_dict(shapes).items():
    if path[-1] == 'var':
      value = rng.uniform(0.5, 1.5, leaf.shape)
    elif path[-1] == 'scale':
      value = 1 + 0.1 * rng.standard_normal(leaf.shape)
    elif path[-1] in ('mean', 'bias'):
      value = 0.1 * rng.standard_normal(leaf.shape)
    else:
      value = rng.standard_normal(leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]) or 1)
    flat[path] = value.astype(np.float32)
  return flax.traverse_util.unflatten_dict(flat)


def _forward(model, variables, video):
  """The reference: ``model.apply(variables, video, train=False)``, jitted."""
  return jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, video)


def _videos(batches=BATCHES, frames=TINY['clip_length']):
  rng = np.random.default_rng(7)
  return {f'b{b}': rng.standard_normal((b, frames, SIZE, SIZE, 3)).astype(np.float32)
          for b in batches}


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
  """``(model, variables, checkpoint dir, export dir, CLI output)``: the CLI's export of a
  ``save_pretrained`` directory."""
  root = tmp_path_factory.mktemp('export')
  model = create_model('dtf_r50', **TINY)
  variables = _variables(model, 0)
  checkpoint = save_pretrained(str(root / 'ckpt'), 'dtf_r50', TINY, variables,
                               class_names=CLASSES)
  out = str(root / 'export')
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    export_tool.main(['--checkpoint', checkpoint, '--out', out, '--size', str(SIZE)])
  return model, variables, checkpoint, out, printed.getvalue()


def test_reload_in_fresh_process_matches_flax(exported, tmp_path):
  model, variables, _, out, _ = exported
  videos = _videos()
  np.savez(tmp_path / 'videos.npz', **videos)
  proc = subprocess.run(
      [sys.executable, '-c', _RELOAD, out, str(tmp_path / 'videos.npz'),
       str(tmp_path / 'logits.npz')], cwd=REPO, env=dict(os.environ, JAX_PLATFORMS='cpu'),
      capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f'class_names {CLASSES}' in proc.stdout
  assert 'model code imported False' in proc.stdout  # jax.export and numpy only
  with np.load(tmp_path / 'logits.npz') as logits:
    for name, video in videos.items():
      expected = np.asarray(_forward(model, variables, video))
      got = logits[name]
      assert got.dtype == np.float32 and got.shape == (video.shape[0], 5), name
      print(f'batch {video.shape[0]}: max |logit difference| {np.abs(got - expected).max():.3g} '
            f'(max |logit| {np.abs(expected).max():.3g})')
      np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL, err_msg=name)


def test_cli_meta_and_summary(exported):
  model, _, checkpoint, out, printed = exported
  meta = json.loads(open(os.path.join(out, 'meta.json')).read())
  assert meta['format'] == export.FORMAT
  assert meta['class_names'] == CLASSES
  assert meta['input']['shape'] == ['B', 4, SIZE, SIZE, 3]
  assert meta['input']['layout'] == 'B T H W 3' and meta['input']['dtype'] == 'float32'
  assert meta['input']['frames'] == 4 and meta['input']['frame_size'] == [SIZE, SIZE]
  normalization = meta['input']['normalization']
  assert normalization['mean'] == list(ops.IMAGENET_MEAN)
  assert normalization['std'] == list(ops.IMAGENET_STD)
  assert meta['output'] == dict(meta['output'], shape=['B', 5], dtype='float32')
  assert meta['model'] == 'dtf_r50' and meta['model_class'] == 'ResNet'
  assert meta['kwargs'] == dict(meta['kwargs'], stage_sizes=[1, 1, 1, 1], dtf_stages=[4],
                                width=8, clip_length=4, num_classes=5, dtype='float32')
  assert meta['source']['checkpoint'] == checkpoint and meta['source']['step'] is None
  assert meta['platforms'] == ['cpu', 'cuda', 'tpu'] and meta['jax_version'] == jax.__version__
  count = sum(x.size for x in jax.tree_util.tree_leaves(_variables(model, 0)['params']))
  assert meta['parameters']['count'] == count
  files = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
  assert sorted(os.listdir(out)) == ['function.jaxexport', 'meta.json', 'params.npz']
  assert f'Loading {checkpoint} (dtf_r50)' in printed
  assert f'Wrote {out} in ' in printed and f'{count:,} parameters, {files:,} bytes' in printed
  assert 'platforms cpu, cuda, tpu' in printed


def test_serialized_function_lists_platforms(exported):
  out = exported[3]
  with open(os.path.join(out, 'function.jaxexport'), 'rb') as f:
    function = jax.export.deserialize(bytearray(f.read()))
  assert function.platforms == ('cpu', 'cuda', 'tpu')
  video = function.in_avals[-1]
  assert jax.export.is_symbolic_dim(video.shape[0]) and video.shape[1:] == (4, SIZE, SIZE, 3)
  assert function.out_avals[0].dtype == jnp.float32


def test_load_errors(exported, tmp_path):
  fn = export.load(exported[3])
  with pytest.raises(ValueError, match=r'expected a video B x T x H x W x 3 = B x 4 x 32 x 32 x '
                                       r'3 \(B >= 1\), got shape \(2, 8, 32, 32, 3\)'):
    fn(np.zeros((2, 8, SIZE, SIZE, 3), np.float32))
  with pytest.raises(ValueError, match=r'B x 4 x 32 x 32 x 3 .*got shape \(4, 32, 32, 3\)'):
    fn(np.zeros((4, SIZE, SIZE, 3), np.float32))
  with pytest.raises(ValueError, match=r'normalised float32 clips, got uint8.*pixels / 255'):
    fn(np.zeros((1, 4, SIZE, SIZE, 3), np.uint8))
  missing = tmp_path / 'nowhere'
  with pytest.raises(FileNotFoundError, match=f'{missing}: no such export directory'):
    export.load(str(missing))
  (tmp_path / 'partial').mkdir()
  with pytest.raises(FileNotFoundError, match=f'{tmp_path / "partial" / "meta.json"} is missing'):
    export.load(str(tmp_path / 'partial'))


def _copy(out, to):
  to.mkdir()
  for name in os.listdir(out):
    (to / name).write_bytes(open(os.path.join(out, name), 'rb').read())
  return to


@pytest.mark.parametrize('victim,damage,message,unchecked', [
    ('function.jaxexport', lambda b: b[:len(b) // 2], r'has \d+ bytes, \d+ were exported', True),
    ('function.jaxexport', lambda b: os.urandom(len(b)), 'does not match the SHA-256', True),
    ('function.jaxexport', lambda b: b[:100] + bytes([b[100] ^ 1]) + b[101:],
     'does not match the SHA-256', False),  # one bit, the same size: only the checksum sees it
    ('params.npz', lambda b: b[:-10] + bytes(10), 'does not match the SHA-256', True),
    ('params.npz', lambda b: b'', r'has 0 bytes', True),
])
def test_damaged_export_is_named(exported, tmp_path, victim, damage, message, unchecked):
  copy = _copy(exported[3], tmp_path / 'copy')
  (copy / victim).write_bytes(damage((copy / victim).read_bytes()))
  with pytest.raises(export.ExportError, match=f'{copy / victim} {message}'):
    export.load(str(copy))
  # Without the checksums (an export made before they were recorded), the damage is still named
  # where the file cannot be read.
  meta = json.loads((copy / 'meta.json').read_text())
  meta.pop('function_sha256'), meta.pop('function_bytes')
  meta['parameters'].pop('sha256'), meta['parameters'].pop('file_bytes')
  (copy / 'meta.json').write_text(json.dumps(meta))
  if unchecked:
    with pytest.raises(export.ExportError, match=f'{copy / victim} (cannot be|does not fit)'):
      export.load(str(copy))


def test_meta_json_names_only_files_of_the_export(exported, tmp_path):
  copy = _copy(exported[3], tmp_path / 'copy')
  meta = json.loads((copy / 'meta.json').read_text())
  meta['parameters']['file'] = '../elsewhere.npz'
  (copy / 'meta.json').write_text(json.dumps(meta))
  with pytest.raises(export.ExportError, match=r"names '../elsewhere.npz': not a file of"):
    export.load(str(copy))


def test_non_finite_input_gives_nan_logits_on_every_path(exported):
  model, variables, _, out, _ = exported
  video = _videos((3,))['b3']
  video[0, 1, 2, 3, 0] = np.nan
  video[1] = np.inf
  for name, logits in (('eager', model.apply(variables, video)),
                       ('jit', jax.jit(model.apply)(variables, video)),
                       ('export', export.load(out)(video))):
    logits = np.asarray(logits)
    assert np.isnan(logits[:2]).all() and np.isfinite(logits[2]).all(), name
  np.testing.assert_allclose(np.asarray(export.load(out)(video[2:])),
                             _forward(model, variables, video[2:]), rtol=0, atol=ATOL)


def test_overwrite_refused_then_replaced(exported, tmp_path):
  model, variables, checkpoint, out, _ = exported
  with pytest.raises(FileExistsError, match=f'{out} holds an export .*overwrite=True'):
    export.export_model(model, variables, out, size=SIZE)
  with pytest.raises(SystemExit, match=r'--out .* holds meta.json .*pass --overwrite'):
    export_tool.main(['--checkpoint', checkpoint, '--out', out, '--size', str(SIZE)])
  with pytest.raises(SystemExit, match=r'--size is needed: dtf_r50 takes any frame size'):
    export_tool.main(['--checkpoint', checkpoint, '--out', out])
  # A directory with another meta.json (here the checkpoint itself) is never replaced.
  with pytest.raises(FileExistsError, match=r'not the meta.json of an export .*another directory'):
    export.export_model(model, variables, checkpoint, size=SIZE, overwrite=True)
  # Replacing: a copy of the export gets new variables and class names.
  copy = _copy(out, tmp_path / 'copy')
  other = _variables(model, 1)
  export.export_model(model, other, str(copy), size=SIZE, class_names=list('abcde'),
                      overwrite=True)
  fn = export.load(str(copy))
  assert fn.class_names == list('abcde') and fn.meta['model'] is None
  video = _videos((2,))['b2']
  np.testing.assert_allclose(fn(jnp.asarray(video)), _forward(model, other, video),
                             rtol=0, atol=ATOL)


def test_export_arguments_checked(exported, tmp_path):
  model, variables = exported[:2]
  with pytest.raises(ValueError, match='ResNet takes any frame size: pass size='):
    export.export_model(model, variables, str(tmp_path / 'a'))
  with pytest.raises(ValueError, match=r"platforms=\('cpu', 'gpu'\): \['gpu'\]"):
    export.export_model(model, variables, str(tmp_path / 'a'), size=SIZE,
                        platforms=('cpu', 'gpu'))
  with pytest.raises(ValueError, match='2 class names for 5 classes'):
    export.export_model(model, variables, str(tmp_path / 'a'), size=SIZE, class_names=['a', 'b'])
  assert not (tmp_path / 'a').exists()


SWIN = dict(num_classes=3, clip_length=4, early_stride=1, image_size=32, window_size=4,
            embed_dim=16, depths=(1, 1), num_heads=(1, 1))


@pytest.mark.parametrize('name, kwargs', [
    ('dtf_r50', dict(TINY, fa_impl='pallas')),  # exported with the portable 'scan'
    ('c2d_r50', TINY),
    ('dtf_swin_t', SWIN),
])
def test_families_lower_for_every_platform(name, kwargs, tmp_path):
  model = create_model(name, **kwargs)
  variables = _variables(model, 2)
  out = export.export_model(model, variables, str(tmp_path / name), size=SIZE, model_name=name)
  fn = export.load(out)
  assert fn.exported.platforms == ('cpu', 'cuda', 'tpu')
  assert fn.meta['kwargs']['fa_impl'] == 'scan'  # 'auto' and 'pallas' are replaced
  video = _videos((2,))['b2']
  np.testing.assert_allclose(fn(video), _forward(model, variables, video),
                             rtol=0, atol=ATOL)


# Runs in a fresh process with a local Cloud Storage: the CLI exports into the bucket, and the
# export is loaded from there.
_IN_BUCKET = """
import sys
import numpy as np
from dtf_jax import export
from dtf_jax.tools import export as export_tool
checkpoint, url, videos, logits = sys.argv[1:5]
export_tool.main(['--checkpoint', checkpoint, '--out', url, '--size', '32'])
with np.load(videos) as stored:
  np.save(logits, np.asarray(export.load(url)(stored['b2'])))
"""


def test_export_into_a_bucket(exported, tmp_path):
  from local_gcs import local_gcs  # pylint: disable=import-outside-toplevel
  model, variables, checkpoint = exported[:3]
  videos = _videos((2,))
  np.savez(tmp_path / 'videos.npz', **videos)
  with local_gcs('dtf-test') as gcs:
    proc = subprocess.run(
        [sys.executable, '-c', _IN_BUCKET, checkpoint, f'{gcs.url}/exports/tiny',
         str(tmp_path / 'videos.npz'), str(tmp_path / 'logits.npy')], cwd=REPO,
        env=dict(gcs.child_env(), JAX_PLATFORMS='cpu'), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert gcs.object_names('exports/tiny/') == [
        'exports/tiny/', 'exports/tiny/function.jaxexport', 'exports/tiny/meta.json',
        'exports/tiny/params.npz']
    assert json.loads(gcs.read('exports/tiny/meta.json'))['class_names'] == CLASSES
  np.testing.assert_allclose(np.load(tmp_path / 'logits.npy'),
                             _forward(model, variables, videos['b2']), rtol=0, atol=ATOL)
