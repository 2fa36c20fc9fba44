"""Embedding geometry: the diagnostics of the modality-gap literature, on paired data.

On N matched (image, caption) pairs, with x_i, y_i the L2-normalised embeddings:
  modality_gap     |mean_i x_i - mean_i y_i|  ("Mind the Gap", Liang et al. 2022).
  alignment        mean_i |x_i - y_i|^2  (Wang & Isola 2020, alpha = 2).
  uniformity_img/txt  log mean_{i != j} exp(-2 |x_i - x_j|^2)  (Wang & Isola, t = 2).
  auc              P(s_ii > s_ij) over all positives i and negatives j != i (ties count 1/2).
  pos_cos/neg_cos  mean similarity of matched / unmatched pairs.
  erank_img/txt    effective rank exp(H(p)), p = singular values / their sum, of the [N, D]
                   matrix of normalised embeddings (Roy & Vetterli 2007; RankMe's form).
Each image is paired with its first caption. Metrics: `geometry/<name>/<metric>`.
"""
import numpy as np

from mmcl.data import tokenizers
from mmcl.evaluate import predict
from mmcl.evaluate import prompts as prompts_lib
from mmcl.evaluate import retrieval
from mmcl.evaluate.predict import Predictor, l2_normalize


def modality_gap(x_NxD, y_NxD) -> float:
  return float(np.linalg.norm(x_NxD.mean(axis=0) - y_NxD.mean(axis=0)))


def alignment(x_NxD, y_NxD) -> float:
  return float(np.mean(np.sum(np.square(x_NxD - y_NxD), axis=1)))


def uniformity(x_NxD, chunk: int = 2048) -> float:
  """log mean over ordered pairs i != j of exp(-2 |x_i - x_j|^2), in row chunks."""
  n = len(x_NxD)
  sq = np.sum(np.square(x_NxD), axis=1)
  logs = []
  for s in range(0, n, chunk):
    d2 = np.maximum(sq[s:s + chunk, None] + sq[None, :] - 2 * x_NxD[s:s + chunk] @ x_NxD.T, 0)
    e = -2 * d2
    e[np.arange(len(e)), np.arange(s, s + len(e))] = -np.inf  # Drop i == j.
    m = e.max()
    logs.append(m + np.log(np.sum(np.exp(e - m))))
  logs = np.asarray(logs)
  m = logs.max()
  return float(m + np.log(np.sum(np.exp(logs - m))) - np.log(n * (n - 1)))


def pair_auc(x_NxD, y_NxD, chunk: int = 2048) -> float:
  """Mann-Whitney AUC of positive (s_ii) vs negative (s_ij, i != j) pair similarities."""
  n = len(x_NxD)
  pos = np.sum(x_NxD * y_NxD, axis=1)
  neg = []
  for s in range(0, n, chunk):
    scores = x_NxD[s:s + chunk] @ y_NxD.T
    keep = np.ones(scores.shape, bool)
    keep[np.arange(len(scores)), np.arange(s, s + len(scores))] = False
    neg.append(scores[keep])
  neg = np.sort(np.concatenate(neg))
  below = np.searchsorted(neg, pos, side='left')
  ties = np.searchsorted(neg, pos, side='right') - below
  return float(np.sum(below + 0.5 * ties) / (len(pos) * len(neg)))


def effective_rank(x_NxD) -> float:
  x = np.asarray(x_NxD, np.float64)
  # Singular values from the smaller Gram matrix: [D, D] for N >> D (cheaper than an SVD).
  gram = x.T @ x if x.shape[0] >= x.shape[1] else x @ x.T
  s = np.sqrt(np.clip(np.linalg.eigvalsh(gram), 0, None))
  p = s / s.sum()
  p = p[p > 0]
  return float(np.exp(-np.sum(p * np.log(p))))


def geometry_metrics(zimg_NxD, ztxt_NxD, prefix: str) -> dict[str, float]:
  x = l2_normalize(np.asarray(zimg_NxD, np.float64))
  y = l2_normalize(np.asarray(ztxt_NxD, np.float64))
  if len(x) < 2:
    raise ValueError(f'{prefix}: geometry needs at least 2 pairs, got {len(x)}.')
  n = len(x)
  sims_sum = float(x.sum(axis=0) @ y.sum(axis=0))
  pos = np.sum(x * y, axis=1)
  return {
      f'{prefix}/modality_gap': modality_gap(x, y),
      f'{prefix}/alignment': alignment(x, y),
      f'{prefix}/uniformity_img': uniformity(x),
      f'{prefix}/uniformity_txt': uniformity(y),
      f'{prefix}/auc': pair_auc(x, y),
      f'{prefix}/pos_cos': float(pos.mean()),
      f'{prefix}/neg_cos': (sims_sum - float(pos.sum())) / (n * (n - 1)),
      f'{prefix}/erank_img': effective_rank(x),
      f'{prefix}/erank_txt': effective_rank(y),
  }


class GeometryEvaluator:
  """Geometry of image and caption embeddings on a captioned dataset's split."""

  def __init__(self, predictor: Predictor, *, dataset: str, pp_img: str, tokenizer: str,
               text_len: int, split: str | None = None, captions_key: str | None = None,
               data_dir=None, batch_size: int = 256, lowercase: bool = False,
               strip_punctuation: bool = False, name: str | None = None):
    base = dataset.split('/')[0].split(':')[0]
    protocol = retrieval.DATASETS.get(base, retrieval.DEFAULT_PROTOCOL)
    self.predictor, self.batch_size = predictor, batch_size
    self.name = name or base
    self.tokenizer = tokenizers.get_tokenizer(tokenizer)
    self.text_len = text_len
    self.lowercase, self.strip_punctuation = lowercase, strip_punctuation
    self.captions_key = captions_key or protocol['captions_key']
    top = self.captions_key.split('/')[0]
    self._ds = predict.eval_dataset(dataset, split or protocol['split'],
                                    f'{pp_img}|keep("image", "{top}")', batch_size, data_dir)

  def run(self, params) -> dict[str, float]:
    zimg, features = predict.embed_dataset(self.predictor, params, self._ds, self.batch_size)
    captions = features.get(self.captions_key)
    if captions is None:
      raise ValueError(f'{self.name}: no captions feature {self.captions_key!r}; features: '
                       f'{sorted(features)}')
    has = np.array([len(c) > 0 for c in captions], bool)
    texts = [c[0].decode('utf-8') if isinstance(c[0], bytes) else str(c[0])
             for c, h in zip(captions, has) if h]
    texts = [prompts_lib.normalize(t, self.lowercase, self.strip_punctuation) for t in texts]
    # Texts are cheap per row: the Predictor's larger default batch keeps matmuls big.
    ztxt = self.predictor.texts(params, self.tokenizer.tokenize(texts, self.text_len))
    zimg, ztxt = predict.host_concat(zimg[has]), predict.host_concat(ztxt)
    return geometry_metrics(zimg, ztxt, f'geometry/{self.name}')
