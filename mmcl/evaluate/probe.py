"""Linear probe / few-shot: closed-form ridge regression on frozen image embeddings.

Protocol (in the style of big_vision's few-shot least-squares eval, every choice explicit):
embeddings are L2-normalised (unless `normalize=False`). For each shot count k and seed, k
images per class are drawn from `train_split`; the ridge penalty is chosen on held-out
images (`val_split`, or else `val_per_class` further train images per class, disjoint from
the shots), and the classifier fit on the k shots with that penalty is scored on
`test_split` (default: the dataset's evaluation split, e.g. ImageNet's validation).
Targets are one-hot and the intercept is not penalised (features and targets are centred
on the training shots). Metrics: `probe/<name>/<k>shot/top1` (mean over seeds), `.../top1_std`.

A split may be a labelled file source instead ('csv:/data/test.csv', 'wds:...', read with
the `csv` options and `label_key`), and `dataset` itself one (its training images): a file
has no splits, so its `test_split` must name another file. The class count is that of
`classnames` (a file, one name a line, or a list) if given, else the largest label + 1.
"""
from collections.abc import Sequence

import numpy as np

from mmcl.data import sources
from mmcl.evaluate import predict, zeroshot
from mmcl.evaluate import prompts as prompts_lib
from mmcl.evaluate.predict import Predictor, l2_normalize

L2_REGS = tuple(2.0 ** k for k in range(-10, 11, 2))


def ridge_fits(x_NxD: np.ndarray, labels_N: np.ndarray, num_classes: int,
               l2_regs: Sequence[float]):
  """[(W_DxC, b_C)] minimising |x W + b - onehot|^2 + l2 |W|^2, one per l2 (one SVD)."""
  x = np.asarray(x_NxD, np.float64)
  y_NxC = np.eye(num_classes)[labels_N]
  x_mean, y_mean = x.mean(axis=0), y_NxC.mean(axis=0)
  u, s, vt = np.linalg.svd(x - x_mean, full_matrices=False)
  uty = u.T @ (y_NxC - y_mean)
  fits = []
  for l2 in l2_regs:
    w_DxC = vt.T @ ((s / (s * s + l2))[:, None] * uty)
    fits.append((w_DxC, y_mean - x_mean @ w_DxC))
  return fits


def ridge_accuracy(fit, x_NxD, labels_N) -> float:
  w, b = fit
  return float(np.mean(np.argmax(np.asarray(x_NxD, np.float64) @ w + b, axis=1) == labels_N))


def sample_shots(labels_N: np.ndarray, shots: int, extra: int, rng) -> tuple:
  """(indices of `shots` images per class, indices of the next `extra` per class)."""
  train, held = [], []
  for c in np.unique(labels_N):
    idx = rng.permutation(np.flatnonzero(labels_N == c))
    train.append(idx[:shots])
    held.append(idx[shots:shots + extra])
  return np.concatenate(train), np.concatenate(held)


def fewshot_accuracy(train, test, num_classes, shots, seed, l2_regs, val=None,
                     val_per_class: int = 5):
  """(test accuracy, chosen l2) of one few-shot draw; `train`/`test`/`val` = (x, labels)."""
  rng = np.random.default_rng(seed)
  idx, held = sample_shots(train[1], shots, 0 if val else val_per_class, rng)
  val = val or (train[0][held], train[1][held])
  if not len(val[1]):
    raise ValueError('No held-out images to choose the ridge penalty; set val_split or '
                     'val_per_class > 0 (or use fewer shots).')
  fits = ridge_fits(train[0][idx], train[1][idx], num_classes, l2_regs)
  best = int(np.argmax([ridge_accuracy(f, *val) for f in fits]))  # First best: largest bias.
  return ridge_accuracy(fits[best], *test), l2_regs[best]


