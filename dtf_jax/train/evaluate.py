"""Multi-view evaluation on the mesh: views -> per-video scores gathered from every host ->
metrics and report files (``dtf_jax.metrics``)."""

import functools
import time
from typing import Any, Dict

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from clu import metric_writers
from jax.experimental import multihost_utils

from dtf_jax import metrics as metrics_lib
from dtf_jax import storage
from dtf_jax.data import pipeline
from dtf_jax.models import model_spec
from dtf_jax.pretrained import CHECKPOINT_DIR
from dtf_jax.train.checkpoints import checkpoint_manager, restore_latest, restore_step, \
    restore_variables
from dtf_jax.train.config import Setup, check_batches, check_classes, log, setup
from dtf_jax.train.sharding import MeshJit, host_local


def _predict_fn(s: Setup):
  """The jitted ``(variables, video B T H W 3) -> softmax B C`` of ``s``, compiled once."""
  if s.predict_fn is None:
    model = s.model
    argument = model_spec(model).size_argument
    if argument:  # built for one frame size (Swin: its attention masks): the eval size
      model = model.clone(**{argument: s.config.data.eval_size})

    @functools.partial(jax.jit, out_shardings=s.batch_sharding)
    def predict(variables, video):
      return jax.nn.softmax(model.apply(variables, video, train=False).astype(jnp.float32))
    s.predict_fn = MeshJit(predict, s.mesh)
  return s.predict_fn


def evaluate(s: Setup, variables: Dict[str, Any], step: int, workdir: str,
             writer=None) -> Dict[str, float]:
  """Multi-view evaluation of ``variables`` (``{'params', 'batch_stats'}``) on
  ``data.eval_split``; writes the report files under
  ``workdir/eval_step{step}`` (process 0) and returns ``metrics.split_metrics``: top-1, top-5 and
  mean class accuracy, or only the video count of an unlabelled split."""
  config = s.config
  source = pipeline.make_source(config.data.dataset, config.data.eval_split,
                                config.data.data_dir or None, jax.process_count(),
                                config.data.skip_corrupt_records)
  check_classes(config, source)
  check_batches(config, s.mesh.size, train=False, evaluation=True)
  per_host = config.eval_batch_size // jax.process_count()
  data = pipeline.eval_dataset(
      source, batch_size=per_host, clip_length=config.data.clip_length, stride=config.data.stride,
      size=config.data.eval_size, num_clips=config.data.num_clips,
      num_crops=config.data.num_crops, process_index=jax.process_index())
  predict = _predict_fn(s)
  scores, indices, labels, ids = [], [], [], {}
  start = time.time()
  for i, batch in enumerate(pipeline.guarded(source, data.dataset.as_numpy_iterator())):
    video = jax.make_array_from_process_local_data(s.batch_sharding, batch['video'])
    local = host_local(predict(variables, video), s.mesh)
    keep = batch['mask']
    scores.append(local[keep])
    indices.append(batch['video_index'][keep])
    labels.append(batch['label'][keep])
    ids.update(zip(batch['video_index'][keep].tolist(),
                   (v.decode() for v in batch['video_id'][keep])))
    if (i + 1) % 50 == 0 or i + 1 == data.num_batches:
      log(f'eval: {i + 1}/{data.num_batches} batches ({time.time() - start:.0f} s)')
  num_classes = config.data.num_classes
  scores = np.concatenate(scores) if scores else np.zeros((0, num_classes), np.float32)
  indices = np.concatenate(indices) if indices else np.zeros((0,), np.int64)
  labels = np.concatenate(labels) if labels else np.zeros((0,), np.int32)
  video_scores, counts, video_labels, video_ids = _gather_videos(
      scores, indices, labels, ids, source)
  if not np.all(counts == data.views_per_video):
    raise RuntimeError(f'eval: views per video {np.unique(counts)}, expected '
                       f'{data.views_per_video} for each of {source.num_videos} videos')
  extra = {'step': step, 'num_views': int(counts.sum()), 'split': config.data.eval_split,
           'views_per_video': data.views_per_video}
  directory = storage.path(workdir) / f'eval_step{step}'
  if jax.process_index() == 0:
    results = metrics_lib.write_eval_report(directory, video_scores, video_labels, video_ids,
                                            source.class_names, extra)
  else:
    results = metrics_lib.split_metrics(video_scores, video_labels)
  views = f'({source.num_videos} videos x {data.views_per_video} views) -> {directory}'
  if not results['labelled']:
    log(f'eval step {step}: {config.data.eval_split} is unlabelled: predictions only, no '
        f'accuracy {views}')
    return results
  if writer is not None:
    writer.write_scalars(step, {f'eval/{k}': results[k]
                                for k in ('top1', 'top5', 'mean_class_accuracy')})
  log(f'eval step {step}: top1 {results["top1"]:.4f} top5 {results["top5"]:.4f} mean class '
      f'{results["mean_class_accuracy"]:.4f} {views}')
  return results


