"""experiments/: the paper's configs load and describe their rows; the synthetic ablation runs end
to end (``--smoke``), resumes, and reports what it trained."""

import importlib
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from experiments import paper_gflops, synthetic_ablation  # noqa: E402
from dtf_jax.layers.temporal import TEMPORAL_MODULES  # noqa: E402
from dtf_jax.train.config import validate_config  # noqa: E402

PAPER_TOP1 = {  # SPEC.md section 4, Kinetics-400 top-1 of the ablation rows
    'table1a_c2d': 72.0, 'table1a_temporal_conv': 73.2, 'table1a_dynamic_conv': 74.2,
    'table1a_fixed_filter': 75.0, 'table1a_dtf': 75.7, 'table1b_without_fa': 74.9,
    'table1b_fa_only': 75.4, 'table1b_correlation_only': 75.2, 'table1c_temporal_conv': 74.6,
    'table1c_temporal_shift': 74.8, 'table1c_correlation': 75.1,
    'table1c_temporal_difference': 76.6, 'table1c_dtf': 77.7}


def test_paper_configs_rows_and_models():
  configs = dict(paper_gflops.paper_configs())
  assert set(PAPER_TOP1) | {'sweep'} == set(configs)
  for name, module in configs.items():
    config = module.get_config()
    validate_config(config)  # builds the model from its fields
    temporal = config.model.get('temporal', 'none')
    assert temporal in TEMPORAL_MODULES
    assert (config.model.name == 'c2d_r50') == (temporal == 'none'), name
    if name in PAPER_TOP1:
      assert module.PAPER['top1'] == PAPER_TOP1[name], name
      stages = tuple(config.model.get('dtf_stages', ()))
      assert stages == ((1, 2, 3, 4) if name.startswith('table1c') else
                        () if temporal == 'none' else (4,)), name
      assert config.data.clip_length == 16 and config.data.num_classes == 400


def test_sweep_config_arguments():
  sweep = importlib.import_module('experiments.paper.sweep')
  c = sweep.get_config('temporal=dtf_1d,stages=34,frames=32,dataset=ssv2')
  assert (c.model.temporal, tuple(c.model.dtf_stages), c.data.clip_length,
          c.data.num_classes) == ('dtf_1d', (3, 4), 32, 174)
  with pytest.raises(ValueError, match='stages'):
    sweep.get_config('stages=5')
  with pytest.raises(ValueError, match='unknown key'):
    sweep.get_config('blocks=3')


def test_quick_plan_covers_every_row_once():
  s = synthetic_ablation.MODES['quick']
  runs = synthetic_ablation.plan(s)
  assert len(runs) == len(set(runs))
  for task in ('motion', 'long_range'):
    names = {(r.temporal, r.stages) for r in runs if r.task == task and r.frames ==
             synthetic_ablation.task_frames(task, s)}
    for _, _, stages, rows in synthetic_ablation.GROUPS:
      for _, temporal, _ in rows:
        assert (temporal, (4,) if temporal == 'none' else stages) in names
  assert {r.frames for r in runs if r.task == 'long_range'} == set(s.fig6_frames)


@pytest.mark.slow
def test_smoke_run_writes_report_and_resumes(tmp_path, capsys):
  out = str(tmp_path / 'results')
  assert synthetic_ablation.main(['--quick', '--smoke', '--out', out, '--workers', '1']) == 0
  saved = json.load(open(os.path.join(out, 'synthetic_ablation.json'), encoding='utf-8'))
  runs = {r['key']: r for r in saved['runs']}
  assert set(runs) == {'motion/none/stagesnone/frames8', 'long_range/dtf/stages4/frames8'}
  for r in runs.values():
    assert len(r['top1']) == 1 and 0 <= r['top1'][0] <= 100
    assert r['gflops']['ours'] > 0
  assert runs['long_range/dtf/stages4/frames8']['gflops']['ours'] > (
      runs['motion/none/stagesnone/frames8']['gflops']['ours'])
  report = open(os.path.join(out, 'synthetic_ablation.md'), encoding='utf-8').read()
  assert '| 2D (C2D) | `none` | 72.0 |' in report and '| DTF | `dtf` | 75.7 |' in report
  for png in ('table1.png', 'fig6.png'):
    with open(os.path.join(out, png), 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  capsys.readouterr()
  assert synthetic_ablation.main(['--quick', '--smoke', '--out', out, '--workers', '1']) == 0
  assert '2 already done' in capsys.readouterr().out


@pytest.mark.slow
def test_budget_smoke_writes_learning_curves(tmp_path):
  out = str(tmp_path / 'results')
  assert synthetic_ablation.main(['--budget', '--smoke', '--out', out, '--workers', '1']) == 0
  saved = json.load(open(os.path.join(out, 'budget_study.json'), encoding='utf-8'))
  assert {r['key'] for r in saved['runs']} == {'motion/none/stagesnone/frames8',
                                               'long_range/none/stagesnone/frames8'}
  for r in saved['runs']:  # evaluated at step 2 and at the end (step 4), which is top1
    assert [p[0] for p in r['curve'][0]] == [2, 4] and r['curve'][0][-1][1] == r['top1'][0]
  report = open(os.path.join(out, 'budget_study.md'), encoding='utf-8').read()
  assert '| `none` | - |' in report and '| 2 | 4 | train s |' in report
  assert not os.path.exists(os.path.join(out, 'synthetic_ablation.json'))
  with open(os.path.join(out, 'budget_study.png'), 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
