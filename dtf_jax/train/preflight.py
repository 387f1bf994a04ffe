"""Pod preflight: the trainer's exact train and eval steps compiled for a TPU topology, on any host.

    python main.py --config=configs/dtf_swin_b.py --compile_only=v5e:16x16

Builds the run's ``Setup`` (mesh and fsdp, remat, accumulation, global batch, donation, dtype)
over the target's abstract TPU devices (``dtf_jax.tpu_target``), lowers and compiles the train
step and the eval step for them, and prints per chip: memory (arguments, temporaries, output,
aliased, peak) against the chip's HBM, FLOPs, bytes accessed, the roofline lower bound of the step
time, and the compile time. Nothing is read (no data, no checkpoint) and nothing is written.

When a step does not fit (the TPU compiler refuses it, or its peak exceeds HBM), the train step is
compiled again with the other remat options and with more gradient accumulation (same global
batch), and the first that fits is named; the exit code is then 1.
"""

import dataclasses
from typing import Callable, List, Optional

import jax
import jax.numpy as jnp
import ml_collections

from dtf_jax import tpu_target
from dtf_jax.train.config import Setup, check_batches, setup
from dtf_jax.train.evaluate import _predict_fn
from dtf_jax.train.step import make_train_step


# The model's remat options, from the least memory saved to the most.
REMAT_BY_SAVING = ('none', 'dtf', 'block')


@dataclasses.dataclass
class StepResult:
  """One compiled step: its figures, or why it did not compile."""
  what: str  # 'train' or 'eval'
  remat: str
  grad_accum_steps: int
  stats: Optional[tpu_target.CompiledStats] = None
  error: str = ''

  def fits(self, chip: tpu_target.Chip) -> bool:
    return self.stats is not None and self.stats.peak_bytes <= chip.hbm_bytes


def _out_of_memory(error: Exception) -> bool:
  text = str(error)
  return 'RESOURCE_EXHAUSTED' in text or 'Ran out of memory' in text or 'out of memory' in text


def _compile(what: str, config, lower: Callable[[], object]) -> StepResult:
  result = StepResult(what, config.model.remat, config.grad_accum_steps)
  try:
    result.stats = tpu_target.compile_stats(lower())
  except Exception as e:  # pylint: disable=broad-except
    if not _out_of_memory(e):
      raise
    result.error = str(e).strip().splitlines()[0][:200]
  return result


def train_step_lowering(s: Setup):
  """``() -> Lowered``: the train step of ``s`` for its global batch (shapes only)."""
  config = s.config
  shape = (config.batch_size, config.data.clip_length, config.data.size, config.data.size, 3)
  batch = {'video': jax.ShapeDtypeStruct(shape, jnp.float32),
           'label': jax.ShapeDtypeStruct((config.batch_size,), jnp.int32)}
  return lambda: make_train_step(s).lower(s.abstract_state, batch)


def eval_step_lowering(s: Setup):
  """``() -> Lowered``: the eval forward of ``s`` for one ``eval_batch_size`` batch of views."""
  config = s.config
  size = config.data.eval_size
  video = jax.ShapeDtypeStruct(
      (config.eval_batch_size, config.data.clip_length, size, size, 3), jnp.float32,
      sharding=s.batch_sharding)
  variables = {
      k: jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                      getattr(s.abstract_state, k), getattr(s.state_sharding, k))
      for k in ('params', 'batch_stats')}
  return lambda: _predict_fn(s).lower(variables, video)


