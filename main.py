"""Trains and evaluates DTF models on a device mesh.

    python main.py --config=configs/dtf_swin_b.py --workdir=/ckpt/dtf_swin_b
    python main.py --config=configs/dtf_r50.py:32,ssv2 --workdir=... --config.batch_size=128
    python main.py --config=configs/quickstart.py --workdir=... --mode=eval

--mode: train (resumes from the workdir's latest checkpoint), eval (latest checkpoint, or
--config.eval_checkpoint_step), train_and_eval (evaluates every config.eval_every_steps and at the
end). Any config field can be overridden with --config.FIELD=value; an unknown field or a value of
the wrong type stops before anything is loaded. The resolved config is written to
WORKDIR/config.json.
"""

import logging
import os
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
flags.mark_flags_as_required(['config', 'workdir'])


class _QuietCheckpointing(logging.Filter):
  """Drops orbax's INFO lines (dozens per checkpoint); keeps its warnings and errors."""

  def filter(self, record):
    return record.levelno >= logging.WARNING or '/orbax/' not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  absl_logging.get_absl_handler().addFilter(_QuietCheckpointing())
  config = FLAGS.config
  from dtf_jax import multihost, storage  # pylint: disable=import-outside-toplevel
  try:
    workdir = str(storage.path(FLAGS.workdir))
    multihost.initialize(config.distributed, log=lambda m: print(m, flush=True))
  except ValueError as e:
    sys.exit(f'error: {e}')
  import jax  # pylint: disable=import-outside-toplevel
  from dtf_jax import train  # pylint: disable=import-outside-toplevel
  try:
    train.validate_config(config)
  except ValueError as e:
    sys.exit(f'error: {e}')
  if FLAGS.mode == 'eval':
    results = train.evaluate_checkpoint(config, workdir)
  else:
    _, results = train.train(config, workdir, with_eval=FLAGS.mode == 'train_and_eval')
  if results and jax.process_index() == 0:
    if results['labelled']:
      print(f'top1 {results["top1"]:.4f} top5 {results["top5"]:.4f} '
            f'mean_class_accuracy {results["mean_class_accuracy"]:.4f}', flush=True)
    else:
      print(f'unlabelled split: predictions of {results["num_videos"]} videos, no accuracy',
            flush=True)


if __name__ == '__main__':
  app.run(main)
