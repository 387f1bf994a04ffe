"""The paper's ablations (Table 1a-c, Fig. 6) at CPU scale, on the built-in synthetic tasks.

    python experiments/synthetic_ablation.py --quick          # 2 CPU cores, 12.6 min measured
    python experiments/synthetic_ablation.py                  # full: more data, steps, seeds
    python experiments/synthetic_ablation.py --quick --smoke  # the whole path in seconds (tests)
    python experiments/synthetic_ablation.py --budget         # learning curves: what a budget buys

Every temporal module of ``dtf_jax.layers.temporal`` is trained for the same budget (steps, batch,
optimizer, data) in a small DTF-Net (one bottleneck per stage, width 8, no temporal folding in the
stem, 32x32 frames), several seeds each, on both tasks of ``dtf_jax.data.synthetic``:

- ``motion``: 8 motion classes, two of each pair mirror images in time (16 rendered frames, every
  2nd used, as the quickstart); local temporal order decides the class;
- ``long_range``: 2 classes set by how the colour of a flash steps between the first and the last
  quarter of the clip (forward or backward around red -> green -> blue); no window shorter than
  about half the clip decides it.

The rows are those of the paper (DTF, ECCV 2022; SPEC.md section 4 has its Kinetics-400 top-1):
Table 1a (temporal module, in res5 only), 1b (DTF's parts, res5 only), 1c (temporal modelling,
all stages), and Fig. 6's question, how the gap changes with the clip length (long-range task,
all stages). ``--quick`` trains each row where the paper put it; the full mode also trains every
module at the other placement and longer clips. Clips are rendered into memory (the generator of
``synthetic.py`` at 32x32, without the mp4 round trip of the stored dataset), identically for all
rows. Training uses the trainer's own step (``dtf_jax.train``: AdamW, warm-up + cosine, gradient
clipping); the seed sets the initialisation and the data order.

``--budget`` trains a few modules for longer on both tasks and evaluates every ``curve_every``
steps (learning curves along one warm-up + cosine schedule), to show what the quick budget leaves
unlearned; it writes ``OUT/budget_study.{md,json,png}``.

Writes ``OUT/synthetic_ablation.md`` (mean +- std top-1 on the validation clips, GFLOPs per clip
of the model as trained, train seconds per run), ``OUT/synthetic_ablation.json`` (every run) and
``OUT/table1.png``, ``OUT/fig6.png``. Finished rows are kept in the JSON as they finish; a rerun
with the same settings trains only what is missing.
"""

import argparse
import dataclasses
import functools
import json
import math
import multiprocessing
import os
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from dtf_jax import storage  # noqa: E402
from dtf_jax.data import synthetic  # noqa: E402

ALL_STAGES, RES5 = (1, 2, 3, 4), (4,)
# (group, title, placement, [(row label, temporal module, paper K400 top-1)]).
GROUPS = (
    ('table1a', 'Table 1a: temporal module in res5', RES5, (
        ('2D (C2D)', 'none', 72.0), ('temporal conv (DTF_1d)', 'dtf_1d', 73.2),
        ('dynamic 1D conv (DTF_1d+)', 'dtf_1d_dynamic', 74.2),
        ('fixed frequency filter (DTF_F)', 'dtf_fixed', 75.0), ('DTF', 'dtf', 75.7))),
    ('table1b', "Table 1b: DTF's parts, res5", RES5, (
        ('without FA', 'dtf_no_fa', 74.9), ('FA only', 'dtf_fa_only', 75.4),
        ('correlation only', 'dtf_corr_only', 75.2), ('FA + correlation (DTF)', 'dtf', 75.7))),
    ('table1c', 'Table 1c: temporal modelling, all stages', ALL_STAGES, (
        ('temporal conv', 'dtf_1d', 74.6), ('temporal shift', 'temporal_shift', 74.8),
        ('correlation', 'correlation', 75.1), ('temporal difference', 'temporal_difference', 76.6),
        ('DTF', 'dtf', 77.7))),
)
FIG6_MODULES = ('none', 'dtf_1d', 'dtf')  # Fig. 6: the gap over clip lengths (long-range task)
# XLA:CPU compile options (measured at one thread, DTF-Net all stages). The initialisation runs
# once per seed, so its speed does not matter: it compiles without LLVM's optimisation (3 s
# instead of 7-13 s, mostly the random initialisers). The train step skips only LLVM's expensive
# passes (19 s instead of 23 s, the same step time). Not used on other backends.
CPU_COMPILE_OPTIONS = {
    'init': {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True},
    'step': {'xla_llvm_disable_expensive_passes': True}}