def alternatives(config, num_devices: int) -> List[ml_collections.ConfigDict]:
  """Train-step variants that use less memory, in the order tried: the other remat options at
  the same accumulation, then 2, 4, 8, ... micro-batches (the same global batch) with each, while
  the micro-batch still splits over the devices."""
  accum, current = config.grad_accum_steps, REMAT_BY_SAVING.index(config.model.remat)
  out = []
  for a in [accum * 2 ** i for i in range(6)]:
    if config.batch_size % a or (config.batch_size // a) % num_devices:
      break
    for remat in REMAT_BY_SAVING:
      if a == accum and REMAT_BY_SAVING.index(remat) <= current:
        continue
      c = config.copy_and_resolve_references()
      c.grad_accum_steps, c.model.remat = a, remat
      out.append(c)
  return out


def _gib(n: float) -> str:
  return f'{n / 2 ** 30:.2f}'


def format_result(r: StepResult, chip: tpu_target.Chip) -> str:
  head = f'{r.what:5s} remat {r.remat:5s} accum {r.grad_accum_steps:<3d}'
  if r.stats is None:
    return f'{head} does not fit: {r.error}'
  s = r.stats
  roofline = s.roofline_s(chip)
  bound = 'FLOPs' if s.flops / chip.bf16_flops >= s.bytes_accessed / chip.hbm_bytes_per_s else \
      'HBM bytes'
  return (f'{head} peak {_gib(s.peak_bytes)} of {_gib(chip.hbm_bytes)} GiB '
          f'({"fits" if r.fits(chip) else "DOES NOT FIT"}) = args {_gib(s.argument_bytes)} + temps '
          f'{_gib(s.temp_bytes)} + out {_gib(s.output_bytes)} - aliased {_gib(s.alias_bytes)}; '
          f'{s.flops / 1e12:.2f} TFLOP, {s.bytes_accessed / 1e9:.2f} GB accessed; roofline '
          f'>= {roofline * 1e3:.1f} ms ({bound}); compiled in {s.compile_s:.0f} s')


def preflight(config: ml_collections.ConfigDict, target_text: str, log=print) -> int:
  """Compiles the train and eval steps of ``config`` for ``target_text``; returns the exit code
  (0: both fit, 1: something does not fit; the line naming what would is printed)."""
  target = tpu_target.parse_target(target_text)
  chip = target.chip
  devices = tpu_target.target_devices(target)
  check_batches(config, len(devices), evaluation=True)
  log(f'preflight: {config.model.name}, {target.name} ({target.num_chips} chips, '
      f'{chip.name}: {_gib(chip.hbm_bytes)} GiB HBM, {chip.bf16_flops / 1e12:.0f} TFLOP/s bf16, '
      f'{chip.hbm_bytes_per_s / 1e9:.0f} GB/s HBM, Cloud TPU data sheet); global batch '
      f'{config.batch_size} ({config.batch_size // len(devices)} per chip), accum '
      f'{config.grad_accum_steps}, remat {config.model.remat}, fsdp {config.mesh.fsdp}, '
      f'{config.compute_dtype}, {config.data.clip_length}x{config.data.size}²')
  log('figures per chip, from the TPU compiler (nothing runs); roofline = max(FLOPs / peak, '
      'bytes / HBM bandwidth)')
  s = setup(config, with_train_data=False, devices=devices)
  results = [_compile('train', config, train_step_lowering(s))]
  log(format_result(results[0], chip))
  results.append(_compile('eval', config, eval_step_lowering(s)))
  log(format_result(results[1], chip))
  if all(r.fits(chip) for r in results):
    log('preflight: both steps fit')
    return 0
  if not results[0].fits(chip):
    for variant in alternatives(config, len(devices)):
      r = _compile('train', variant, train_step_lowering(setup(variant, with_train_data=False,
                                                               devices=devices)))
      log(format_result(r, chip))
      if r.fits(chip):
        log(f'preflight: the train step does not fit {target.name}; it fits with '
            f'--config.model.remat={r.remat} --config.grad_accum_steps={r.grad_accum_steps}')
        return 1
    log(f'preflight: the train step does not fit {target.name} with any remat and accumulation '
        f'tried; use more chips, a larger --config.mesh.fsdp or a smaller batch')
    return 1
  log(f'preflight: the eval step does not fit {target.name}; lower --config.eval_batch_size')
  return 1
