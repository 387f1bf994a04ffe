"""Multiply-accumulate (MAC) counting from a function's jaxpr, by category.

What is counted, per op (one MAC = one real multiply-add):

* ``conv``: convolutions, ``output size x kernel size x input channels / groups``;
* ``linear``: dense layers and other real matmuls (``dot_general``), ``output size x contraction``;
* ``attention``: the two activation-by-activation matmuls of window attention (q.k and attn.v);
* ``dtf_estimator``: the DTF filter estimator (a real matmul);
* ``dtf_mixing``: the complex channel mixing, 4 real MACs per complex MAC (it runs as one real
  matmul under :data:`dtf_jax.layers.dtf.MIXING_SCOPE`);
* ``dtf_fft``: ``rfft``/``irfft`` along time counted as the direct real DFT, ``2 n (n//2 + 1)``
  real MACs per transform of length ``n`` in each direction (which is how
  ``dtf_jax.layers.spectral`` computes them; an XLA ``fft`` op is counted the same way);
* ``dtf_elementwise``: the frame-wise correlation and aggregation (one MAC per product, ``K2 C``
  per location each) and the complex modulation (4 per complex product). These are the
  multiplies traced under :data:`dtf_jax.layers.aggregation.COUNTED_SCOPE`;
* ``temporal_conv``: the convolutions and matmuls of the baseline temporal modules
  (``dtf_jax.layers.baselines``, traced under its ``BASELINE_SCOPE``: temporal conv, the dynamic
  conv's tap predictor, the correlation and difference modules' 1x1 and 3x3 convs), counted as
  ``conv`` and ``linear`` are;
* ``temporal_elementwise``: the baselines' per-element products (the dynamic conv's taps applied,
  ``K`` per element; the next-frame correlation, ``K2 C`` per location), their multiplies under
  ``COUNTED_SCOPE``. The temporal shift and the frame differences have no multiplies.

Normalisations, activations, softmax, pooling and additions are not counted (as in the usual
counters), nor is the per-channel ``alpha`` scaling of a temporal module's output. ``CONVENTIONS``
gives the weight of each category in a total; ``'paper'`` is how the published GFLOPs were counted
(see ``PAPER_CONVENTION_NOTE``): what the usual layer-hook counters see (convolutions and linear
layers, the temporal modules' included), and no elementwise product, which they do not see.
"""

import collections
import functools
from typing import Any, Callable, Dict, Tuple

import jax
import numpy as np
from jax.extend import core as jex_core

from dtf_jax.layers.aggregation import COUNTED_SCOPE
from dtf_jax.layers.baselines import BASELINE_SCOPE
from dtf_jax.layers.dtf import MIXING_SCOPE
from dtf_jax.layers.spectral import DFT_SCOPE

CATEGORIES = ('conv', 'linear', 'attention', 'dtf_estimator', 'dtf_mixing', 'dtf_fft',
              'dtf_elementwise', 'temporal_conv', 'temporal_elementwise')

# Weight of each category's MACs in a convention's total.
CONVENTIONS = {
    'ours': {c: 1.0 for c in CATEGORIES},
    'paper': dict(conv=1.0, linear=1.0, attention=1.0, dtf_estimator=1.0, dtf_mixing=0.25,
                  dtf_fft=0.0, dtf_elementwise=0.0, temporal_conv=1.0, temporal_elementwise=0.0),
}
PAPER_CONVENTION_NOTE = (
    'convolutions and matmuls as here (temporal modules included), but a complex multiply-add '
    'counted as 1 (not 4), and the FFTs and elementwise products (correlation, aggregation, '
    'modulation, dynamic-conv taps) not counted')


def _size(aval) -> int:
  return int(np.prod(aval.shape, dtype=np.int64))


def _is_complex(aval) -> bool:
  return np.issubdtype(aval.dtype, np.complexfloating)


def _complex_factor(a, b) -> int:
  """Real MACs per multiply-add of operands ``a`` and ``b``: 4 complex x complex, 2 complex x
  real, 1 real."""
  return 2 ** (int(_is_complex(a)) + int(_is_complex(b)))


