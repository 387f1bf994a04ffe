"""Video-level evaluation on the host: views -> per-video scores -> metrics and report files.

Scores are softmax probabilities of single views ``V C``; a video's score is the mean over its
views (the paper's protocol). Files written by ``write_eval_report`` (atomically):
  eval_results.json      metrics, step, number of videos and views (``labelled: false`` and no
                         metrics for an unlabelled split, e.g. a test set)
  predictions.jsonl      one line per video: id, label, label name, top-5 classes, names, scores
  confusion_matrix.png   row-normalised confusion matrix (rows: true class; labelled splits)
"""

import json
from typing import Any, Dict, Optional, Sequence

import numpy as np

from dtf_jax import storage


def aggregate_views(scores: np.ndarray, video_index: np.ndarray, num_videos: int):
  """``V C`` view scores with their video index ``V`` -> ``(num_videos C mean, num_videos counts)``.

  Views with a negative index (padding) are ignored."""
  scores = np.asarray(scores, np.float64)
  video_index = np.asarray(video_index)
  keep = video_index >= 0
  if np.any(video_index[keep] >= num_videos):
    raise ValueError(f'video index {video_index.max()} >= number of videos {num_videos}')
  sums = np.zeros((num_videos, scores.shape[1]))
  np.add.at(sums, video_index[keep], scores[keep])
  counts = np.bincount(video_index[keep], minlength=num_videos)
  return sums / np.maximum(counts, 1)[:, None], counts


def classification_metrics(video_scores: np.ndarray, labels: np.ndarray) -> Dict[str, float]:
  """``N C`` scores and ``N`` labels -> top-1, top-5, mean class accuracy (classes present)."""
  labels = np.asarray(labels)
  order = np.argsort(-video_scores, axis=1, kind='stable')
  top1 = order[:, 0] == labels
  top5 = np.any(order[:, :5] == labels[:, None], axis=1)
  present = np.unique(labels)
  per_class = [np.mean(top1[labels == c]) for c in present]
  return {'top1': float(np.mean(top1)), 'top5': float(np.mean(top5)),
          'mean_class_accuracy': float(np.mean(per_class)), 'num_videos': int(len(labels))}


def confusion_matrix(predictions: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
  """``C C`` counts, rows = true class, columns = predicted class."""
  matrix = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(matrix, (np.asarray(labels), np.asarray(predictions)), 1)
  return matrix


def plot_confusion_matrix(matrix: np.ndarray, class_names: Sequence[str], path: str) -> None:
  """Saves the row-normalised ``matrix`` as a PNG (class names on the axes up to 50 classes)."""
  import io  # pylint: disable=import-outside-toplevel
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  rates = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
  n = len(class_names)
  side = min(4 + 0.25 * n, 30)
  fig, ax = plt.subplots(figsize=(side, side))
  image = ax.imshow(rates, cmap='Blues', vmin=0, vmax=1, interpolation='nearest')
  fig.colorbar(image, ax=ax, fraction=0.046)
  ax.set_xlabel('predicted')
  ax.set_ylabel('true')
  if n <= 50:
    ax.set_xticks(range(n), class_names, rotation=90, fontsize=7)
    ax.set_yticks(range(n), class_names, fontsize=7)
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', dpi=100, bbox_inches='tight')
  plt.close(fig)
  storage.write_bytes(path, buffer.getvalue())


def split_metrics(video_scores: np.ndarray, labels: np.ndarray) -> Dict[str, Any]:
  """:func:`classification_metrics` of a labelled split plus ``labelled: True``; for an unlabelled
  split (every label -1, as the converter stores test sets) only ``num_videos`` and
  ``labelled: False``. Raises ``ValueError`` for a split mixing both, or a label outside
  ``0..C-1``."""
  labels = np.asarray(labels)
  num_classes = np.shape(video_scores)[1]
  unlabelled = labels == -1
  if unlabelled.all():
    return {'num_videos': int(len(labels)), 'labelled': False}
  if unlabelled.any():
    raise ValueError(f'{int(unlabelled.sum())} of {len(labels)} videos are unlabelled (label -1): '
                     f'a split must be labelled throughout or not at all')
  if labels.min() < 0 or labels.max() >= num_classes:
    bad = labels[(labels < 0) | (labels >= num_classes)]
    raise ValueError(f'labels {sorted(set(bad.tolist()))[:5]} are outside 0..{num_classes - 1}')
  return dict(classification_metrics(video_scores, labels), labelled=True)


def write_eval_report(directory: str, video_scores: np.ndarray, labels: np.ndarray,
                      video_ids: Sequence[str], class_names: Sequence[str],
                      extra: Optional[dict] = None) -> Dict[str, Any]:
  """Computes :func:`split_metrics` of ``N C`` video scores and writes the report files (no
  confusion matrix for an unlabelled split, whose predictions carry ``label: null``)."""
  metrics = split_metrics(video_scores, labels)
  directory = storage.path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  results = dict(metrics, **(extra or {}))
  if not metrics['labelled']:
    results['note'] = 'unlabelled split: predictions only, no accuracy'
  storage.write_json(directory / 'eval_results.json', results)
  order = np.argsort(-video_scores, axis=1, kind='stable')[:, :5]
  lines = []
  for i, video_id in enumerate(video_ids):
    top, label = order[i], int(labels[i])
    lines.append(json.dumps({
        'id': video_id, 'label': label if label >= 0 else None,
        'label_name': class_names[label] if label >= 0 else None,
        'top5': [int(c) for c in top], 'top5_names': [class_names[c] for c in top],
        'top5_scores': [round(float(video_scores[i, c]), 6) for c in top]}))
  storage.write_text(directory / 'predictions.jsonl', '\n'.join(lines) + '\n')
  if metrics['labelled']:
    plot_confusion_matrix(confusion_matrix(order[:, 0], labels, len(class_names)), class_names,
                          directory / 'confusion_matrix.png')
  return metrics