# --budget: (temporal module, stages) trained with learning curves on both tasks.
BUDGET_MODULES = (('none', RES5), ('dtf', RES5), ('dtf', ALL_STAGES),
                  ('temporal_shift', ALL_STAGES))


@dataclasses.dataclass(frozen=True)
class Settings:
  """The budget every run gets (a mode of the script)."""
  steps: int
  batch: int
  seeds: int
  num_train: int
  num_val: int
  long_range_frames: int           # the long-range task's clip length in the tables
  fig6_frames: Tuple[int, ...]     # clip lengths of the Fig. 6 sweep
  both_placements: bool            # also every module at the placement the paper did not use
  groups: Tuple[str, ...] = tuple(g[0] for g in GROUPS)
  width: int = 8
  size: int = 32
  lr: float = 4e-3
  motion_frames: int = 16          # rendered; every 2nd is used
  curve_every: int = 0             # > 0: top-1 on the validation clips every that many steps


MODES = {
    'full': Settings(steps=900, batch=16, seeds=3, num_train=4096, num_val=512,
                     long_range_frames=32, fig6_frames=(16, 32, 64), both_placements=True),
    'quick': Settings(steps=150, batch=16, seeds=2, num_train=2048, num_val=256,
                      long_range_frames=16, fig6_frames=(8, 16), both_placements=False),
    'budget': Settings(steps=900, batch=16, seeds=1, num_train=2048, num_val=256,
                       long_range_frames=16, fig6_frames=(), both_placements=False, groups=(),
                       curve_every=150),
    'smoke': Settings(steps=2, batch=4, seeds=1, num_train=8, num_val=8, long_range_frames=8,
                      fig6_frames=(8,), both_placements=False, groups=('table1a',)),
}


@dataclasses.dataclass(frozen=True)
class Run:
  """One model to train (all seeds): task, temporal module, its stages, clip length."""
  task: str
  temporal: str
  stages: Tuple[int, ...]
  frames: int

  @property
  def key(self) -> str:
    stages = 'none' if self.temporal == 'none' else ''.join(map(str, self.stages))
    return f'{self.task}/{self.temporal}/stages{stages}/frames{self.frames}'


def task_frames(task: str, s: Settings) -> int:
  """Frames the model sees per clip in the tables."""
  return s.motion_frames // 2 if task == 'motion' else s.long_range_frames


def plan(s: Settings, smoke: bool = False, budget: bool = False) -> List[Run]:
  """Every distinct run of the mode (rows shared by several tables are trained once); ``smoke``:
  C2D on the motion task and DTF in res5 on the long-range task only; ``budget``: the
  ``BUDGET_MODULES`` on both tasks (with ``smoke``, the first of them)."""
  if budget:  # with smoke: the first module (C2D) on each task
    modules = BUDGET_MODULES[:1] if smoke else BUDGET_MODULES
    return [Run(task, temporal, stages, task_frames(task, s))
            for task in synthetic.TASKS for temporal, stages in modules]
  if smoke:
    return [Run('motion', 'none', RES5, task_frames('motion', s)),
            Run('long_range', 'dtf', RES5, task_frames('long_range', s))]
  runs = []
  for task in synthetic.TASKS:
    for group, _, stages, rows in GROUPS:
      if group not in s.groups:
        continue
      for _, temporal, _ in rows:
        placements = [stages] + ([ALL_STAGES if stages == RES5 else RES5]
                                 if s.both_placements else [])
        for p in placements:
          runs.append(Run(task, temporal, RES5 if temporal == 'none' else p,
                          task_frames(task, s)))
  for frames in s.fig6_frames:
    for temporal in FIG6_MODULES:
      runs.append(Run('long_range', temporal, RES5 if temporal == 'none' else ALL_STAGES, frames))
  unique = list(dict.fromkeys(runs))
  # The slowest first (long clips, all stages), so that two workers finish together.
  return sorted(unique, key=lambda r: -(r.frames * (len(r.stages) if r.temporal != 'none'
                                                    else 0.5)))


