"""Image-text retrieval with several captions per image: R@1/5/10 in both directions.

image->text: an image is a hit at k if any of its captions is among the k best captions;
text->image: a caption is a hit at k if its image is among the k best images. Scores are
computed in chunks of rows, so 5k images x 25k captions never sit in memory at once.
"""
import numpy as np

from mmcl.data import input_pipeline, tokenizers
from mmcl.evaluate.predict import Predictor

KS = (1, 5, 10)


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


class RetrievalEvaluator:

  def __init__(self, predictor: Predictor, *, dataset: str, split: str, pp_img: str,
               tokenizer: str, text_len: int, captions_key: str = 'captions',
               data_dir=None, batch_size: int = 256, lowercase: bool = False,
               name: str | None = None):
    self.predictor = predictor
    self.name = name or dataset.split('/')[0].split(':')[0]
    self.tokenizer = tokenizers.get_tokenizer(tokenizer)
    self.text_len = text_len
    self.lowercase = lowercase
    self.batch_size = batch_size
    self.captions_key = captions_key
    self._ds = input_pipeline.get_dataset(
        name=dataset, split=split, pp=f'{pp_img}|keep("image", "{captions_key}")',
        batch_size=batch_size, data_dir=data_dir, train=False)

  def run(self, params) -> dict[str, float]:
    zimg, texts, image_of_text = [], [], []
    n = 0
    for batch in self._ds.as_numpy_iterator():
      zimg.append(self.predictor.images(params, batch['image'], self.batch_size))
      captions_batch = batch[self.captions_key]
      if hasattr(captions_batch, 'to_list'):  # Ragged when the caption count varies.
        captions_batch = captions_batch.to_list()
      for i, captions in enumerate(captions_batch):
        for c in captions:
          c = c.decode('utf-8') if isinstance(c, bytes) else str(c)
          texts.append(c.lower() if self.lowercase else c)
          image_of_text.append(n + i)
      n += len(batch['image'])
    ztxt = self.predictor.texts(params, self.tokenizer.tokenize(texts, self.text_len))
    i2t, t2i = retrieval_ranks(np.concatenate(zimg), ztxt, np.asarray(image_of_text))
    return retrieval_metrics(i2t, t2i, f'retrieval/{self.name}')
