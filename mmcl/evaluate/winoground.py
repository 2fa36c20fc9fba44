"""Winoground (Thrush et al., CVPR 2022): two images, two captions with the same words.

Released on the Hugging Face hub (facebook/winoground): data/examples.jsonl, one line per
example {id, image_0, image_1, caption_0, caption_1, tag, secondary_tag, num_main_preds,
collapsed_tag}, and data/images.zip holding images/<image_k>.png. With s(c, i) the
image-text score, the paper's metrics over the 400 examples are

  text score   s(c0, i0) > s(c1, i0) and s(c1, i1) > s(c0, i1)  (each image picks its caption)
  image score  s(c0, i0) > s(c0, i1) and s(c1, i1) > s(c1, i0)  (each caption picks its image)
  group score  both.

Metrics `winoground/{text,image,group}`, and per `collapsed_tag` (Object, Relation, Both)
`winoground/<tag>/{text,image,group}` when the field is present.
"""
import numpy as np

from mmcl import fs
from mmcl.evaluate import local_files
from mmcl.evaluate.predict import Predictor

_FIELDS = ('image_0', 'image_1', 'caption_0', 'caption_1')


def winoground_scores(s_Nx2x2: np.ndarray) -> dict[str, np.ndarray]:
  """Booleans [N] per metric from s[n, c, i] = score of caption c with image i."""
  text = (s_Nx2x2[:, 0, 0] > s_Nx2x2[:, 1, 0]) & (s_Nx2x2[:, 1, 1] > s_Nx2x2[:, 0, 1])
  image = (s_Nx2x2[:, 0, 0] > s_Nx2x2[:, 0, 1]) & (s_Nx2x2[:, 1, 1] > s_Nx2x2[:, 1, 0])
  return {'text': text, 'image': image, 'group': text & image}


class WinogroundEvaluator(local_files.LocalBenchmark):
  """Text, image and group scores; `root` holds examples.jsonl and images/<name>.png."""

  def __init__(self, predictor: Predictor, *, root: str, image_ext: str = 'png', **kw):
    super().__init__(predictor, **kw)
    self.examples = local_files.read_jsonl(fs.join(root, 'examples.jsonl'), 'Winoground')
    if not self.examples:
      raise ValueError(f'Winoground: {root}/examples.jsonl holds no examples.')
    for i, ex in enumerate(self.examples):
      local_files.require(ex, _FIELDS, 'Winoground examples.jsonl', f'on line {i + 1}')
    self.paths = [fs.join(root, 'images', f'{ex[f"image_{k}"]}.{image_ext}')
                  for ex in self.examples for k in (0, 1)]

  def run(self, params) -> dict[str, float]:
    zimg, img_row = self.embed_images(params, self.paths)
    ztxt, txt_row = self.embed_texts(
        params, [ex[f'caption_{k}'] for ex in self.examples for k in (0, 1)])
    zimg_Nx2xD, ztxt_Nx2xD = zimg[img_row.reshape(-1, 2)], ztxt[txt_row.reshape(-1, 2)]
    hits = winoground_scores(np.einsum('ncd,nid->nci', ztxt_Nx2xD, zimg_Nx2xD))
    metrics = {f'winoground/{k}': float(np.mean(v)) for k, v in hits.items()}
    tags = np.array([str(ex.get('collapsed_tag')) for ex in self.examples])
    if all('collapsed_tag' in ex for ex in self.examples):
      for tag in sorted(set(tags)):
        metrics.update({f'winoground/{tag}/{k}': float(np.mean(v[tags == tag]))
                        for k, v in hits.items()})
    return metrics