class ProbeEvaluator:
  """Few-shot ridge-regression probes of the image tower on a labelled TFDS dataset."""

  def __init__(self, predictor: Predictor, *, dataset: str, pp_img: str,
               label_key: str = 'label', train_split: str = 'train',
               test_split: str | None = None,
               val_split: str | None = None, val_per_class: int = 5,
               shots: Sequence[int] = (1, 5, 10, 25), seeds: int = 3,
               l2_regs: Sequence[float] = L2_REGS, normalize: bool = True, data_dir=None,
               batch_size: int = 256, name: str | None = None, tokenizer=None, text_len=None,
               csv: dict | None = None, classnames=None):
    del tokenizer, text_len  # Image tower only.
    if not shots or any(int(k) < 1 for k in shots) or seeds < 1 or not l2_regs:
      raise ValueError(f'Probe needs shots >= 1, seeds >= 1 and some l2_regs; got '
                       f'shots={shots}, seeds={seeds}, l2_regs={l2_regs}.')
    is_file = sources.is_file_source(dataset)
    if is_file and not sources.is_file_source(test_split or ''):
      raise ValueError(f'Probe on file source {dataset!r}: a file has no splits, so its '
                       f'images train the probe; give test_split a file of held-out images '
                       f"(e.g. 'csv:/data/test.csv'), got test_split={test_split!r}.")
    if classnames is not None:
      self.num_classes = len(prompts_lib.classnames(classnames, None, label_key))
    elif is_file:
      self.num_classes = None  # The largest label + 1, once the labels are read.
    else:
      from mmcl.data import input_pipeline  # Lazy: tf.data.
      features = input_pipeline.get_builder(dataset, data_dir).info.features
      if label_key not in features or not hasattr(features[label_key], 'num_classes'):
        raise ValueError(f'{dataset} has no ClassLabel feature {label_key!r}; features: '
                         f'{sorted(features)}')
      self.num_classes = features[label_key].num_classes
    self.predictor, self.batch_size = predictor, batch_size
    self.name = name or (sources.short_name(dataset) if is_file else
                         dataset.split('/')[0].split(':')[0])
    self.label_key, self.normalize = label_key, normalize
    self.shots, self.seeds = tuple(int(k) for k in shots), seeds
    self.l2_regs, self.val_per_class = tuple(float(r) for r in l2_regs), val_per_class
    # Default: the labelled evaluation split of the zero-shot protocol (ImageNet: validation).
    base = dataset.split('/')[0].split(':')[0]
    test_split = test_split or zeroshot.DATASETS.get(base, {}).get('split', 'test')
    pp = f'{pp_img}|keep("image", "{label_key}")'
    options = {**(csv or {}), 'label_key': label_key, 'captions': False}
    def split_dataset(split):  # A split that names a file source reads that file.
      name = split if sources.is_file_source(split) else dataset
      return predict.eval_dataset(name, split, pp, batch_size, data_dir,
                                  options if sources.is_file_source(name) else None)
    self._ds = {split_name: split_dataset(split)
                for split_name, split in (('train', train_split), ('test', test_split),
                                          ('val', val_split)) if split}

  def _embed(self, params, ds):
    z, features = predict.embed_dataset(self.predictor, params, ds, self.batch_size)
    z = l2_normalize(z) if self.normalize else z
    labels = np.asarray(features[self.label_key], np.int64).reshape(len(z))
    return predict.host_concat(z), predict.host_concat(labels)

  def run(self, params) -> dict[str, float]:
    data = {k: self._embed(params, ds) for k, ds in self._ds.items()}
    top = max(int(l.max(initial=0)) for _, l in data.values())
    num_classes = self.num_classes or top + 1
    if top >= num_classes:
      raise ValueError(f'probe/{self.name}: label {top} is past its {num_classes} classes '
                       '(classnames); wrong classnames or label_key?')
    metrics = {}
    for k in self.shots:
      accs = [fewshot_accuracy(data['train'], data['test'], num_classes, k, seed,
                               self.l2_regs, data.get('val'), self.val_per_class)[0]
              for seed in range(self.seeds)]
      metrics[f'probe/{self.name}/{k}shot/top1'] = float(np.mean(accs))
      metrics[f'probe/{self.name}/{k}shot/top1_std'] = float(np.std(accs))
    return metrics
