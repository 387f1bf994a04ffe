"""Trains and evaluates DTF models on a device mesh.

    python main.py --config=configs/dtf_swin_b.py --workdir=/ckpt/dtf_swin_b
    python main.py --config=configs/dtf_r50.py:32,ssv2 --workdir=... --config.batch_size=128
    python main.py --config=configs/quickstart.py --workdir=... --mode=eval

Before a pod run, compile its train and eval steps for the pod's TPU topology, on any host (needs
libtpu: pip install -e '.[tpu]'); nothing is read or written, no --workdir needed:

    python main.py --config=configs/dtf_swin_b.py --compile_only=v5e:16x16

--mode: train (resumes from the workdir's latest checkpoint), eval (latest checkpoint, or
--config.eval_checkpoint_step), train_and_eval (evaluates every config.eval_every_steps and at the
end). Any config field can be overridden with --config.FIELD=value; an unknown field or a value of
the wrong type stops before anything is loaded. The resolved config is written to
WORKDIR/config.json. A training run holds WORKDIR/train.lock: a second one on the same workdir
stops at once naming the holder (eval may share the workdir).
"""

import difflib
import logging
import os
import re
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')  # before anything imports TensorFlow

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'config file, optionally with an argument: '
                                'path.py[:arg]', lock_config=True)
flags.DEFINE_string('workdir', None, 'directory for checkpoints, logs, eval reports: a local path '
                    'or a URL (gs://bucket/runs/name); on several hosts, one every host reaches.')
flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'train_and_eval'], 'what to run.')
flags.DEFINE_string('compile_only', None, 'pod preflight: compile the train and eval steps for '
                    'this TPU topology (GENERATION:TOPOLOGY[,slices=N], e.g. v5e:16x16, '
                    'v5p:4x4x4, v6e:8x8,slices=2) and print memory, FLOPs, bytes and the '
                    'roofline per chip; exits 1 when a step does not fit. Reads and writes '
                    'nothing.')
flags.mark_flags_as_required(['config'])


def _usage_error(message: str):
  """Exits with ``message`` as one line on stderr and code 2 (bad usage)."""
  print(f'{os.path.basename(sys.argv[0])}: error: {message}', file=sys.stderr)
  sys.exit(2)


def _config_value(argv):
  """The value of the last ``--config=path.py[:arg]`` / ``--config path.py[:arg]`` in ``argv``."""
  value = None
  for i, arg in enumerate(argv[1:], 1):
    if arg == '--':
      break
    if re.match(r'--?config=', arg):
      value = arg.split('=', 1)[1]
    elif re.fullmatch(r'--?config', arg) and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def _unknown_field(argv, config_value):
  """A message naming the first ``--config.FIELD`` in ``argv`` that is no field of the config
  file, or None."""
  try:
    config = config_flags.config_flags.ConfigFileFlagParser('config', lock_config=False).parse(
        config_value)
  except Exception:  # pylint: disable=broad-except
    return None  # the file itself fails: reported by absl's message
  for arg in argv[1:]:
    if arg == '--':
      break
    match = re.match(r'--?(?:no)?config\.([^=]+)', arg)
    if not match:
      continue
    node, parents = config, []
    for part in match.group(1).split('.'):
      if '[' in part or not hasattr(node, 'keys'):
        break  # an index, or a value that is not a ConfigDict: left to ml_collections
      if part not in node.keys():
        prefix = ''.join(p + '.' for p in parents)
        close = difflib.get_close_matches(part, list(node.keys()), n=1)
        hint = (f'did you mean --config.{prefix}{close[0]}?' if close else
                f'{"config." + prefix[:-1] if prefix else "the config"} has '
                f'{", ".join(sorted(node.keys()))}')
        return (f'--config.{match.group(1)}: {config_value} has no field {prefix}{part}; '
                f'{hint}')
      node, parents = node[part], parents + [part]
  return None


def parse_flags(argv):
  """absl's flag parsing, except that a usage error (a missing config file, an unknown config
  field, a bad flag value) is one line on stderr naming the culprit, with exit code 2."""
  config_value = _config_value(argv)
  if config_value is not None:
    path = config_value.split(':', 1)[0]
    if not os.path.isfile(path):
      _usage_error(f'--config={config_value}: no such config file: {path}')
  try:
    args = FLAGS(argv)
    if FLAGS.config is not None:
      FLAGS.config.keys()  # a config file that failed to load raises here
    return args
  except (flags.Error, AttributeError, KeyError, OSError, TypeError, ValueError,
          config_flags.config_flags.UnsupportedOperationError) as e:
    message = _unknown_field(argv, config_value) if config_value is not None else None
    if message is None:
      lines = [line.strip() for line in str(e).splitlines() if line.strip()]
      message = ' '.join(lines[:1] + lines[-1:] if len(lines) > 1 else lines) or repr(e)
    _usage_error(message)


class _QuietCheckpointing(logging.Filter):
  """Drops orbax's INFO lines (dozens per checkpoint); keeps its warnings and errors."""

  def filter(self, record):
    return record.levelno >= logging.WARNING or '/orbax/' not in record.pathname


def _compile_only(config, target: str) -> int:
  """``--compile_only``: the pod preflight (dtf_jax/train/preflight.py); its exit code."""
  from dtf_jax import tpu_target, train  # pylint: disable=import-outside-toplevel
  from dtf_jax.train import preflight  # pylint: disable=import-outside-toplevel
  try:
    tpu_target.parse_target(target)
    train.validate_config(config)
  except ValueError as e:
    _usage_error(str(e))
  missing = tpu_target.libtpu_available()
  if missing:
    sys.exit(f'error: --compile_only={target}: {missing}')
  try:
    return preflight.preflight(config, target)
  except (ValueError, RuntimeError) as e:
    sys.exit(f'error: --compile_only={target}: {e}')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  absl_logging.get_absl_handler().addFilter(_QuietCheckpointing())
  config = FLAGS.config
  if FLAGS.compile_only:
    sys.exit(_compile_only(config, FLAGS.compile_only))
  if not FLAGS.workdir:
    _usage_error('--workdir is required (except with --compile_only)')
  from dtf_jax import errors, multihost, storage  # pylint: disable=import-outside-toplevel
  try:
    workdir = str(storage.path(FLAGS.workdir))
    if storage.path(workdir).exists() and not storage.path(workdir).is_dir():
      raise ValueError(f'--workdir={FLAGS.workdir} is a file, not a folder')
    multihost.initialize(config.distributed, log=lambda m: print(m, flush=True))
  except ValueError as e:
    sys.exit(f'error: {e}')
  import jax  # pylint: disable=import-outside-toplevel
  from dtf_jax import train  # pylint: disable=import-outside-toplevel
  try:
    train.validate_config(config)
  except ValueError as e:
    sys.exit(f'error: {e}')
  try:
    if FLAGS.mode == 'eval':
      results = train.evaluate_checkpoint(config, workdir)
    else:
      _, results = train.train(config, workdir, with_eval=FLAGS.mode == 'train_and_eval')
  except errors.EXPECTED as e:  # what the user gave: one line (DTF_DEBUG=1: the traceback)
    if os.environ.get(errors.DEBUG_ENV) == '1':
      raise
    sys.exit(f'error: {errors.one_line(e)}')
  if results and jax.process_index() == 0:
    if results['labelled']:
      print(f'top1 {results["top1"]:.4f} top5 {results["top5"]:.4f} '
            f'mean_class_accuracy {results["mean_class_accuracy"]:.4f}', flush=True)
    else:
      print(f'unlabelled split: predictions of {results["num_videos"]} videos, no accuracy',
            flush=True)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
