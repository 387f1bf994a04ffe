"""The frame-wise aggregation implementations (dtf_jax/layers/aggregation.py): every ``fa_impl``
against a float64 NumPy loop over SPEC §1's formulas, gradients against autodiff of a plain
float32 expression, the Pallas kernel in interpret mode, and the ``'auto'`` choice."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dtf_jax.layers import aggregation, aggregation_pallas
from dtf_jax.layers.aggregation import frame_wise_aggregation, resolve_fa_impl
from dtf_jax.layers.dtf import DTFBlock

IMPLS = ('scan', 'xla', 'pallas')
# 'pallas' runs the TPU tiling in interpret mode on the CPU; 'pallas_row' the GPU one.
TESTED = IMPLS + ('pallas_row',)


@pytest.fixture
def fa_impl(request, monkeypatch):
  """The ``fa_impl`` to pass; ``'pallas_row'`` is ``'pallas'`` with the GPU tiling."""
  if request.param == 'pallas_row':
    monkeypatch.setitem(aggregation.PALLAS_TILING, 'cpu', 'row')
    return 'pallas'
  return request.param


def _reference(x, k):
  """SPEC §1 step 1 in float64 loops: ``(out, corr)`` of ``x: B T H W C``."""
  x = np.asarray(x, np.float64)
  _, time, height, width, channels = x.shape
  p = k // 2
  padded = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p), (0, 0)))
  corr = np.zeros(x.shape[:-1] + (k * k,))
  agg = np.zeros_like(x)
  for t in range(time):
    query = x[:, max(t - 1, 0)]
    neighbours = [padded[:, t, i:i + height, j:j + width] for i in range(k) for j in range(k)]
    for n, nb in enumerate(neighbours):
      corr[:, t, ..., n] = (query * nb).sum(-1) / channels
    att = np.exp(corr[:, t] - corr[:, t].max(-1, keepdims=True))
    att /= att.sum(-1, keepdims=True)
    for n, nb in enumerate(neighbours):
      agg[:, t] += att[..., n:n + 1] * nb
  out = x.copy()
  out[:, :-1] += agg[:, 1:]
  return out, corr


def _plain(x, k):
  """The same in one autodiff-able float32 expression (gradient reference)."""
  _, _, height, width, channels = x.shape
  p = k // 2
  padded = jnp.pad(x, ((0, 0), (0, 0), (p, p), (p, p), (0, 0)))
  query = jnp.concatenate([x[:, :1], x[:, :-1]], axis=1)
  nbs = jnp.stack([padded[:, :, i:i + height, j:j + width] for i in range(k) for j in range(k)], -2)
  corr = jnp.einsum('bthwc,bthwnc->bthwn', query, nbs,
                    precision=jax.lax.Precision.HIGHEST) / channels
  agg = jnp.einsum('bthwn,bthwnc->bthwc', jax.nn.softmax(corr, -1), nbs,
                   precision=jax.lax.Precision.HIGHEST)
  return x + jnp.concatenate([agg[:, 1:], jnp.zeros_like(agg[:, :1])], axis=1), corr


_jit_fa = jax.jit(frame_wise_aggregation, static_argnums=(1, 2))

CASES = {
    'odd_frame': ((2, 4, 5, 7, 12), 3),   # odd frame size, channels not a multiple of 128
    't1': ((1, 1, 6, 5, 8), 3),           # T = 1: nothing to aggregate
    'k5_c24': ((1, 2, 5, 6, 24), 5),      # K = 5, channels 16 + 8 (the GPU tiling's chunks)
    't16_small': ((1, 16, 3, 4, 8), 3),   # T = 16, frames smaller than the window
}


def _loss(fa, g_out, g_corr):
  """A scalar with cotangents on both outputs (the estimator consumes ``corr``)."""
  return lambda v: jnp.sum(fa(v)[0] * g_out) + jnp.sum(jnp.sin(fa(v)[1]) * g_corr)


@functools.lru_cache(maxsize=None)
def _case(name):
  """Input, cotangents, float64 reference values and the autodiff reference gradient."""
  shape, k = CASES[name]
  rng = np.random.default_rng(sum(shape))
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  g_out = jnp.asarray(rng.normal(size=shape), jnp.float32)
  g_corr = jnp.asarray(rng.normal(size=shape[:-1] + (k * k,)), jnp.float32)
  grad = jax.jit(jax.grad(_loss(lambda v: _plain(v, k), g_out, g_corr)))(x)
  return x, k, g_out, g_corr, _reference(x, k), grad


@pytest.mark.parametrize('fa_impl', TESTED, indirect=True)
@pytest.mark.parametrize('case', CASES)
def test_values_and_gradients_match_reference(fa_impl, case):
  impl = fa_impl
  x, k, g_out, g_corr, (want_out, want_corr), want_grad = _case(case)

  @jax.jit
  def run(v):
    out, corr = frame_wise_aggregation(v, k, impl)
    return out, corr, jax.grad(_loss(lambda u: frame_wise_aggregation(u, k, impl), g_out,
                                     g_corr))(v)

  if impl == 'pallas' and aggregation.PALLAS_TILING['cpu'] == 'row':
    if case in ('t16_small', 'k5_c24'):  # compiling the interpreted GPU tiling takes long
      pytest.skip('covered by the TPU tiling; the kernels share everything but the tiling')
  out, corr, grad = run(x)
  assert out.shape == x.shape and out.dtype == jnp.float32
  assert corr.shape == x.shape[:-1] + (k * k,) and corr.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(corr), want_corr, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(out), want_out, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(grad), np.asarray(want_grad), atol=2e-5, rtol=2e-5)
  if x.shape[1] > 1:  # the aggregation did something
    assert np.abs(want_out - np.asarray(x)).max() > 0.1


@pytest.mark.parametrize('fa_impl', TESTED, indirect=True)
def test_bfloat16(fa_impl):
  impl = fa_impl
  """bf16 input: output in bf16 within bf16 rounding of the float64 reference."""
  x = jnp.asarray(np.random.default_rng(5).normal(size=(1, 4, 5, 6, 16)), jnp.bfloat16)
  out, corr = _jit_fa(x, 3, impl)
  assert out.dtype == jnp.bfloat16 and corr.dtype == jnp.float32
  want_out, want_corr = _reference(np.asarray(x.astype(jnp.float32)), 3)
  np.testing.assert_allclose(np.asarray(out.astype(jnp.float32)), want_out, atol=5e-2, rtol=2e-2)
  np.testing.assert_allclose(np.asarray(corr), want_corr, atol=2e-2, rtol=2e-2)
  grad = jax.jit(jax.grad(
      lambda v: jnp.sum(frame_wise_aggregation(v, 3, impl)[0].astype(jnp.float32))))(x)
  assert grad.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(grad, np.float32)))


@pytest.mark.parametrize('tiling,platform,marker', [('frame', 'tpu', 'tpu_custom_call'),
                                                     ('row', 'cuda', 'triton')])
def test_pallas_kernels_lower_for_their_backend(tiling, platform, marker):
  """Each tiling's forward (one pallas_call) and gradient (one for the TPU tiling, two for the
  GPU one) lower, on this CPU, for their accelerator: Mosaic for the TPU, Triton for the GPU, at
  DTF-R50's stage-1 shape in bf16 and an odd small one. This checks what the lowering checks
  (block shapes, power-of-two tiles, supported ops); compiling and running needs the device."""
  for shape, dtype in (((2, 4, 56, 56, 64), jnp.bfloat16), ((1, 3, 5, 7, 12), jnp.float32)):
    x = jax.ShapeDtypeStruct(shape, dtype)
    g_corr = jax.ShapeDtypeStruct(shape[:-1] + (9,), jnp.float32)
    fwd = jax.jit(lambda v: aggregation_pallas.frame_wise_aggregation_kernel(v, 3, tiling))
    grad = jax.jit(lambda v, g, c: aggregation_pallas.frame_wise_aggregation_grad(v, g, c, 3,
                                                                                 tiling))
    for fn, args, kernels in ((fwd, (x,), 1), (grad, (x, x, g_corr), 1 if tiling == 'frame' else 2)):
      assert str(jax.make_jaxpr(fn)(*args)).count('pallas_call') == kernels
      text = fn.trace(*args).lower(lowering_platforms=(platform,)).as_text()
      assert marker in text


def test_auto_choice_and_errors():
  assert resolve_fa_impl('auto', 'cpu') == aggregation.AUTO_FA_IMPL['cpu'] == 'scan'
  for backend in ('gpu', 'tpu'):
    assert resolve_fa_impl('auto', backend) in IMPLS
  for impl in IMPLS:
    assert resolve_fa_impl(impl, 'cpu') == impl
  with pytest.raises(ValueError, match="fa_impl='fast'"):
    resolve_fa_impl('fast')
  x = jnp.zeros((1, 4, 4, 4, 8))
  with pytest.raises(ValueError, match="fa_impl='fast'"):
    jax.eval_shape(DTFBlock(fa_impl='fast').init, jax.random.PRNGKey(0), x)


_SHARDED_CHILD = r'''
import contextlib
import json
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from dtf_jax.layers.aggregation import frame_wise_aggregation
assert jax.device_count() == 8
x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 4, 5, 6, 8)), jnp.float32)
loss = lambda impl: lambda v: jnp.sum(frame_wise_aggregation(v, 3, impl)[0] ** 2)
ref = frame_wise_aggregation(x, 3, 'xla') + (jax.grad(loss('xla'))(x),)
results = {}
for kind, set_mesh in ((AxisType.Explicit, False), (AxisType.Auto, False), (AxisType.Auto, True)):
  mesh = jax.make_mesh((4, 2), ('data', 'fsdp'), axis_types=(kind, kind))
  xs = jax.device_put(x, NamedSharding(mesh, P(('data', 'fsdp'))))
  fwd = jax.jit(lambda v: frame_wise_aggregation(v, 3, 'pallas'))
  grad = jax.jit(jax.grad(loss('pallas')))
  with jax.set_mesh(mesh) if set_mesh else contextlib.nullcontext():
    got = fwd(xs) + (grad(xs),)
    hlo = fwd.lower(xs).compile().as_text() + grad.lower(xs).compile().as_text()
  results[str(kind) + (' set_mesh' if set_mesh else '')] = dict(
      error=max(float(jnp.abs(a - b).max()) for a, b in zip(got, ref)),
      batch_sharded=all(len(g.sharding.device_set) == 8 and g.addressable_shards[0].data.shape[0] == 1
                        for g in got),
      gathers=hlo.count('all-gather'), shard_map='shard_map' in hlo)
print('RESULTS', json.dumps(results))
'''


def test_pallas_runs_per_batch_shard():
  """On 8 (fake) CPU devices, batch-sharded input, Explicit and Auto mesh axes (Auto with and
  without ``jax.set_mesh``, as the trainer and as a library user may call it): the kernel runs on
  each device's videos (no all-gather in the forward or the gradient), with the single-device
  values. A fresh process, since the device count is fixed when JAX starts."""
  import json
  import os
  import subprocess
  import sys
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=repo,
             XLA_FLAGS=os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8')
  proc = subprocess.run([sys.executable, '-c', _SHARDED_CHILD], env=env, cwd=repo,
                        capture_output=True, text=True, timeout=300)
  lines = [l for l in proc.stdout.splitlines() if l.startswith('RESULTS ')]
  assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-4000:]
  results = json.loads(lines[-1][len('RESULTS '):])
  assert len(results) == 3, results
  for kind, result in results.items():
    assert result['error'] < 1e-5, (kind, result)
    assert result['batch_sharded'] and result['gathers'] == 0, (kind, result)
  # shard_map where the mesh is known while tracing (the TPU route); custom partitioning else.
  assert [r['shard_map'] for r in results.values()] == [True, False, True], results
