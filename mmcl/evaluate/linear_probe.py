"""The CLIP paper's linear probe: L-BFGS logistic regression on frozen image features.

CLIP (Radford et al. 2021, appendix A.3) fits scikit-learn's L-BFGS multinomial logistic
regression (at most 1,000 iterations) on the features of the whole training split. The L2
strength is chosen on a validation split (the dataset's own, else one split off the training
set) by a parametric binary search over C in 1e-6 ... 1e6: every second decade first, then
the step is halved around the best until 8 steps a decade. The classifier is then refit on
train + validation and scored on the test split. Here the same objective (summed
cross-entropy + |W|^2 / (2C), intercept unpenalised) is minimised by SciPy's L-BFGS-B, the
solver scikit-learn calls, in float64. Features are used as the tower gives them (CLIP
does not normalise them; `normalize=True` does). Without `val_split`, a seeded
`val_fraction` of the training images is held out (CLIP does not state its fraction).

Metrics: `probe/<name>/linear/top1`, `.../mean_per_class_recall` where the dataset's
zero-shot suite metric is that (or `metric=` says so), and `.../C`, the chosen strength.
"""
import numpy as np
from scipy import optimize, special

from mmcl.evaluate import probe, suite, zeroshot

C_RANGE = (-6.0, 6.0)  # log10 C.


def logistic_fit(x_NxD, labels_N, num_classes: int, c: float, max_iter: int = 1000):
  """(W_DxC, b_C) minimising sum_i CE(x_i W + b, y_i) + |W|^2 / (2c) by L-BFGS."""
  x = np.asarray(x_NxD, np.float64)
  d = x.shape[1]
  y_NxC = np.eye(num_classes)[np.asarray(labels_N)]

  def loss_and_grad(theta):
    w, b = theta[:-num_classes].reshape(d, num_classes), theta[-num_classes:]
    logits = x @ w + b
    logz = special.logsumexp(logits, axis=1)
    loss = np.sum(logz) - np.sum(logits * y_NxC) + 0.5 * np.sum(w * w) / c
    g = np.exp(logits - logz[:, None]) - y_NxC
    return loss, np.concatenate([(x.T @ g + w / c).ravel(), g.sum(axis=0)])

  theta = np.zeros(d * num_classes + num_classes)
  res = optimize.minimize(loss_and_grad, theta, jac=True, method='L-BFGS-B',
                          options=dict(maxiter=max_iter, maxls=50))
  return res.x[:-num_classes].reshape(d, num_classes), res.x[-num_classes:]


def classify(fit, x_NxD) -> np.ndarray:
  w, b = fit
  return np.argmax(np.asarray(x_NxD, np.float64) @ w + b, axis=1)


def score(pred_N, labels_N, num_classes: int, metric: str) -> float:
  labels_N = np.asarray(labels_N)
  if metric == 'top1':
    return float(np.mean(pred_N == labels_N))
  hits = np.bincount(labels_N[pred_N == labels_N], minlength=num_classes)
  return zeroshot.mean_per_class_recall(hits, np.bincount(labels_N, minlength=num_classes))


def search_c(val_score, lo: float = C_RANGE[0], hi: float = C_RANGE[1]):
  """CLIP's parametric binary search: (best C, {log10 C: validation score}).

  `val_score(C)` is evaluated at every second decade, then at the best +- 1, 1/2, 1/4 and
  1/8 decade; ties keep the earlier best (so the grid's smaller C).
  """
  scores = {}

  def at(e):
    if e not in scores:
      scores[e] = val_score(10.0 ** e)
    return scores[e]

  best = max(np.arange(lo, hi + 1e-9, 2.0), key=at)
  step = 2.0
  while step > 1 / 8:
    step /= 2
    best = max([e for e in (best, best - step, best + step) if lo <= e <= hi], key=at)
  return 10.0 ** best, scores


class LinearProbeEvaluator(probe.ProbeEvaluator):
  """Full-data logistic-regression probe of the image tower (the CLIP paper's protocol)."""

  def __init__(self, predictor, *, dataset: str, pp_img: str, label_key: str = 'label',
               train_split: str = 'train', val_split: str | None = None,
               val_fraction: float = 0.2, test_split: str | None = None,
               metric: str | None = None, max_iter: int = 1000, normalize: bool = False,
               seed: int = 0, data_dir=None, batch_size: int = 256, name: str | None = None,
               tokenizer=None, text_len=None):
    base = dataset.split('/')[0].split(':')[0]
    protocol = suite.SUITE.get(name or base, {})
    self.metric = metric or protocol.get('metric', 'top1')
    if self.metric not in zeroshot.METRICS or not 0 < val_fraction < 1:
      raise ValueError(f'Linear probe of {dataset}: metric must be one of {zeroshot.METRICS} '
                       f'and 0 < val_fraction < 1; got {self.metric!r}, {val_fraction}.')
    test = test_split or protocol.get('split', 'test')
    if '[' not in train_split and test.split('[')[0] == train_split:  # e.g. EuroSAT's.
      raise ValueError(f'Linear probe of {dataset}: train_split {train_split!r} holds the test '
                       f'split {test!r}; give a disjoint slice, e.g. train_split="train[:80%]".')
    super().__init__(predictor, dataset=dataset, pp_img=pp_img, label_key=label_key,
                     train_split=train_split, val_split=val_split,
                     test_split=test, shots=(1,), seeds=1,
                     normalize=normalize, data_dir=data_dir, batch_size=batch_size,
                     name=name, tokenizer=tokenizer, text_len=text_len)
    self.max_iter, self.val_fraction, self.seed = max_iter, val_fraction, seed

  def run(self, params) -> dict[str, float]:
    data = {k: self._embed(params, ds) for k, ds in self._ds.items()}
    (x, y), n = data['train'], self.num_classes
    if 'val' in data:
      fit_x, fit_y, (val_x, val_y) = x, y, data['val']
    else:  # Hold out a seeded share of train to choose C.
      order = np.random.default_rng(self.seed).permutation(len(y))
      held, kept = np.split(order, [int(round(self.val_fraction * len(y)))])
      fit_x, fit_y, val_x, val_y = x[kept], y[kept], x[held], y[held]

    def val_score(c):
      fit = logistic_fit(fit_x, fit_y, n, c, self.max_iter)
      return score(classify(fit, val_x), val_y, n, self.metric)

    c, _ = search_c(val_score)
    # The final fit: train + validation (for a held-out share, that is all of train).
    all_x, all_y = np.concatenate([fit_x, val_x]), np.concatenate([fit_y, val_y])
    pred = classify(logistic_fit(all_x, all_y, n, c, self.max_iter), data['test'][0])
    prefix, test_y = f'probe/{self.name}/linear', data['test'][1]
    metrics = {f'{prefix}/top1': score(pred, test_y, n, 'top1'), f'{prefix}/C': float(c)}
    if self.metric != 'top1':
      metrics[f'{prefix}/{self.metric}'] = score(pred, test_y, n, self.metric)
    return metrics
