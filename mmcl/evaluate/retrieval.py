"""Image-text retrieval with several captions per image: R@1/5/10 in both directions.

image->text: an image is a hit at k if any of its captions is among the k best captions;
text->image: a caption is a hit at k if its image is among the k best images. Scores are
computed in chunks of rows, so 5k images x 25k captions never sit in memory at once.
A file source ('csv:...' read with the `csv` options, 'wds:...') has one caption a row.
Summaries: `mean_r1` (the mean of both R@1, DataComp's retrieval metric) and `mean_recall`
(the mean of all six R@k, i.e. RSUM / 6).
"""
import jax
import numpy as np

from mmcl.data import sources, tokenizers
from mmcl.evaluate import predict
from mmcl.evaluate import prompts as prompts_lib
from mmcl.evaluate.predict import Predictor

KS = (1, 5, 10)
# Per-dataset protocol: the split and the feature holding each image's captions. COCO uses
# Karpathy's 5k-image test split (25k captions; TFDS's coco_captions splits are Karpathy's).
# TFDS (4.9) has no Flickr30k builder; one with a `captions` feature and Karpathy's 1k-image
# `test` split runs under DEFAULT_PROTOCOL.
DATASETS = {
    'coco_captions': dict(split='test', captions_key='captions/text'),
    'mmcl_shapes': dict(split='test', captions_key='captions'),
}
DEFAULT_PROTOCOL = dict(split='test', captions_key='captions')


def retrieval_ranks(zimg_NxD, ztxt_MxD, image_of_text_M, chunk: int = 1024):
  """(0-based rank of each image's best caption [N], rank of each caption's image [M])."""
  n = len(zimg_NxD)
  i2t = np.empty(n, np.int64)
  for s in range(0, n, chunk):
    scores = zimg_NxD[s:s + chunk] @ ztxt_MxD.T
    rows = np.arange(s, min(s + chunk, n))
    own = image_of_text_M[None, :] == rows[:, None]
    best_own = np.max(np.where(own, scores, -np.inf), axis=1)
    i2t[rows] = np.sum(scores > best_own[:, None], axis=1)
  m = len(ztxt_MxD)
  t2i = np.empty(m, np.int64)
  for s in range(0, m, chunk):
    scores = ztxt_MxD[s:s + chunk] @ zimg_NxD.T
    own = scores[np.arange(len(scores)), image_of_text_M[s:s + chunk]]
    t2i[s:s + chunk] = np.sum(scores > own[:, None], axis=1)
  return i2t, t2i


def retrieval_metrics(i2t_ranks, t2i_ranks, prefix: str) -> dict[str, float]:
  metrics = {}
  for direction, ranks in (('i2t', i2t_ranks), ('t2i', t2i_ranks)):
    for k in KS:
      metrics[f'{prefix}/{direction}_r{k}'] = float(np.mean(ranks < k))
    metrics[f'{prefix}/{direction}_mean_rank'] = float(np.mean(ranks) + 1)
    metrics[f'{prefix}/{direction}_median_rank'] = float(np.median(ranks) + 1)
  return metrics


def summarized(m: dict[str, float], prefix: str) -> dict[str, float]:
  """`m` with `mean_r1` (both R@1) and `mean_recall` (all six R@k, RSUM / 6) added."""
  m = dict(m)
  m[f'{prefix}/mean_r1'] = (m[f'{prefix}/i2t_r1'] + m[f'{prefix}/t2i_r1']) / 2
  m[f'{prefix}/mean_recall'] = float(np.mean([m[f'{prefix}/{d}_r{k}'] for d in ('i2t', 't2i')
                                              for k in KS]))
  return m


class RetrievalEvaluator:
  """Image<->text retrieval on one captioned dataset (all captions of every image)."""

  def __init__(self, predictor: Predictor, *, dataset: str, pp_img: str, tokenizer: str,
               text_len: int, split: str | None = None, captions_key: str | None = None,
               data_dir=None, batch_size: int = 256, lowercase: bool = False,
               strip_punctuation: bool = False, name: str | None = None, chunk: int = 1024,
               csv: dict | None = None):
    is_file = sources.is_file_source(dataset)
    base = sources.short_name(dataset) if is_file else dataset.split('/')[0].split(':')[0]
    protocol = DEFAULT_PROTOCOL if is_file else DATASETS.get(base, DEFAULT_PROTOCOL)
    self.predictor = predictor
    self.name = name or base
    self.tokenizer = tokenizers.get_tokenizer(tokenizer)
    self.text_len, self.batch_size, self.chunk = text_len, batch_size, chunk
    self.lowercase, self.strip_punctuation = lowercase, strip_punctuation
    self.captions_key = captions_key or protocol['captions_key']
    top = self.captions_key.split('/')[0]  # 'captions/text': a field of a nested feature.
    self._ds = predict.eval_dataset(dataset, split or protocol['split'],
                                    f'{pp_img}|keep("image", "{top}")', batch_size, data_dir,
                                    csv if is_file else None)

  def run(self, params) -> dict[str, float]:
    zimg, features = predict.embed_dataset(self.predictor, params, self._ds, self.batch_size)
    if self.captions_key not in features:
      raise ValueError(f'{self.name}: no captions feature {self.captions_key!r}; features: '
                       f'{sorted(features)}')
    texts, image_of_text = [], []
    for i, captions in enumerate(features[self.captions_key]):
      for c in captions:
        c = c.decode('utf-8') if isinstance(c, bytes) else str(c)
        texts.append(prompts_lib.normalize(c, self.lowercase, self.strip_punctuation))
        image_of_text.append(i)
    # Texts are cheap per row: the Predictor's larger default batch keeps matmuls big.
    ztxt = self.predictor.texts(params, self.tokenizer.tokenize(texts, self.text_len))
    # Every process gathers all rows; image ids move by the images of earlier processes.
    offset = int(np.sum(predict.host_concat(np.array([len(zimg)]))[:jax.process_index()]))
    zimg, ztxt = predict.host_concat(zimg), predict.host_concat(ztxt)
    image_of_text = predict.host_concat(np.asarray(image_of_text, np.int64) + offset)
    i2t, t2i = retrieval_ranks(zimg, ztxt, image_of_text, self.chunk)
    prefix = f'retrieval/{self.name}'
    return summarized(retrieval_metrics(i2t, t2i, prefix), prefix)
