"""ARO (Yuksekgonul et al., ICLR 2023, "When and why vision-language models behave like
bags-of-words"): relations, attributes and word order.

Released files (github.com/mertyg/vision-language-models-are-bows, dataset_zoo/):
  vg_relation     <root>/visual_genome_relation.json: a list of {image_path, bbox_x, bbox_y,
                  bbox_w, bbox_h, true_caption, false_caption, relation_name}; images in
                  <root>/images/ (their vgr_vga_images.zip). The image is cropped to the box.
  vg_attribution  <root>/visual_genome_attribution.json: the same with `attributes` (a pair).
  coco_order      <coco_root>/coco_karpathy_test.json: a list of {image, caption: [...]}
                  (BLIP's Karpathy test split), `image` relative to coco_root (val2014/...).
  flickr30k_order <flickr_root>/flickr30k_test.json, `image` as flickr30k-images/<id>.jpg.

Metrics, as ARO's code computes them:
  VG-Relation: an item is correct when the crop scores the true caption strictly above the
    false one. `acc` over all items; `macro_acc` (the paper's number) is the mean of the
    per-relation accuracies over the relations not in ARO's exclusion list (its notebook's
    `symmetric` list, mmcl/evaluate/classnames/aro_vg_relation_excluded.txt).
  VG-Attribution: the same; `macro_acc` over attribute pairs with >= 25 items.
  Order: every caption of every image against perturbations of its own words; correct when
    the true caption scores at least as high as each perturbation (ARO's argmax with the true
    caption first). Captions and perturbations are normalised like ARO's `pre_caption`
    (lowercase, .!"()*#:;~ to spaces, at most 30 words).

Of ARO's four perturbations, `shuffle_within_trigrams` and `shuffle_trigrams` need only
tokens (here a regex word/punctuation split approximating nltk.word_tokenize); the other two,
`shuffle_nouns_and_adj` and `shuffle_allbut_nouns_and_adj`, need spaCy's POS tagger, which
mmcl does not ship. With two perturbations chance is 1/3, not the paper's 1/5, so order
numbers are not comparable with the paper's.
"""
from collections.abc import Sequence
import functools
import os
import re

import numpy as np

from mmcl import fs
from mmcl.evaluate import local_files
from mmcl.evaluate.predict import Predictor

TASKS = {'vg_relation': 'visual_genome_relation.json',
         'vg_attribution': 'visual_genome_attribution.json',
         'coco_order': 'coco_karpathy_test.json', 'flickr30k_order': 'flickr30k_test.json'}
NEEDS_POS_TAGGER = ('shuffle_nouns_and_adj', 'shuffle_allbut_nouns_and_adj')
_VG_FIELDS = ('image_path', 'bbox_x', 'bbox_y', 'bbox_w', 'bbox_h', 'true_caption',
              'false_caption')
_EXCLUDED = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'classnames',
                         'aro_vg_relation_excluded.txt')
_TOKEN = re.compile(r"\w+|[^\w\s]")
_PRE_CAPTION_PUNCT = re.compile(r'[.!"()*#:;~]')


@functools.cache
def excluded_relations() -> frozenset[str]:
  with open(_EXCLUDED, encoding='utf-8') as f:
    return frozenset(line.strip() for line in f if line.strip())


def pre_caption(caption: str, max_words: int = 30) -> str:
  """ARO's (BLIP's) caption normalisation."""
  words = _PRE_CAPTION_PUNCT.sub(' ', caption.lower()).split()
  return ' '.join(words[:max_words])


def _trigrams(caption: str) -> list[list[str]]:
  tokens = _TOKEN.findall(caption)
  return [tokens[i:i + 3] for i in range(0, len(tokens), 3)]


def shuffle_trigrams(caption: str, rng: np.random.Generator) -> str:
  """The caption's consecutive word trigrams in a random order."""
  tri = _trigrams(caption)
  return ' '.join(' '.join(tri[i]) for i in rng.permutation(len(tri)))


def shuffle_within_trigrams(caption: str, rng: np.random.Generator) -> str:
  """Each trigram's words in a random order, the trigrams in place."""
  return ' '.join(' '.join(t[i] for i in rng.permutation(len(t))) for t in _trigrams(caption))


PERTURBATIONS = {'shuffle_within_trigrams': shuffle_within_trigrams,
                 'shuffle_trigrams': shuffle_trigrams}


