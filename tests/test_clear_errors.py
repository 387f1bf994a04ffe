"""Bad input gives a clear error, not a traceback (issue 11, item 11): model arguments, tool flags,
main.py's config flags, unreadable checkpoint files."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from dtf_jax import convert
from dtf_jax.models import create_model, example_input_shape
from dtf_jax.tools import benchmark_model, convert_torch, model_info

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_R50 = dict(num_classes=5, clip_length=8, width=8, stage_sizes=(1, 1, 1, 1))
TINY_SWIN = dict(num_classes=5, clip_length=8, image_size=32, embed_dim=24, depths=(1, 1, 1, 1),
                 num_heads=(1, 1, 1, 1), window_size=4)


def _init_shapes(model):
  video = jax.ShapeDtypeStruct(example_input_shape(model), jnp.float32)
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), video)


# ---------------------------------------------------------------------------------------------
# 1. create_model checks its arguments


@pytest.mark.parametrize('name,kwargs,message', [
    ('dtf_r50', dict(clip_length=0), r'clip_length=0 .*positive int'),
    ('dtf_r50', dict(clip_length=-8), r'clip_length=-8 .*positive int'),
    ('dtf_r50', dict(num_classes=0), r'num_classes=0 .*positive int'),
    ('c2d_r50', dict(num_classes=2.5), r'num_classes=2.5 .*positive int'),
    ('dtf_r50', dict(early_stride=0), r'early_stride=0 .*positive int'),
    ('dtf_r50', dict(width=0), r'width=0 .*positive int'),
    ('dtf_r50', dict(dropout_rate=1.0), r'dropout_rate=1.0 .*\[0, 1\)'),
    ('dtf_r50', dict(drop_path_rate=-0.1), r'drop_path_rate=-0.1 .*\[0, 1\)'),
    ('dtf_r50', dict(stage_sizes=(1, 0, 1, 1)), r'stage_sizes=\(1, 0, 1, 1\) .*positive ints'),
    ('dtf_r50', dict(stage_sizes=()), r'stage_sizes=\(\) .*non-empty'),
    ('dtf_r50', dict(dtf_stages=(5,)), r'dtf_stages=\(5,\) .*in 1\.\.4'),
    ('dtf_r50', dict(temporal='tsm'),
     r"temporal='tsm' .*one of \['correlation', 'dtf', .*'temporal_shift'\]"),
    ('dtf_r50', dict(remat='all'), r"remat='all' .*one of \('none', 'block', 'dtf'\)"),
    ('c2d_swin_t', dict(TINY_SWIN, remat=True), r"remat=True .*one of \('none', 'block', 'dtf'\)"),
    ('dtf_r50', dict(fa_impl='cuda'), r"fa_impl='cuda' .*one of \('auto', 'scan', 'xla', 'pallas'\)"),
    ('dtf_swin_t', dict(TINY_SWIN, window_size=0), r'window_size=0 .*positive int'),
    ('dtf_swin_t', dict(TINY_SWIN, window_size=(2, 7, 7)), r'window_size=\(2, 7, 7\) .*int'),
    ('dtf_swin_t', dict(TINY_SWIN, image_size=0), r'image_size=0 .*positive int'),
    ('dtf_swin_t', dict(TINY_SWIN, patch_size=-4), r'patch_size=-4 .*positive int'),
    ('dtf_swin_t', dict(TINY_SWIN, embed_dim=0), r'embed_dim=0 .*positive int'),
    ('dtf_swin_t', dict(TINY_SWIN, depths=(1, 0, 1, 1)), r'depths=\(1, 0, 1, 1\) .*positive'),
    ('dtf_swin_t', dict(TINY_SWIN, num_heads=(1, 1)), r'num_heads=\(1, 1\) .*one entry per stage'),
    ('dtf_swin_t', dict(TINY_SWIN, embed_dim=25, num_heads=(2, 2, 2, 2)),
     r'embed_dim=25 .*25 channels.*2 heads'),
    ('dtf_swin_t', dict(TINY_SWIN, mlp_ratio=0), r'mlp_ratio=0 .*positive'),
])
def test_create_model_rejects_nonsense_arguments(name, kwargs, message):
  kwargs = dict(TINY_R50 if 'swin' not in name else TINY_SWIN, **kwargs)
  with pytest.raises(ValueError, match=rf'^{name}: {message}'):
    create_model(name, **kwargs)


def test_create_model_checks_clip_length_against_the_model():
  # The stem folds early_stride frames into one step: fewer frames give no time step at all.
  with pytest.raises(ValueError, match=r'clip_length=2 .*early_stride=4 .*at least 4 frames'):
    create_model('dtf_r50', **dict(TINY_R50, clip_length=2))
  # 8 frames / 4 = 2 steps, 2 frequency bins: a 2-channel stage-1 DTF block cannot be grouped.
  with pytest.raises(ValueError, match=r'clip_length=8 .*2 time steps.*stage 1 \(2 channels\)'):
    create_model('dtf_r50', **dict(TINY_R50, width=2))
  # Valid tiny configurations still build and initialise, down to a single time step.
  for name, kwargs in (('dtf_r50', dict(TINY_R50, dtf_stages=(4,))),
                       ('dtf_r50', dict(TINY_R50, clip_length=4)),
                       ('c2d_r50', dict(TINY_R50, width=2)),
                       ('dtf_r50', dict(TINY_R50, clip_length=2, early_stride=2)),
                       ('dtf_swin_t', TINY_SWIN),
                       ('dtf_swin_t', dict(TINY_SWIN, depths=[1, 1], num_heads=[2, 4],
                                           clip_length=4))):
    assert 'params' in _init_shapes(create_model(name, **kwargs)), (name, kwargs)


# ---------------------------------------------------------------------------------------------
# 2 and 5. Tool flags: usage errors naming the flag; models that cannot take the flags


@pytest.mark.parametrize('tool,argv,flag', [
    (benchmark_model, ['--repeats', '0'], '--repeats'),
    (benchmark_model, ['--batch', '0'], '--batch'),
    (benchmark_model, ['--clip-length', '-4'], '--clip-length'),
    (benchmark_model, ['--size', '0'], '--size'),
    (benchmark_model, ['--num-classes', '0'], '--num-classes'),
    (benchmark_model, ['--warmup', '-1'], '--warmup'),
    (model_info, ['--batch', '0'], '--batch'),
    (model_info, ['--clip-length', '0'], '--clip-length'),
    (model_info, ['--size', '-1'], '--size'),
    (model_info, ['--num-classes', '0'], '--num-classes'),
])
def test_tool_numeric_flags_must_be_positive(tool, argv, flag, capsys):
  with pytest.raises(SystemExit) as info:
    tool.parse_args(['--model', 'c2d_r50'] + argv)
  assert info.value.code == 2
  assert f'argument {flag}: must be >= ' in capsys.readouterr().err


@pytest.mark.parametrize('argv,flag', [(['--batch-size', '0'], '--batch-size'),
                                       (['--clip-length', '0'], '--clip-length'),
                                       (['--warmup-batches', '-1'], '--warmup-batches')])
def test_benchmark_input_flags_and_missing_data(argv, flag, tmp_path, capsys):
  from dtf_jax.tools import benchmark_input  # pylint: disable=import-outside-toplevel
  with pytest.raises(SystemExit) as info:
    benchmark_input.parse_args(['--data', str(tmp_path)] + argv)
  assert info.value.code == 2 and f'argument {flag}: must be >= ' in capsys.readouterr().err
  with pytest.raises(SystemExit, match=r"^error: --data .*: no 'train-\*-of-\*.tfrecord' files"):
    benchmark_input.main(['--data', str(tmp_path / 'absent')])


def test_convert_torch_numeric_flags_must_be_positive(tmp_path, capsys):
  with pytest.raises(SystemExit) as info:
    convert_torch.main(['--model', 'dtf_r50', '--clip-length', '0', '--num-classes', '5',
                        '--input', str(tmp_path / 'a.pth'), '--output', str(tmp_path / 'out')])
  assert info.value.code == 2 and 'argument --clip-length: must be >= 1' in capsys.readouterr().err


@pytest.mark.parametrize('tool', [model_info, benchmark_model])
def test_tool_size_the_model_cannot_take_is_one_line(tool, capsys):
  argv = ['--model', 'c2d_r50', '--size', '16', '--clip-length', '4']
  with pytest.raises(SystemExit) as info:
    tool.main(argv + (['--no-compile'] if tool is model_info else ['--no-backward']))
  err = capsys.readouterr().err
  assert info.value.code == 2, err
  assert err.count('\n') == 1 and '--size 16' in err and 'at least 32x32' in err, err


# ---------------------------------------------------------------------------------------------
# 3. main.py: a missing config file or an unknown config field is one line, exit code 2


@pytest.mark.parametrize('argv,culprit', [
    (['--config=configs/nope.py:32'], 'configs/nope.py'),
    (['--config=configs/quickstart.py', '--config.model.nmae=1'], 'model.nmae'),
])
def test_main_config_errors_are_one_line(tmp_path, argv, culprit):
  proc = subprocess.run([sys.executable, 'main.py', f'--workdir={tmp_path}', *argv], cwd=REPO,
                        capture_output=True, text=True, timeout=60,
                        env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.count('\n') == 1 and culprit in proc.stderr, proc.stderr
  assert 'Traceback' not in proc.stderr


def test_main_workdir_held_or_a_file_is_one_line(tmp_path):
  from etils import epath  # pylint: disable=import-outside-toplevel
  from dtf_jax import lockfile  # pylint: disable=import-outside-toplevel
  a_file = tmp_path / 'a_file'
  a_file.write_text('x')
  workdir = tmp_path / 'run'
  with lockfile.hold(epath.Path(workdir) / 'train.lock', 'training run'):
    for path, culprit in ((a_file, f'--workdir={a_file} is a file, not a folder'),
                          (workdir, 'in use by another training run')):
      proc = subprocess.run([sys.executable, 'main.py', f'--workdir={path}',
                             '--config=configs/quickstart.py'], cwd=REPO, capture_output=True,
                            text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS='cpu'))
      last = proc.stderr.strip().splitlines()[-1]
      assert proc.returncode == 1 and last.startswith('error: ') and culprit in last, proc.stderr
      assert 'Traceback' not in proc.stderr
  assert sorted(p.name for p in workdir.iterdir()) == []


def test_run_main_one_line_for_user_errors_traceback_for_bugs(monkeypatch, capsys):
  from dtf_jax import errors  # pylint: disable=import-outside-toplevel

  def user_error(argv):
    raise errors.UserError(f'--flag {argv[0]}: no such thing\n(second line)')

  def missing(argv):
    raise FileNotFoundError(2, 'No such file or directory', argv[0])

  def bug(argv):
    raise ValueError('a bug')

  monkeypatch.delenv(errors.DEBUG_ENV, raising=False)
  assert errors.run_main(user_error, ['x']) == 1
  assert capsys.readouterr().err == 'error: --flag x: no such thing (second line)\n'
  assert errors.run_main(missing, ['/no/file']) == 1
  assert capsys.readouterr().err == 'error: /no/file: No such file or directory\n'
  with pytest.raises(ValueError, match='a bug'):  # not the user's: the traceback stays
    errors.run_main(bug, [])
  monkeypatch.setenv(errors.DEBUG_ENV, '1')
  with pytest.raises(errors.UserError):
    errors.run_main(user_error, ['x'])


def test_convert_torch_model_arguments_checked_before_reading(tmp_path):
  message = _convert_args(tmp_path, ['--model-arg', 'dtype=notatype'])
  assert "dtype='notatype' is not allowed: must be a floating dtype" in message
  message = _convert_args(tmp_path, ['--model-arg', 'dtype=int32'])
  assert "dtype='int32' is not allowed" in message


# ---------------------------------------------------------------------------------------------
# 4. convert_torch: unreadable checkpoints and an --output that is a file


def _convert(tmp_path, src, out):
  with pytest.raises(SystemExit) as info:
    convert_torch.main(['--model', 'dtf_r50', '--clip-length', '8', '--num-classes', '5',
                        '--input', str(src), '--output', str(out)])
  message = info.value.code  # a string: printed on stderr, exit code 1
  assert isinstance(message, str) and '\n' not in message, message
  return message


def _convert_args(tmp_path, extra):
  """convert_torch's one-line error for an input that does not exist (never read) and ``extra``."""
  with pytest.raises(SystemExit) as info:
    convert_torch.main(['--model', 'dtf_r50', '--clip-length', '8', '--num-classes', '5',
                        '--input', str(tmp_path / 'absent.pth'), '--output',
                        str(tmp_path / 'out'), *extra])
  message = info.value.code
  assert isinstance(message, str) and '\n' not in message, message
  assert not (tmp_path / 'out').exists()
  return message


@pytest.mark.parametrize('suffix', ['.pth', '.safetensors'])
def test_empty_checkpoint_file(tmp_path, suffix):
  src = tmp_path / f'empty{suffix}'
  src.write_bytes(b'')
  with pytest.raises(convert.CheckpointReadError, match=r'empty \(0 bytes\)'):
    convert.read_state_dict(str(src))
  message = _convert(tmp_path, src, tmp_path / 'out')
  assert str(src) in message and 'empty (0 bytes)' in message
  assert not (tmp_path / 'out').exists()


def test_text_file_is_not_a_checkpoint(tmp_path):
  src = tmp_path / 'notes.pth'
  src.write_text('these are not weights\n')
  message = _convert(tmp_path, src, tmp_path / 'out')
  assert str(src) in message and 'not a PyTorch or safetensors checkpoint' in message
  with pytest.raises(convert.CheckpointReadError, match='is a directory'):
    convert.read_state_dict(str(tmp_path))


def test_convert_output_that_is_a_file(tmp_path):
  out = tmp_path / 'out.txt'
  out.write_text('keep me\n')
  message = _convert(tmp_path, tmp_path / 'missing.pth', out)
  assert str(out) in message and 'existing file' in message
  assert out.read_text() == 'keep me\n'
