"""Retrieval on Karpathy's splits from their released files: Flickr30k (and COCO, Flickr8k).

The CLIP paper's retrieval protocol (and CLIP_benchmark's, DataComp's) is the Karpathy test
split: Flickr30k's 1,000 images with 5 captions each, COCO's 5,000. TFDS has no Flickr30k
builder, so this reads Karpathy & Fei-Fei's split file (cs.stanford.edu/people/karpathy/
deepimagesent: `dataset_flickr30k.json`, also `dataset_coco.json`, `dataset_flickr8k.json`):
{"images": [{"filename": ..., ["filepath": ...,] "split": "test"|"val"|"train"|"restval",
"sentences": [{"raw": ...}, ...]}, ...]}, with the images in `image_dir` (Flickr30k's
flickr30k-images/; COCO's root holding val2014/ as `filepath`). Every caption of every image
of the split, ranked as retrieval.py does: metrics `retrieval/<name>/{i2t,t2i}_r{1,5,10}`,
ranks, `mean_r1` and `mean_recall`.
"""
import numpy as np

from mmcl import fs
from mmcl.evaluate import local_files
from mmcl.evaluate import retrieval
from mmcl.evaluate.predict import Predictor

SPLITS = ('train', 'restval', 'val', 'test')


class KarpathyRetrievalEvaluator(local_files.LocalBenchmark):
  """Image<->text retrieval over one split of a Karpathy split file."""

  def __init__(self, predictor: Predictor, *, annotations: str, image_dir: str,
               split: str = 'test', name: str | None = None, chunk: int = 1024, **kw):
    super().__init__(predictor, **kw)
    if split not in SPLITS:
      raise ValueError(f'Unknown Karpathy split {split!r}; valid: {list(SPLITS)}.')
    data = local_files.read_json(annotations, 'Karpathy split file')
    local_files.require(data, ('images',), 'Karpathy split file', annotations)
    images = [im for im in data['images'] if im.get('split') == split]
    if not images:
      raise ValueError(f'{annotations} has no images in split {split!r}; splits there: '
                       f'{sorted({im.get("split") for im in data["images"]})}.')
    self.name = name or data.get('dataset', 'karpathy')
    self.chunk, self.paths, self.texts, image_of_text = chunk, [], [], []
    for i, im in enumerate(images):
      local_files.require(im, ('filename', 'sentences'), 'Karpathy split file',
                          f'image {i} of split {split!r}')
      self.paths.append(fs.join(image_dir, *([im['filepath']] if im.get('filepath') else []),
                                im['filename']))
      for sentence in im['sentences']:
        self.texts.append(sentence['raw'].strip())
        image_of_text.append(i)
    self.image_of_text = np.asarray(image_of_text, np.int64)

  def run(self, params) -> dict[str, float]:
    zimg, img_row = self.embed_images(params, self.paths)
    ztxt, txt_row = self.embed_texts(params, self.texts)
    i2t, t2i = retrieval.retrieval_ranks(zimg[img_row], ztxt[txt_row], self.image_of_text,
                                         self.chunk)
    return retrieval.summarized(retrieval.retrieval_metrics(i2t, t2i, f'retrieval/{self.name}'),
                                f'retrieval/{self.name}')