@functools.lru_cache(maxsize=4)
def clips(task: str, frames: int, split_code: int, count: int, size: int):
  """``(uint8 N T H W 3, int32 N)``: clip ``i`` of the split from ``synthetic.clip_rng``, label
  ``i % classes``; the motion task's clips are rendered at ``2 * frames`` and every 2nd kept."""
  classes = len(synthetic.task_classes(task))
  rendered = 2 * frames if task == 'motion' else frames
  videos = np.stack([synthetic.render(task, i % classes, synthetic.clip_rng(0, split_code, i),
                                      rendered, size)[::rendered // frames]
                     for i in range(count)])
  return videos, np.arange(count, dtype=np.int32) % classes


def normalise(videos: np.ndarray) -> np.ndarray:
  """uint8 -> float32 with the ImageNet mean and std, as the input pipeline does."""
  from dtf_jax.data.ops import (  # pylint: disable=import-outside-toplevel
      IMAGENET_MEAN, IMAGENET_STD)
  return ((videos.astype(np.float32) / 255.0 - np.float32(IMAGENET_MEAN))
          / np.float32(IMAGENET_STD))


def run_config(run: Run, s: Settings):
  """The trainer's config for ``run``: the quickstart recipe at the mode's budget."""
  from configs import quickstart  # pylint: disable=import-outside-toplevel
  c = quickstart.get_config()
  c.model.name = 'c2d_r50' if run.temporal == 'none' else 'dtf_r50'
  c.model.width = s.width
  if run.temporal != 'none':
    c.model.temporal = run.temporal
    c.model.dtf_stages = run.stages
  c.data.num_classes = len(synthetic.task_classes(run.task))
  c.data.clip_length, c.data.size = run.frames, s.size
  c.batch_size = s.batch
  c.total_steps = s.steps
  c.lr.base, c.lr.base_batch = s.lr, s.batch
  # Without a train source an epoch is one step (dtf_jax.train.config.setup): 10% warm-up.
  c.lr.warmup_epochs = max(s.steps // 10, 1)
  return c


def train_and_evaluate(run: Run, s: Settings) -> Dict:
  """Trains ``run`` once per seed; returns its GFLOPs, top-1 per seed and train seconds."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from dtf_jax import flops  # pylint: disable=import-outside-toplevel
  from dtf_jax.train.config import setup  # pylint: disable=import-outside-toplevel
  from dtf_jax.train.step import make_train_step  # pylint: disable=import-outside-toplevel

  config = run_config(run, s)
  setup_ = setup(config, with_train_data=False)
  model = setup_.model
  train_x, train_y = clips(run.task, run.frames, 0, s.num_train, s.size)
  val_x, val_y = clips(run.task, run.frames, 1, s.num_val, s.size)
  val_x = normalise(val_x)
  step = make_train_step(setup_)
  predict = jax.jit(lambda v, x: jnp.argmax(model.apply(v, x, train=False), -1))
  macs, _ = flops.count_model_macs(
      model, jax.ShapeDtypeStruct((1,) + train_x.shape[1:], jnp.float32))
  out = {'key': run.key, 'task': run.task, 'temporal': run.temporal, 'stages': list(run.stages),
         'frames': run.frames, 'gflops': {c: flops.total_macs(macs, c) / 1e9
                                          for c in flops.CONVENTIONS},
         'top1': [], 'train_seconds': [], 'compile_seconds': 0.0}
  if s.curve_every:
    out['curve'] = []  # per seed: [[step, top1], ...]

  def evaluate(state):
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    correct = sum(int(np.sum(np.asarray(predict(variables, val_x[j:j + 64])) == val_y[j:j + 64]))
                  for j in range(0, s.num_val, 64))
    return 100.0 * correct / s.num_val

  # As ``setup_.init_state()`` with ``config.seed = seed``, compiled once for all seeds.
  options = CPU_COMPILE_OPTIONS if jax.default_backend() == 'cpu' else {'init': None, 'step': None}
  init = jax.jit(setup_.init_fn, out_shardings=setup_.state_sharding).lower(
      jax.random.PRNGKey(0)).compile(options['init'])
  compiled_step = None
  for seed in range(s.seeds):
    state = init(jax.random.PRNGKey(seed))
    rng = np.random.default_rng(seed)
    order, position = rng.permutation(s.num_train), 0
    begin, curve, eval_seconds = time.time(), [], 0.0
    for i in range(s.steps):
      if position + s.batch > s.num_train:
        order, position = rng.permutation(s.num_train), 0
      idx = order[position:position + s.batch]
      position += s.batch
      batch = {'video': normalise(train_x[idx]), 'label': train_y[idx]}
      if compiled_step is None:
        compiled_step = step.lower(state, batch).compile(options['step'])
      state, metrics = compiled_step(state, batch)
      if i == 0:  # the first step of the first seed compiles (the seeds share the step)
        jax.block_until_ready(metrics)
        if seed == 0:
          out['compile_seconds'] = time.time() - begin
        begin = time.time()
      if s.curve_every and (i + 1) % s.curve_every == 0 and i + 1 < s.steps:
        eval_begin = time.time()
        curve.append([i + 1, evaluate(state)])
        eval_seconds += time.time() - eval_begin
    loss = float(metrics['loss'])
    out['train_seconds'].append(time.time() - begin - eval_seconds)
    out['top1'].append(evaluate(state))
    if s.curve_every:
      out['curve'].append(curve + [[s.steps, out['top1'][-1]]])
    if not math.isfinite(loss):
      out.setdefault('notes', []).append(f'seed {seed}: final train loss {loss}')
  return out


def _init_worker(threads: int) -> None:
  """Before JAX starts in a worker: ``threads`` CPU threads for XLA's own parallelism."""
  if threads == 1:
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_cpu_multi_thread_eigen='
                               'false intra_op_parallelism_threads=1').strip()
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')


def _work(job):
  run, s = job
  return train_and_evaluate(run, s)


def settings_id(s: Settings) -> Dict:
  return dataclasses.asdict(s)


def load_results(path, s: Settings) -> Tuple[Dict[str, Dict], float]:
  """Finished runs of earlier calls with the same settings (none if they differ) and the wall
  seconds those calls spent."""
  if not storage.path(path).exists():
    return {}, 0.0
  saved = storage.read_json(path)
  if saved.get('settings') != json.loads(json.dumps(settings_id(s))):
    print(f'{path}: written with other settings; starting again', flush=True)
    return {}, 0.0
  return {r['key']: r for r in saved['runs']}, float(saved.get('elapsed_seconds', 0.0))


def mean_std(values: Sequence[float]) -> str:
  return f'{np.mean(values):.1f} ± {np.std(values):.1f}' if values else 'n/a'


def report(results: Dict[str, Dict], s: Settings, mode: str, elapsed: float) -> str:
  """The Markdown report of ``results`` (run key -> result)."""
  tasks = synthetic.TASKS
  frames = {t: task_frames(t, s) for t in tasks}
  lines = [f'# Synthetic ablation ({mode})', '',
           f'Generated by `python experiments/synthetic_ablation.py'
           f'{" --" + mode if mode != "full" else ""}` in {elapsed / 60:.1f} min. Top-1 (%) on '
           f'{s.num_val} validation clips per task, mean ± std over {s.seeds} seed(s); each run '
           f'{s.steps} steps of batch {s.batch} on {s.num_train} training clips, {s.size}x{s.size} '
           f'frames, a DTF-Net with one bottleneck per stage and width {s.width}. Frames per clip: '
           + ', '.join(f'{t} {frames[t]}' for t in tasks) + ' (chance: '
           + ', '.join(f'{t} {100 / len(synthetic.task_classes(t)):.1f}' for t in tasks)
           + '). GFLOPs: per clip of the motion task, our convention / the paper\'s '
           '(`dtf_jax.flops`). Train s: seconds per run after the first (compiling) step.', '']
  for group, title, stages, rows in GROUPS:
    if group not in s.groups:
      continue
    placements = [stages] + ([ALL_STAGES if stages == RES5 else RES5] if s.both_placements
                             else [])
    for p in placements:
      where = 'res5' if p == RES5 else 'all stages'
      lines += [f'## {title}' + ('' if p == stages else f' (here: {where})'), '',
                '| row | module | paper K400 | ' + ' | '.join(tasks) + ' | GFLOPs | train s |',
                '|---|---|---|' + '---|' * len(tasks) + '---|---|']
      for label, temporal, paper in rows:
        found = [results.get(Run(t, temporal, RES5 if temporal == 'none' else p,
                                 frames[t]).key) for t in tasks]
        if not any(found):
          continue
        cells = [mean_std(r['top1']) if r else 'n/a' for r in found]
        first = next(r for r in found if r)
        g = first['gflops']
        lines.append(f'| {label} | `{temporal}` | {paper} | ' + ' | '.join(cells)
                     + f' | {g["ours"]:.4f} / {g["paper"]:.4f} | '
                     + f'{np.mean(sum((r["train_seconds"] for r in found if r), [])):.0f} |')
      lines.append('')
  lines += ['## Fig. 6: clip length (long-range task, all stages)', '',
            '| module | ' + ' | '.join(f'{f} frames' for f in s.fig6_frames) + ' |',
            '|---|' + '---|' * len(s.fig6_frames)]
  for temporal in FIG6_MODULES:
    cells = []
    for f in s.fig6_frames:
      r = results.get(Run('long_range', temporal, RES5 if temporal == 'none' else ALL_STAGES,
                          f).key)
      cells.append(mean_std(r['top1']) if r else 'n/a')
    lines.append(f'| `{temporal}` | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def budget_report(results: Dict[str, Dict], s: Settings, elapsed: float) -> str:
  """The Markdown report of ``--budget``: top-1 along the schedule, per task and module."""
  steps = list(range(s.curve_every, s.steps, s.curve_every)) + [s.steps]
  lines = ['# Budget study', '',
           f'Generated by `python experiments/synthetic_ablation.py --budget` in '
           f'{elapsed / 60:.1f} min. One seed per module, {s.steps} steps of batch {s.batch} on '
           f'{s.num_train} training clips (warm-up over the first 10%, then cosine), top-1 (%) '
           f'on {s.num_val} validation clips every {s.curve_every} steps along that one '
           'schedule; the same model and recipe as the ablation tables. A point before the end '
           'is not a run with that many steps: its learning rate has not decayed yet.', '']
  for task in synthetic.TASKS:
    lines += [f'## {task} ({task_frames(task, s)} frames, chance '
              f'{100 / len(synthetic.task_classes(task)):.1f})', '',
              '| module | stages | ' + ' | '.join(str(k) for k in steps) + ' | train s |',
              '|---|---|' + '---|' * len(steps) + '---|']
    for temporal, stages in BUDGET_MODULES:
      r = results.get(Run(task, temporal, stages, task_frames(task, s)).key)
      if not r:
        continue
      points = dict((int(k), v) for k, v in r['curve'][0])
      where = '-' if temporal == 'none' else ''.join(map(str, stages))
      lines.append(f'| `{temporal}` | {where} | '
                   + ' | '.join(f'{points[k]:.1f}' if k in points else 'n/a' for k in steps)
                   + f' | {np.mean(r["train_seconds"]):.0f} |')
    lines.append('')
  return '\n'.join(lines) + '\n'


def plot_budget(results: Dict[str, Dict], s: Settings, out_dir) -> List[str]:
  """``budget_study.png``: top-1 over steps, one panel per task."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(1, len(synthetic.TASKS), figsize=(5 * len(synthetic.TASKS), 3.8),
                           squeeze=False)
  for ax, task in zip(axes[0], synthetic.TASKS):
    for temporal, stages in BUDGET_MODULES:
      r = results.get(Run(task, temporal, stages, task_frames(task, s)).key)
      if r:
        points = np.asarray(r['curve'][0], np.float64)
        where = '' if temporal == 'none' else ' ' + ''.join(map(str, stages))
        ax.plot(points[:, 0], points[:, 1], marker='o', label=temporal + where)
    ax.axhline(100 / len(synthetic.task_classes(task)), color='grey', linestyle=':')
    ax.set_title(f'{task}: top-1 along the schedule', fontsize=10)
    ax.set_xlabel('step')
    ax.set_ylabel('top-1 (%)')
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
  fig.tight_layout()
  with storage.atomic_write(storage.path(out_dir) / 'budget_study.png') as tmp:
    fig.savefig(str(tmp), format='png', dpi=110)
  plt.close(fig)
  return ['budget_study.png']


def plot(results: Dict[str, Dict], s: Settings, out_dir) -> List[str]:
  """``table1.png`` (bars per table, both tasks) and ``fig6.png`` (top-1 over clip length)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  written = []
  groups = [g for g in GROUPS if g[0] in s.groups]
  fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4.2), squeeze=False)
  for ax, (_, title, stages, rows) in zip(axes[0], groups):
    for k, task in enumerate(synthetic.TASKS):
      means, stds, ticks = [], [], []
      for label, temporal, _ in rows:
        r = results.get(Run(task, temporal, RES5 if temporal == 'none' else stages,
                            task_frames(task, s)).key)
        means.append(np.mean(r['top1']) if r else np.nan)
        stds.append(np.std(r['top1']) if r else 0.0)
        ticks.append(label)
      x = np.arange(len(rows)) + (k - 0.5) * 0.38
      ax.bar(x, means, 0.38, yerr=stds, capsize=3, label=task)
    ax.set_xticks(np.arange(len(rows)), ticks, rotation=30, ha='right', fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel('top-1 (%)')
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
  fig.tight_layout()
  for name, figure in (('table1.png', fig),):
    with storage.atomic_write(storage.path(out_dir) / name) as tmp:
      figure.savefig(str(tmp), format='png', dpi=110)
    written.append(name)
  plt.close(fig)

  fig, ax = plt.subplots(figsize=(5, 3.8))
  for temporal in FIG6_MODULES:
    ys = [results.get(Run('long_range', temporal, RES5 if temporal == 'none' else ALL_STAGES,
                          f).key) for f in s.fig6_frames]
    ax.errorbar(s.fig6_frames, [np.mean(r['top1']) if r else np.nan for r in ys],
                yerr=[np.std(r['top1']) if r else 0.0 for r in ys], marker='o', capsize=3,
                label=temporal)
  ax.axhline(100 / len(synthetic.task_classes('long_range')), color='grey', linestyle=':')
  ax.set_xlabel('frames per clip')
  ax.set_ylabel('top-1 (%)')
  ax.set_ylim(0, 100)
  ax.set_xticks(s.fig6_frames)
  ax.set_title('Long-range task: top-1 over clip length', fontsize=10)
  ax.legend(fontsize=8)
  fig.tight_layout()
  with storage.atomic_write(storage.path(out_dir) / 'fig6.png') as tmp:
    fig.savefig(str(tmp), format='png', dpi=110)
  plt.close(fig)
  return written + ['fig6.png']


def parse_args(argv: Optional[List[str]] = None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=__doc__.split('\n\n', 1)[1])
  parser.add_argument('--quick', action='store_true',
                      help='the 2-core budget: each row where the paper put it, 2 seeds.')
  parser.add_argument('--smoke', action='store_true',
                      help='a few steps of two modules: checks the whole path in seconds.')
  parser.add_argument('--budget', action='store_true',
                      help='learning curves of a few modules over 900 steps on both tasks '
                           '(budget_study.md/.json/.png; 10.2 min on 2 cores).')
  parser.add_argument('--out', default=os.path.join(ROOT, 'experiments', 'results'),
                      help='output directory, local or a URL (default experiments/results).')
  parser.add_argument('--workers', type=int, default=2,
                      help='runs trained at once, in processes of one XLA thread each '
                           '(default 2; 1 = in this process, with all threads).')
  parser.add_argument('--seeds', type=int, default=0, help='seeds per run (default: the mode\'s).')
  parser.add_argument('--steps', type=int, default=0, help='steps per run (default: the mode\'s).')
  args = parser.parse_args(argv)
  if args.workers < 1 or args.seeds < 0 or args.steps < 0:
    parser.error('--workers must be >= 1, --seeds and --steps >= 0')
  if args.budget and args.quick:
    parser.error('--budget and --quick are different modes; give one')
  return args


def main(argv: Optional[List[str]] = None) -> int:
  args = parse_args(argv)
  mode = ('smoke' if args.smoke else 'budget' if args.budget else 'quick' if args.quick
          else 'full')
  s = MODES[mode]
  if args.smoke and args.budget:  # the budget study's path, in seconds
    s = dataclasses.replace(s, steps=4, batch=4, num_train=8, num_val=8, long_range_frames=8,
                            curve_every=2)
  stem = 'budget_study' if args.budget else 'synthetic_ablation'
  s = dataclasses.replace(s, seeds=args.seeds or s.seeds, steps=args.steps or s.steps)
  out_dir = storage.path(args.out)
  out_dir.mkdir(parents=True, exist_ok=True)
  json_path = out_dir / f'{stem}.json'
  results, elapsed_before = load_results(json_path, s)
  runs = plan(s, smoke=args.smoke, budget=args.budget)
  todo = [r for r in runs if r.key not in results]
  print(f'{mode}: {len(runs)} runs x {s.seeds} seed(s), {s.steps} steps each; '
        f'{len(runs) - len(todo)} already done ({json_path})', flush=True)
  begin = time.time()

  def finished(result):
    results[result['key']] = result
    storage.write_json(json_path, {'settings': settings_id(s), 'mode': mode,
                                   'elapsed_seconds': elapsed_before + time.time() - begin,
                                   'runs': list(results.values())}, indent=1)
    print(f'[{len(results)}/{len(runs)} {time.time() - begin:6.0f}s] {result["key"]}: top-1 '
          f'{mean_std(result["top1"])} (compile {result["compile_seconds"]:.0f}s, train '
          f'{np.mean(result["train_seconds"]):.0f}s/seed)', flush=True)

  jobs = [(r, s) for r in todo]
  if args.workers == 1 or len(jobs) <= 1:
    _init_worker(threads=0)
    for job in jobs:
      finished(_work(job))
  else:
    context = multiprocessing.get_context('spawn')
    with context.Pool(args.workers, initializer=_init_worker, initargs=(1,),
                      maxtasksperchild=4) as pool:
      for result in pool.imap_unordered(_work, jobs):
        finished(result)
  elapsed = elapsed_before + (time.time() - begin if todo else 0.0)  # wall time of all calls
  if args.budget:
    storage.write_text(out_dir / f'{stem}.md', budget_report(results, s, elapsed))
    pngs = plot_budget(results, s, out_dir)
  else:
    storage.write_text(out_dir / f'{stem}.md', report(results, s, mode, elapsed))
    pngs = plot(results, s, out_dir)
  print(f'wrote {out_dir / (stem + ".md")}, {stem}.json, '
        f'{", ".join(pngs)} ({(time.time() - begin) / 60:.1f} min)', flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
