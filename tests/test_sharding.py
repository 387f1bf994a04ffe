"""Data-parallel sharding over 8 (fake) CPU devices gives the single-device results.

``--xla_force_host_platform_device_count=8`` only takes effect if it is set before JAX initialises
its backend, which has usually already happened in a pytest process that ran other tests. So each
check runs in a fresh Python process (``subprocess``) with ``XLA_FLAGS`` set in its environment;
this file itself never touches the JAX backend.

In the child: a batch of 8 videos sharded ``P('data')`` over a ``('data',)`` mesh of 8 devices,
variables replicated, jitted forwards in eval mode and in train mode. Train mode checks that batch
norm uses the statistics of the GLOBAL batch (the logits and the updated ``batch_stats`` equal the
single-device ones, whereas each device alone holds one video). Tolerance: max abs error / max
abs value below 1e-5. ``jax.make_mesh``'s default axis types (Explicit in the pinned JAX) are
used for both models, and ``AxisType.Auto`` for Swin as well; the child reports each outcome as
JSON. The two children (ResNet, Swin) run concurrently.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REL_TOL = 1e-5

_SCRIPT = textwrap.dedent(r'''
    import json
    import os
    import traceback
    assert 'xla_force_host_platform_device_count=8' in os.environ.get('XLA_FLAGS', '')
    import flax
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    from dtf_jax.models import create_model

    name, kwargs, size = {name!r}, {kwargs!r}, {size!r}
    assert jax.device_count() == 8, jax.devices()

    model = create_model(name, **kwargs)
    rng = np.random.default_rng(0)
    # Per-video scale and offset, so that one device's statistics differ from the global ones.
    scale = rng.uniform(0.5, 2.0, (8, 1, 1, 1, 1))
    video = (rng.standard_normal((8, kwargs['clip_length'], size, size, 3)) * scale
             + rng.normal(0, 0.5, (8, 1, 1, 1, 1))).astype(np.float32)
    variables = jax.jit(model.init)(jax.random.key(0, impl='rbg'), video[:1])
    # Nonzero DTF alpha / bias, so that the spectrum branch (and its batch norm) matters.
    flat = flax.traverse_util.flatten_dict(variables['params'])
    for path, value in flat.items():
      if 'temporal' in path and path[-1] in ('alpha', 'bias'):
        flat[path] = jnp.asarray(rng.normal(0, 0.5, value.shape), jnp.float32)
    variables = dict(variables, params=flax.traverse_util.unflatten_dict(flat))

    def eval_fn(v, x):
      return model.apply(v, x, train=False)

    def train_fn(v, x):
      return model.apply(v, x, train=True, mutable=['batch_stats'],
                         rngs={{'dropout': jax.random.PRNGKey(3)}})

    def rel_err(a, b):
      a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
      return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))

    dev0 = jax.devices()[0]
    single_x = jax.device_put(video, dev0)
    single_v = jax.device_put(variables, dev0)
    ref_eval = jax.jit(eval_fn)(single_v, single_x)
    ref_logits, ref_stats = jax.jit(train_fn)(single_v, single_x)
    assert len(ref_eval.sharding.device_set) == 1

    def sharded_errors(axis_types):
      mesh = jax.make_mesh((8,), ('data',), axis_types=axis_types)
      data = NamedSharding(mesh, P('data'))
      replicated = NamedSharding(mesh, P())
      x = jax.device_put(video, data)
      v = jax.device_put(variables, replicated)
      assert x.sharding.shard_shape(x.shape)[0] == 1
      assert len(x.addressable_shards) == 8
      out_eval = jax.jit(eval_fn)(v, x)
      out_logits, out_stats = jax.jit(train_fn)(v, x)
      assert len(out_eval.sharding.device_set) == 8
      errors = {{'eval': rel_err(out_eval, ref_eval), 'train': rel_err(out_logits, ref_logits)}}
      ref_flat = flax.traverse_util.flatten_dict(ref_stats['batch_stats'])
      out_flat = flax.traverse_util.flatten_dict(out_stats['batch_stats'])
      assert set(ref_flat) == set(out_flat) and ref_flat
      errors['batch_stats'] = max(rel_err(out_flat[p], ref_flat[p]) for p in ref_flat)
      return errors

    ref_flat = flax.traverse_util.flatten_dict(ref_stats['batch_stats'])
    old_flat = flax.traverse_util.flatten_dict(variables['batch_stats'])
    # The stats really moved (so the comparison is not of two copies of the initial values).
    assert all(not np.allclose(ref_flat[p], old_flat[p]) for p in ref_flat if 'spectrum_norm' in p)

    results = {{}}
    # 'default': jax.make_mesh's default axis types (Explicit in this JAX); 'auto': AxisType.Auto.
    for kind, axis_types in (('default', None), ('auto', (AxisType.Auto,)))[:{n_meshes!r}]:
      try:
        results[kind] = sharded_errors(axis_types)
      except Exception as e:  # reported to the parent test
        results[kind] = {{'exception': type(e).__name__ + ': ' + str(e).split(chr(10))[0][:500],
                          'traceback': traceback.format_exc()[-3000:]}}

    if {local_check!r}:
      # Not vacuous: statistics of one device's video alone differ from the global ones.
      _, local_stats = jax.jit(train_fn)(single_v, single_x[:1])
      local_flat = flax.traverse_util.flatten_dict(local_stats['batch_stats'])
      results['local_vs_global_stats'] = max(rel_err(local_flat[p], ref_flat[p])
                                             for p in ref_flat)
    print('RESULTS ' + json.dumps(results))
''')

RESNET_KW = dict(num_classes=10, clip_length=8, width=8, stage_sizes=(1, 1, 1, 1))
# Two stages to halve compile time: 32 px -> 8x8 tokens (window 4, the second block shifted),
# then 4x4 tokens (one window: both blocks unshifted, so both carry DTF); patch merging between.
SWIN_KW = dict(num_classes=10, clip_length=8, image_size=32, window_size=4, embed_dim=32,
               depths=(2, 2), num_heads=(1, 2))

MODELS = {'resnet': ('dtf_r50', RESNET_KW, 32), 'swin': ('dtf_swin_t', SWIN_KW, 32)}
_RESULTS = {}


def _start_child(family):
  name, kwargs, size = MODELS[family]
  script = _SCRIPT.format(name=name, kwargs=kwargs, size=size,
                          local_check=(family == 'resnet'),
                          n_meshes=1 if family == 'resnet' else 2)
  env = dict(os.environ)
  env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') +
                      ' --xla_force_host_platform_device_count=8').strip()
  env['JAX_PLATFORMS'] = 'cpu'
  env['PYTHONPATH'] = REPO + os.pathsep + env.get('PYTHONPATH', '')
  return subprocess.Popen([sys.executable, '-c', script], env=env, cwd=REPO, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _child_results(family):
  """RESULTS dict of the child process of ``family``.

  All children are started together on first use (XLA compiles mostly on one core, so they
  overlap well) and each is waited for once.
  """
  if not _RESULTS:
    _RESULTS.update({f: _start_child(f) for f in MODELS})
  if isinstance(_RESULTS[family], subprocess.Popen):
    proc = _RESULTS[family]
    try:
      stdout, stderr = proc.communicate(timeout=400)
    except subprocess.TimeoutExpired:
      proc.kill()
      stdout, stderr = proc.communicate()
    lines = [l for l in stdout.splitlines() if l.startswith('RESULTS ')]
    if proc.returncode != 0 or not lines:
      _RESULTS[family] = RuntimeError(f'child for {family} failed (rc {proc.returncode}):\n'
                                      + stdout[-3000:] + stderr[-5000:])
    else:
      _RESULTS[family] = json.loads(lines[-1][len('RESULTS '):])
  if isinstance(_RESULTS[family], Exception):
    raise _RESULTS[family]
  return _RESULTS[family]


def teardown_module():
  for value in _RESULTS.values():
    if isinstance(value, subprocess.Popen) and value.poll() is None:
      value.kill()
      value.communicate()


@pytest.mark.parametrize('family,mesh_kind', [
    pytest.param('resnet', 'default', marks=pytest.mark.slow),  # (Auto axes: Swin only)
    ('swin', 'default'),  # Explicit axes: window ops must never merge the sharded batch axis
    ('swin', 'auto'),
])
def test_data_parallel_matches_single_device(family, mesh_kind):
  results = _child_results(family)
  errors = results[mesh_kind]
  assert 'exception' not in errors, errors.get('exception', '') + '\n' + errors.get('traceback', '')
  for what in ('eval', 'train', 'batch_stats'):
    assert errors[what] < REL_TOL, (what, errors)


def test_one_device_batch_stats_differ_from_global():
  """Not vacuous: the statistics of one device's video alone differ from the global-batch ones.

  (Checked on the ResNet only, to save a compile.)
  """
  assert _child_results('resnet')['local_vs_global_stats'] > 1e-3