def group_accuracy(correct_N, groups_N, keep=lambda group, count: True) -> float | None:
  """Mean over the kept groups of each group's accuracy (None when no group is kept)."""
  correct_N, groups_N = np.asarray(correct_N), np.asarray(groups_N)
  accs = [correct_N[groups_N == g].mean() for g in np.unique(groups_N)
          if keep(g, int(np.sum(groups_N == g)))]
  return float(np.mean(accs)) if accs else None


class AroEvaluator(local_files.LocalBenchmark):
  """ARO's VG-Relation, VG-Attribution and COCO/Flickr30k order tasks."""

  def __init__(self, predictor: Predictor, *, root: str, tasks: Sequence[str] = tuple(TASKS),
               coco_root: str | None = None, flickr_root: str | None = None,
               perturbations: Sequence[str] = tuple(PERTURBATIONS), seed: int = 0,
               max_words: int = 30, min_attribute_count: int = 25, **kw):
    super().__init__(predictor, **kw)
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    perturbations = [perturbations] if isinstance(perturbations, str) else list(perturbations)
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown or not tasks:
      raise ValueError(f'Unknown ARO tasks {unknown or list(tasks)}; valid: {list(TASKS)}.')
    for p in perturbations:
      if p in NEEDS_POS_TAGGER:
        raise ValueError(f'ARO perturbation {p!r} needs a POS tagger (ARO uses spaCy), which '
                         f'mmcl does not ship; valid: {list(PERTURBATIONS)}.')
      if p not in PERTURBATIONS:
        raise ValueError(f'Unknown ARO perturbation {p!r}; valid: {list(PERTURBATIONS)}.')
    if not perturbations and any(t.endswith('_order') for t in tasks):
      raise ValueError(f'ARO order tasks need perturbations; valid: {list(PERTURBATIONS)}.')
    self.min_attribute_count = min_attribute_count
    roots = {'coco_order': coco_root or root, 'flickr30k_order': flickr_root or root}
    self.tasks = {}  # task -> dict(paths, texts [[correct first, ...]], boxes, groups).
    for t in tasks:
      path = fs.join(roots.get(t, root), TASKS[t])
      data = local_files.read_json(path, f'ARO {t}')
      if not isinstance(data, list) or not data:
        raise ValueError(f'ARO {t}: expected a non-empty json list in {path}.')
      if t.endswith('_order'):
        rng = np.random.default_rng(seed)
        self.tasks[t] = self._order_task(t, data, roots[t], perturbations, rng, max_words)
      else:
        self.tasks[t] = self._vg_task(t, data, root)

  @staticmethod
  def _vg_task(task, data, root) -> dict:
    group_key = 'relation_name' if task == 'vg_relation' else 'attributes'
    for i, d in enumerate(data):
      local_files.require(d, _VG_FIELDS + (group_key,), f'ARO {task}', i)
    groups = [d[group_key] if task == 'vg_relation' else '_'.join(map(str, d[group_key][:2]))
              for d in data]
    return dict(paths=[fs.join(root, 'images', d['image_path']) for d in data],
                texts=[[d['true_caption'], d['false_caption']] for d in data],
                boxes=np.array([[d[f'bbox_{k}'] for k in 'xywh'] for d in data], np.float32),
                groups=groups)

  @staticmethod
  def _order_task(task, data, root, perturbations, rng, max_words) -> dict:
    paths, texts = [], []
    for i, d in enumerate(data):
      local_files.require(d, ('image', 'caption'), f'ARO {task}', i)
      for c in ([d['caption']] if isinstance(d['caption'], str) else d['caption']):
        paths.append(fs.join(root, d['image']))
        texts.append([pre_caption(c, max_words)] + [
            pre_caption(PERTURBATIONS[p](c, rng), max_words) for p in perturbations])
    return dict(paths=paths, texts=texts, boxes=None, groups=None)

  def run(self, params) -> dict[str, float]:
    metrics = {}
    for t, task in self.tasks.items():
      s_NxK = self.scores(params, task['paths'], task['texts'], task['boxes'])
      if task['groups'] is None:  # Order: ties go to the true caption, as ARO's argmax.
        metrics[f'aro/{t}/acc'] = float(np.mean(s_NxK[:, 0] >= s_NxK[:, 1:].max(axis=1)))
        continue
      correct = s_NxK[:, 0] > s_NxK[:, 1]
      metrics[f'aro/{t}/acc'] = float(np.mean(correct))
      if t == 'vg_relation':
        excluded = excluded_relations()
        macro = group_accuracy(correct, task['groups'], lambda g, n: g not in excluded)
      else:
        macro = group_accuracy(correct, task['groups'],
                               lambda g, n: n >= self.min_attribute_count)
      if macro is not None:
        metrics[f'aro/{t}/macro_acc'] = macro
    return metrics
