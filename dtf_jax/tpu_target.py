"""Compiling for a TPU topology ahead of time, on any host, and what the compiled program costs.

    target = parse_target('v5e:16x16')          # or 'v5p:4x4x4', 'v6e:8x8,slices=2', 'v4:2x2x1'
    mesh = jax.make_mesh(..., devices=target_devices(target))
    stats = compile_stats(jax.jit(f, ...).lower(*abstract_args))

With JAX's TPU runtime installed (``pip install -e '.[tpu]'``; libtpu runs on CPU-only hosts too),
XLA compiles a jitted function for the named topology's abstract devices: nothing runs, but the
compiled program is the TPU compiler's own plan, with its per-chip memory (XLA's buffer
assignment) and its FLOPs and bytes accessed (XLA's cost analysis, per chip). Only one process at a
time can hold libtpu (it takes a lock file).

A target is ``GENERATION:TOPOLOGY`` (the chip grid, as Cloud TPU names it: ``v5e:2x2`` is 4
chips, ``v5p:4x4x4`` 64), optionally ``,slices=N`` for N slices joined by the data-centre network
(multi-slice). One JAX device per chip (v4 and v5p as megacore).

The roofline lower bound of a step is ``max(FLOPs / peak FLOP/s, bytes / HBM bandwidth)`` per chip,
from the data-sheet figures in :data:`CHIPS` (Cloud TPU documentation: dense bfloat16 peak, HBM
capacity and bandwidth per chip); it ignores the interconnect and any overlap loss, so real steps
take longer.
"""

import dataclasses
import glob
import os
import re
import time
from typing import Optional, Tuple


@dataclasses.dataclass(frozen=True)
class Chip:
  """Data-sheet figures of one TPU chip."""
  name: str  # jax's device_kind
  hbm_bytes: int
  bf16_flops: float  # dense peak FLOP/s (2 per multiply-add)
  hbm_bytes_per_s: float
  chip_config: str  # libtpu's chip config: one JAX device per chip
  vmem_bytes: int  # per TensorCore (JAX's Pallas TPU hardware table)


GIB = 2 ** 30
MIB = 2 ** 20
CHIPS = {
    'v4': Chip('TPU v4', 32 * GIB, 275e12, 1228e9, 'megacore', 16 * MIB),
    'v5e': Chip('TPU v5 lite', 16 * GIB, 197e12, 819e9, 'default', 128 * MIB),
    'v5p': Chip('TPU v5', 95 * GIB, 459e12, 2765e9, 'default', 64 * MIB),
    'v6e': Chip('TPU v6 lite', 32 * GIB, 918e12, 1640e9, 'default', 128 * MIB),
}
CHIPS_PER_HOST = (2, 2, 1)
# Cloud TPU accelerator-type names (v4 and v5p count TensorCores, two per chip).
ACCELERATOR_PREFIX = {'v4': 'v4', 'v5e': 'v5litepod', 'v5p': 'v5p', 'v6e': 'v6e'}  # a multi-host slice's host bounds (each host has 4 chips)


@dataclasses.dataclass(frozen=True)
class Target:
  generation: str  # key of CHIPS
  topology: Tuple[int, ...]  # chips per axis
  slices: int = 1

  @property
  def chip(self) -> Chip:
    return CHIPS[self.generation]

  @property
  def name(self) -> str:
    grid = 'x'.join(map(str, self.topology))
    return f'{self.generation}:{grid}' + (f',slices={self.slices}' if self.slices > 1 else '')

  @property
  def num_chips(self) -> int:
    n = self.slices
    for d in self.topology:
      n *= d
    return n


_TARGET = re.compile(r'(v4|v5e|v5p|v6e):(\d+(?:x\d+){1,2})(?:,slices=(\d+))?')


def parse_target(text: str) -> Target:
  """``'v5e:2x2'``, ``'v5p:4x4x4'``, ``'v5e:16x16,slices=2'`` -> :class:`Target`; ``ValueError``
  naming what is wrong otherwise."""
  match = _TARGET.fullmatch(text.strip())
  if not match:
    raise ValueError(f'TPU target {text!r}: expected GENERATION:TOPOLOGY[,slices=N] with '
                     f'GENERATION one of {", ".join(CHIPS)}, e.g. v5e:2x2, v5e:16x16, v5p:4x4x4, '
                     f'v5e:16x16,slices=2')
  generation, grid, slices = match.group(1), match.group(2), int(match.group(3) or 1)
  topology = tuple(int(d) for d in grid.split('x'))
  if min(topology) < 1 or slices < 1:
    raise ValueError(f'TPU target {text!r}: sizes must be >= 1')
  dims = 3 if generation in ('v4', 'v5p') else 2
  if len(topology) != dims:
    raise ValueError(f'TPU target {text!r}: {generation} topologies have {dims} dimensions '
                     f'(e.g. {"2x2x1" if dims == 3 else "2x2"})')
  return Target(generation, topology, slices)


_DESCRIBED = []  # the targets that target_devices described in this process, last one last