def _eqn_macs(eqn, scope: str):
  """(category, MACs) of one jaxpr equation, or None if it is not counted."""
  name = eqn.primitive.name
  if name == 'conv_general_dilated':
    out, rhs = eqn.outvars[0].aval, eqn.invars[1].aval
    out_channels = rhs.shape[eqn.params['dimension_numbers'].rhs_spec[0]]
    category = 'temporal_conv' if BASELINE_SCOPE in scope else 'conv'
    return category, _size(out) * _size(rhs) // out_channels
  if name == 'dot_general':
    lhs, rhs = eqn.invars[0].aval, eqn.invars[1].aval
    (lhs_contract, _), _ = eqn.params['dimension_numbers']
    macs = _size(eqn.outvars[0].aval) * int(np.prod([lhs.shape[d] for d in lhs_contract]))
    macs *= _complex_factor(lhs, rhs)
    if DFT_SCOPE in scope:  # the time DFT as a matmul: 2 n (n//2 + 1) per transform, as direct
      return 'dtf_fft', macs
    if MIXING_SCOPE in scope:
      return 'dtf_mixing', macs
    if BASELINE_SCOPE in scope:
      return 'temporal_conv', macs
    if '/temporal' in scope:
      return 'dtf_estimator', macs
    is_param_matmul = any(s in scope for s in ('/qkv', '/proj', '/mlp', '/head', '/reduction'))
    if '/attn' in scope and not is_param_matmul:
      return 'attention', macs
    return 'linear', macs
  if name == 'fft':
    n = int(np.prod(eqn.params['fft_lengths']))
    kind = eqn.params['fft_type']
    operand = eqn.invars[0].aval
    if kind == jax.lax.FftType.IRFFT:
      return 'dtf_fft', 2 * n * (n // 2 + 1) * (_size(operand) // (n // 2 + 1))
    if kind == jax.lax.FftType.RFFT:
      return 'dtf_fft', 2 * n * (n // 2 + 1) * (_size(operand) // n)
    return 'dtf_fft', 4 * n * n * (_size(operand) // n)  # complex DFT
  if name == 'mul' and DFT_SCOPE in scope:
    return 'dtf_fft', _size(eqn.outvars[0].aval)
  if name == 'mul' and COUNTED_SCOPE in scope:
    factor = _complex_factor(eqn.invars[0].aval, eqn.invars[1].aval)
    category = 'temporal_elementwise' if BASELINE_SCOPE in scope else 'dtf_elementwise'
    return category, factor * _size(eqn.outvars[0].aval)
  return None


def _walk(jaxpr, scope: str, totals: Dict[str, int], repeat: int = 1):
  """Adds the MACs of ``jaxpr`` (run ``repeat`` times) to ``totals``; recurses into sub-jaxprs
  (jit, custom_vjp, scan bodies times their length, the costliest branch of a cond, ...)."""
  for eqn in jaxpr.eqns:
    eqn_scope = f'{scope}/{eqn.source_info.name_stack}'
    if eqn.primitive.name == 'cond':  # alternatives (e.g. per platform): the costliest one
      options = []
      for branch in eqn.params['branches']:
        option = collections.Counter()
        _walk(branch.jaxpr, eqn_scope, option, repeat)
        options.append(option)
      totals.update(max(options, key=lambda o: sum(o.values())))
      continue
    if eqn.primitive.name == 'pallas_call' and str(eqn.params['name']).startswith('dtf_block_'):
      continue  # the fused DTF block (one row's jaxpr); its 'parts' branch is counted
    counted = _eqn_macs(eqn, eqn_scope)
    if counted:
      totals[counted[0]] += repeat * counted[1]
    inner = repeat * (eqn.params['length'] if eqn.primitive.name == 'scan' else 1)
    for name, param in eqn.params.items():
      if name in ('fwd_jaxpr_thunk', 'bwd', 'jvp_jaxpr_fun', 'jvp_jaxpr_thunk'):
        continue  # derivative rules, not the forward computation
      for sub in (param if isinstance(param, (list, tuple)) else [param]):
        if isinstance(sub, jex_core.ClosedJaxpr):
          _walk(sub.jaxpr, eqn_scope, totals, inner)
        elif isinstance(sub, jex_core.Jaxpr):
          _walk(sub, eqn_scope, totals, inner)


def count_macs(fn: Callable, *args) -> Dict[str, int]:
  """MACs of ``fn(*args)`` by category (``args`` may be ``jax.ShapeDtypeStruct``s)."""
  closed = jax.make_jaxpr(fn)(*args)
  totals = collections.Counter({c: 0 for c in CATEGORIES})
  _walk(closed.jaxpr, '', totals)
  return dict(totals)


def count_model_macs(model, view: jax.ShapeDtypeStruct) -> Tuple[Dict[str, int], Any]:
  """MACs of a model's forward pass on ``view`` (``B T H W 3``), by category, and the shapes of
  its variables (``jax.eval_shape`` of ``model.init``); nothing is computed or allocated."""
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0), view)
  return count_macs(lambda v, x: model.apply(v, x), shapes, view), shapes


def total_macs(macs: Dict[str, int], convention: str = 'ours') -> float:
  """Weighted total of :func:`count_macs` output under ``convention``."""
  weights = CONVENTIONS[convention]
  return float(sum(weights[c] * macs.get(c, 0) for c in CATEGORIES))
