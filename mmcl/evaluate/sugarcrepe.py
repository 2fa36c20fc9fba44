"""SugarCrepe (Hsieh et al., NeurIPS 2023 Datasets and Benchmarks): hard negative captions.

Released as one json per category (github.com/RAIVNLab/sugar-crepe, data/<category>.json),
each {id: {filename, caption, negative_caption}} over COCO val2017 images. An item is
correct when its image scores the positive caption strictly above the negative one (the
released main_eval.py). Metrics: `sugarcrepe/<category>` accuracy, `sugarcrepe/<group>` the
mean over a group's categories (the paper's REPLACE / SWAP / ADD columns) and
`sugarcrepe/mean` over every category evaluated.
"""
from collections.abc import Sequence

import numpy as np

from mmcl import fs
from mmcl.evaluate import local_files
from mmcl.evaluate.predict import Predictor

CATEGORIES = ('add_att', 'add_obj', 'replace_att', 'replace_obj', 'replace_rel', 'swap_att',
              'swap_obj')


class SugarCrepeEvaluator(local_files.LocalBenchmark):
  """Accuracy per SugarCrepe category; `root` holds <category>.json, images in image_dir."""

  def __init__(self, predictor: Predictor, *, root: str, image_dir: str | None = None,
               categories: Sequence[str] = CATEGORIES, **kw):
    super().__init__(predictor, **kw)
    categories = [categories] if isinstance(categories, str) else list(categories)
    unknown = sorted(set(categories) - set(CATEGORIES))
    if unknown or not categories:
      raise ValueError(f'Unknown SugarCrepe categories {unknown or list(categories)}; valid: '
                       f'{list(CATEGORIES)}.')
    image_dir = image_dir or fs.join(root, 'val2017')
    self.items = {}  # category -> (image paths, [[positive, negative]]).
    for c in categories:
      data = local_files.read_json(fs.join(root, f'{c}.json'), f'SugarCrepe {c}')
      if not isinstance(data, dict) or not data:
        raise ValueError(f'SugarCrepe {c}: expected a non-empty {{id: item}} json object.')
      for key, item in data.items():
        local_files.require(item, ('filename', 'caption', 'negative_caption'),
                            f'SugarCrepe {c}', key)
      self.items[c] = ([fs.join(image_dir, v['filename']) for v in data.values()],
                       [[v['caption'], v['negative_caption']] for v in data.values()])

  def run(self, params) -> dict[str, float]:
    # One pass over the union: the categories share most of their images.
    paths = [p for ps, _ in self.items.values() for p in ps]
    texts = [t for _, ts in self.items.values() for t in ts]
    scores_Nx2 = self.scores(params, paths, texts)
    metrics, start = {}, 0
    for c, (ps, _) in self.items.items():
      s = scores_Nx2[start:start + len(ps)]
      metrics[f'sugarcrepe/{c}'] = float(np.mean(s[:, 0] > s[:, 1]))
      start += len(ps)
    for group in ('add', 'replace', 'swap'):
      accs = [v for c, v in metrics.items() if c.split('/')[1].startswith(group + '_')]
      if accs:
        metrics[f'sugarcrepe/{group}'] = float(np.mean(accs))
    metrics['sugarcrepe/mean'] = float(np.mean([metrics[f'sugarcrepe/{c}'] for c in self.items]))
    return metrics