def compile_chip() -> Optional[Chip]:
  """The chip that programs are compiled for now: this host's TPU where JAX runs on one, else
  the target that :func:`target_devices` described last in this process (ahead-of-time), else
  None. Kernels size their VMEM use by it."""
  import jax  # pylint: disable=import-outside-toplevel
  if jax.default_backend() == 'tpu':
    kind = jax.devices()[0].device_kind
    return next((chip for chip in CHIPS.values() if chip.name == kind), None)
  return _DESCRIBED[-1].chip if _DESCRIBED else None


def _host_has_tpu() -> bool:
  return bool(glob.glob('/dev/accel*') or glob.glob('/dev/vfio/[0-9]*'))


def target_devices(target: Target):
  """The abstract TPU devices of ``target`` (needs libtpu: ``pip install -e '.[tpu]'``).

  On a host without TPU chips, libtpu is loaded with ``ALLOW_MULTIPLE_LIBTPU_LOAD=1``: nothing
  here opens a chip, and another process (JAX initialising its backends with libtpu installed
  takes libtpu's lock file) must not stop a compile-only one. The Cloud TPU VM variables that
  libtpu looks for (``TPU_ACCELERATOR_TYPE``, ``TPU_WORKER_HOSTNAMES``) are set to this target
  and this host there, where libtpu would print a screen of warnings for their absence."""
  if not _host_has_tpu():
    os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
    cores = target.num_chips // target.slices * (2 if target.chip.chip_config == 'megacore' or
                                                   target.generation == 'v5p' else 1)
    os.environ.setdefault('TPU_ACCELERATOR_TYPE',
                          f'{ACCELERATOR_PREFIX[target.generation]}-{cores}')
    os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
  try:
    from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
    bounds = tuple(min(d, b) for d, b in zip(target.topology + (1,), CHIPS_PER_HOST))
    devices = topologies.get_topology_desc(
        platform='tpu', topology_name=target.name.split(',')[0],
        chip_config_name=target.chip.chip_config, chips_per_host_bounds=bounds,
        num_slices=target.slices).devices
  except Exception as e:  # pylint: disable=broad-except
    raise RuntimeError(f'cannot describe TPU target {target.name}: {e}. Compiling for TPU needs '
                       "JAX's TPU runtime: pip install -e '.[tpu]'") from e
  _DESCRIBED.append(target)
  return devices


def libtpu_available() -> Optional[str]:
  """None where libtpu is importable, else why not."""
  try:
    import libtpu  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    return "libtpu is not installed (pip install -e '.[tpu]')"
  return None


@dataclasses.dataclass
class CompiledStats:
  """Per-chip figures of a compiled program (XLA's plan; nothing was run)."""
  compile_s: float
  flops: float
  bytes_accessed: float
  argument_bytes: int
  temp_bytes: int
  output_bytes: int
  alias_bytes: int
  compiled: object = None

  @property
  def peak_bytes(self) -> int:
    """Arguments + temporaries + outputs - aliased (donated arguments written in place)."""
    return self.argument_bytes + self.temp_bytes + self.output_bytes - self.alias_bytes

  def roofline_s(self, chip: Chip) -> float:
    """The step's lower bound on ``chip``: ``max(FLOPs / peak, bytes / HBM bandwidth)``."""
    return max(self.flops / chip.bf16_flops, self.bytes_accessed / chip.hbm_bytes_per_s)


def compile_stats(lowered) -> CompiledStats:
  """Compiles ``lowered`` (``jax.jit(...).lower(...)``) and reads its per-chip cost and memory."""
  start = time.perf_counter()
  compiled = lowered.compile()
  seconds = time.perf_counter() - start
  cost = compiled.cost_analysis() or {}
  if isinstance(cost, (list, tuple)):  # older JAX: one dict per program
    cost = cost[0] if cost else {}
  memory = compiled.memory_analysis()
  return CompiledStats(
      compile_s=seconds, flops=float(cost.get('flops', 0.0)),
      bytes_accessed=float(cost.get('bytes accessed', 0.0)),
      argument_bytes=memory.argument_size_in_bytes, temp_bytes=memory.temp_size_in_bytes,
      output_bytes=memory.output_size_in_bytes, alias_bytes=memory.alias_size_in_bytes,
      compiled=compiled)


# ---------------------------------------------------------------------------------------------
# Where the bytes go: the compiled HLO's top-level ops by the bytes they read and write.
# ---------------------------------------------------------------------------------------------

_ITEMSIZE = {'pred': 1, 's8': 1, 'u8': 1, 'bf16': 2, 'f16': 2, 's16': 2, 'u16': 2, 'f32': 4,
             's32': 4, 'u32': 4, 'f64': 8, 's64': 8, 'u64': 8, 'c64': 8}