ID_BYTES = 256  # video ids are gathered from the hosts as fixed-size UTF-8 (longer ones cut)


def _utf8_prefix(text: str, size: int) -> bytes:
  """The longest UTF-8 prefix of ``text`` of at most ``size`` bytes that ends on a character."""
  return text.encode()[:size].decode(errors='ignore').encode()


def _gather_videos(scores, indices, labels, ids, source):
  """This host's view scores -> all videos' mean scores, counts, labels and ids (every host)."""
  num_videos = source.num_videos
  local_index = np.array(sorted(ids), np.int64)
  position = {v: i for i, v in enumerate(local_index)}
  rows = np.array([position[v] for v in indices], np.int64)
  means, counts = metrics_lib.aggregate_views(scores, rows, len(local_index))
  video_labels = np.zeros(len(local_index), np.int64)
  video_labels[rows] = labels
  id_bytes = np.zeros((len(local_index), ID_BYTES), np.uint8)
  for i, v in enumerate(local_index):
    raw = _utf8_prefix(ids[v], ID_BYTES)
    id_bytes[i, :len(raw)] = np.frombuffer(raw, np.uint8)
  if jax.process_count() > 1:  # Pad to the largest host, gather, drop the padding.
    size = max(source.host_sizes)
    pad = size - len(local_index)
    parts = [np.pad(local_index, (0, pad), constant_values=-1), np.pad(means, ((0, pad), (0, 0))),
             np.pad(counts, (0, pad)), np.pad(video_labels, (0, pad)),
             np.pad(id_bytes, ((0, pad), (0, 0)))]
    parts = [np.asarray(x).reshape(-1, *x.shape[2:])
             for x in multihost_utils.process_allgather(parts)]
    keep = parts[0] >= 0
    local_index, means, counts, video_labels, id_bytes = (x[keep] for x in parts)
  order = np.argsort(local_index)
  all_counts = np.zeros(num_videos, np.int64)
  all_counts[local_index] = counts
  if len(local_index) != num_videos or not np.array_equal(local_index[order],
                                                          np.arange(num_videos)):
    raise RuntimeError(f'eval: got {len(local_index)} of {num_videos} videos')
  video_ids = [bytes(b).rstrip(b'\0').decode() for b in id_bytes[order]]
  return means[order], all_counts, video_labels[order], video_ids


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, float]:
  """``--mode=eval``: the latest (or ``eval_checkpoint_step``) checkpoint of ``workdir``."""
  workdir = storage.path(workdir)
  if not (workdir / CHECKPOINT_DIR).is_dir():  # and create nothing
    raise FileNotFoundError(f'no checkpoint in {workdir / CHECKPOINT_DIR}')
  s = setup(config, with_train_data=False)
  manager = checkpoint_manager(workdir, config.keep_checkpoints)
  step = config.eval_checkpoint_step
  if step < 0:
    # Newer damaged ones are skipped, with the reason; the optimizer state is not read.
    restored = restore_latest(manager, s, restore=restore_variables)
    if restored is None:
      raise FileNotFoundError(f'no checkpoint in {manager.directory}')
    variables, _, step = restored
  else:
    if step not in manager.all_steps():
      raise FileNotFoundError(f'no checkpoint for step {step} in {manager.directory} '
                              f'(steps: {list(manager.all_steps())})')
    variables, _ = restore_step(manager, step, s, restore_variables)
  writer = metric_writers.create_default_writer(str(workdir), just_logging=jax.process_index() > 0)
  results = evaluate(s, variables, step, workdir, writer)
  writer.flush()
  manager.close()
  return results