_ARRAY = re.compile(r'(\w+)\[([\d,]*)\](?:\{([\d,]*)(?::T\((\d+),(\d+)\)(?:\((\d+),(\d+)\))?)?[^}]*\})?')
_INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%(\S+)\s*=\s*(.*)$')
_COMPUTATION = re.compile(r'^(?:ENTRY\s+)?%(\S+)\s.*\{\s*$')
_NOT_MOVING = ('parameter', 'constant', 'get-tuple-element', 'tuple', 'bitcast', 'while',
               'conditional', 'call', 'after-all', 'partition-id', 'replica-id', 'iota',
               'slice-start', 'copy-start', 'async-start')


def _array_bytes(match) -> int:
  """Bytes of one HLO array type in memory, with the TPU tile padding of its two minor dims."""
  dtype, dims, layout, tile_a, tile_b = match.group(1, 2, 3, 4, 5)
  if dtype not in _ITEMSIZE:
    return 0
  shape = [int(d) for d in dims.split(',')] if dims else []
  if tile_a and layout and len(shape) >= 2:
    order = [int(i) for i in layout.split(',')]  # minor to major
    minor, second = order[0], order[1]
    sub = max(1, 4 // _ITEMSIZE[dtype]) if match.group(6) else 1
    shape[minor] = -(-shape[minor] // int(tile_b)) * int(tile_b)
    shape[second] = -(-shape[second] // (int(tile_a) * sub)) * (int(tile_a) * sub)
  size = _ITEMSIZE[dtype]
  for d in shape:
    size *= d
  return size


def _type_bytes(text: str) -> int:
  return sum(_array_bytes(m) for m in _ARRAY.finditer(text))


def _split_type(text: str):
  """``'TYPE opcode(...)...'`` -> ``(TYPE, 'opcode(...)...')``; TYPE may be a tuple ``(...)``."""
  if not text.startswith('('):
    type_text, _, rest = text.partition(' ')
    return type_text, rest
  depth = 0
  for i, ch in enumerate(text):
    depth += {'(': 1, ')': -1}.get(ch, 0)
    if depth == 0:
      return text[:i + 1], text[i + 1:].lstrip()
  return text, ''


def _split_operands(text: str):
  """``'a, b), attrs'`` (after an opcode's ``(``) -> ``('a, b', ', attrs')``."""
  depth = 1
  for i, ch in enumerate(text):
    depth += {'(': 1, ')': -1}.get(ch, 0)
    if depth == 0:
      return text[:i], text[i + 1:]
  return text, ''


def byte_movers(hlo_text: str, top: int = 10):
  """The ``top`` ops of a compiled program by bytes moved: ``[(bytes, count, description)]``.

  Each top-level op (fusions, copies, custom calls, collectives, ... of the entry computation and
  of loop bodies, times the loop's trip count) is charged the bytes of its operands and results,
  with TPU tile padding; ops of the same kind and shape are summed. An estimate of XLA's own
  'bytes accessed', which does not say where the bytes go.
  """
  shapes, computations, current = {}, {}, None
  for line in hlo_text.splitlines():
    header = _COMPUTATION.match(line)
    if header and '=' not in line.split('(')[0]:
      current = computations.setdefault(header.group(1), [])
      continue
    match = _INSTRUCTION.match(line)
    if match and current is not None:
      name, rest = match.groups()
      type_text, rest = _split_type(rest)
      opcode, _, rest = rest.partition('(')
      operands, attributes = _split_operands(rest)
      shapes[name] = _type_bytes(type_text)
      current.append((name, type_text, opcode, operands, attributes or ''))
  trips = {}

  def trip_count(condition: str) -> int:
    constants = [int(c) for _, t, op, args, _ in computations.get(condition, [])
                 if op == 'constant' and t.startswith('s32[]') for c in re.findall(r'-?\d+', args)]
    return max([c for c in constants if c > 0], default=1)

  def visit(computation: str, multiplier: int):
    for name, type_text, opcode, operands, attributes in computations.get(computation, []):
      if opcode == 'while':
        body = re.search(r'body=%([^\s,]+)', attributes).group(1)
        condition = re.search(r'condition=%([^\s,]+)', attributes).group(1)
        visit(body, multiplier * trip_count(condition))
        continue
      if opcode in _NOT_MOVING or opcode.endswith('-done') and opcode != 'slice-done':
        continue
      if opcode == 'slice-done':  # the slice's output is written (the input read) here
        moved = 2 * shapes[name]
      else:
        moved = shapes[name] + sum(shapes.get(o, 0) for o in re.findall(r'%([^\s,)]+)', operands))
      kind = re.search(r'kind=(\w+)', attributes)
      what = f'{opcode}{"(" + kind.group(1) + ")" if kind else ""} -> {type_text.split("{")[0]}'
      trips.setdefault(what, [0, 0])
      trips[what][0] += moved * multiplier
      trips[what][1] += multiplier

  entry = re.search(r'^ENTRY\s+%(\S+)', hlo_text, re.M).group(1)
  visit(entry, 1)
  ranked = sorted(((b, n, what) for what, (b, n) in trips.items()), reverse=True)
  return ranked[:top], sum(b for b, _, _ in ranked)
