"""Zero-shot classification: class names x prompt templates -> text classifiers.

For each class, every prompt template is filled with the class name, normalised (the
config's lowercasing / punctuation choice), embedded, and the L2-normalised embeddings are
averaged and re-normalised (CLIP's prompt ensembling). A classifier is computed once per
checkpoint (memoised on the Predictor) and shared by every dataset with the same class names
and templates, so ImageNet, -V2, -ReaL, -Sketch, -A and -R cost one text pass; -A and -R
score over their 200-class subset of the 1,000 ImageNet rows.

`datasets` is a list of TFDS names (protocol from `DATASETS`, else `DEFAULT_PROTOCOL`) or of
dicts overriding fields: dataset, name (metric name), split, pp_img, label_key, classnames,
prompts, class_subset, multilabel, where, tasks, metric, pp_label, csv. A dataset may be a
labelled file source ('csv:/data/test.csv' with a `label_key` column, 'wds:/data/test-*.tar'
with `.cls` or a `.json` key; see mmcl/data/sources.py), read with the `csv` options, whose
class names come from `classnames` (a file, one name a line, or a list). Metrics:
`zeroshot/<name>/top1|top5`, plus `.../mean_per_class_recall` where a dataset's `metric` is
that (CLIP's protocol for e.g. pets and flowers); a dataset with several label `tasks` (the
synthetic shapes) reports `zeroshot/<name>/<task>/...`. `pp_label` is a pp string run after
`pp_img` that derives the label (e.g. CLEVR's object count, mmcl/data/pp_keys.py). With
`summary=S` the evaluator also reports `zeroshot/S/mean`, the mean over its datasets of each
one's `metric` (DataComp's summary of a suite, mmcl/evaluate/suite.py). With
`naflex=dict(patch_size=P, budgets=(L1, L2))` the same images are evaluated as NaFlex patches
at each budget (mmcl/data/pp_naflex.py; one compiled embedding per budget), named
`zeroshot/<name>/budget<L>/...` (docs/resolution.md).
"""
from collections.abc import Sequence

import numpy as np

from mmcl.data import input_pipeline, pp_naflex, sources, tokenizers
from mmcl.evaluate import prompts as prompts_lib
from mmcl.evaluate import predict
from mmcl.evaluate.predict import Predictor, l2_normalize

_IMAGENET = dict(label_key='label', classnames='imagenet', prompts='clip80')
# Per-dataset protocol: the evaluation split, label feature, class names and subsets.
DATASETS = {
    'imagenet2012': dict(_IMAGENET, split='validation'),
    'imagenet_v2': dict(_IMAGENET, split='test'),
    # ReaL: "any correct" over the re-assessed label set; images with an empty set are skipped.
    'imagenet2012_real': dict(_IMAGENET, split='validation', label_key='real_label',
                              multilabel=True),
    'imagenet_a': dict(_IMAGENET, split='test', class_subset='imagenet_a'),
    'imagenet_r': dict(_IMAGENET, split='test', class_subset='imagenet_r'),
    'imagenet_sketch': dict(_IMAGENET, split='test'),
    # CLIP's own names and templates for these (its data/prompts.md).
    'cifar10': dict(split='test', label_key='label', classnames='cifar10', prompts='clip_cifar'),
    'cifar100': dict(split='test', label_key='label', classnames='cifar100',
                     prompts='clip_cifar'),
    'oxford_iiit_pet': dict(split='test', label_key='label', classnames='oxford_iiit_pet',
                            prompts='clip_pets'),
}
DEFAULT_PROTOCOL = dict(split='test', label_key='label', classnames='tfds', prompts='classname')
_TASK_FIELDS = ('label_key', 'classnames', 'prompts', 'class_subset', 'multilabel', 'where',
                'metric')
_DATASET_FIELDS = ('dataset', 'name', 'split', 'pp_img', 'pp_label', 'tasks',
                   'csv') + _TASK_FIELDS
METRICS = ('top1', 'mean_per_class_recall')  # The choices of a task's main `metric`.
_CHUNK = 4096  # Image rows scored at once: 4096 x 1000 logits.


def class_embeddings(predictor: Predictor, params, classnames: Sequence[str],
                     templates: Sequence[str], tokenizer, text_len: int,
                     lowercase: bool = False, strip_punctuation: bool = False,
                     classes_per_pass: int = 128) -> np.ndarray:
  """[C, D] zero-shot classifier: mean of normalised prompt embeddings per class.

  Classes go through the text tower a block at a time, so 1000 x 80 prompt embeddings
  never sit in host memory at once.
  """
  out = []
  for s in range(0, len(classnames), classes_per_pass):
    names = classnames[s:s + classes_per_pass]
    texts = [prompts_lib.normalize(t.format(c), lowercase, strip_punctuation)
             for c in names for t in templates]
    z = predictor.texts(params, tokenizer.tokenize(texts, text_len))
    out.append(l2_normalize(z).reshape(len(names), len(templates), -1).mean(axis=1))
  return l2_normalize(np.concatenate(out))


def topk_hits(logits_NxC: np.ndarray, labels, k: int, multilabel: bool = False) -> np.ndarray:
  """Boolean [N]: the label (or, multi-label, any label of the set) is among the top k."""
  if not multilabel:
    return predict.topk_correct(logits_NxC, np.asarray(labels), k)
  k = min(k, logits_NxC.shape[1])
  topk_Nxk = np.argpartition(-logits_NxC, k - 1, axis=1)[:, :k]
  return np.array([np.isin(t, s).any() for t, s in zip(topk_Nxk, labels)], bool)


def _labels_in_subset(labels, subset, multilabel, name):
  """Maps full-class labels to positions in `subset` (multi-label: drops the others)."""
  if subset is None:
    return labels if multilabel else np.asarray(labels, np.int64)
  pos = np.full(max(max(subset), *(np.max(l, initial=0) for l in labels)) + 1, -1)
  pos[list(subset)] = np.arange(len(subset))
  if multilabel:
    mapped = [pos[np.asarray(s, np.int64)] for s in labels]
    return [m[m >= 0] for m in mapped]
  mapped = pos[np.asarray(labels, np.int64)]
  if (mapped < 0).any():
    bad = sorted(set(np.asarray(labels)[mapped < 0].tolist()))[:10]
    raise ValueError(f'{name}: labels {bad} are outside its class subset of {len(subset)} '
                     'classes; wrong class_subset or label_key?')
  return mapped


class ZeroShotEvaluator:
  """Top-1/top-5 zero-shot accuracy over one or more datasets (and label tasks)."""

  def __init__(self, predictor: Predictor, *, tokenizer: str, text_len: int, pp_img: str,
               datasets: Sequence | None = None, dataset: str | None = None,
               split: str | None = None, tasks: dict | None = None, prompts=None,
               lowercase: bool = False, strip_punctuation: bool = False, data_dir=None,
               batch_size: int = 256, name: str | None = None, csv: dict | None = None,
               classnames=None, label_key: str | None = None, summary: str | None = None,
               naflex: dict | None = None):
    if (datasets is None) == (dataset is None):
      raise ValueError('Zero-shot evaluator needs exactly one of `datasets` (a list) or '
                       f'`dataset` (one name); got datasets={datasets!r}, dataset={dataset!r}.')
    if datasets is not None and (classnames, label_key) != (None, None):
      raise ValueError('Zero-shot `classnames` and `label_key` go with an inline `dataset`; '
                       'with `datasets`, set them in each entry (a dict).')
    if dataset is not None:  # One dataset given inline, the synthetic shapes' form.
      datasets = [dict(dataset=dataset, split=split, tasks=tasks, name=name,
                       classnames=classnames, label_key=label_key)]
    self.predictor = predictor
    self.tokenizer, self.tokenizer_name = tokenizers.get_tokenizer(tokenizer), tokenizer
    self.text_len, self.batch_size = text_len, batch_size
    self.lowercase, self.strip_punctuation = lowercase, strip_punctuation
    self.sources = [self._source(d, pp_img, prompts, data_dir, csv, budget)
                    for budget in naflex_budgets(naflex) for d in datasets]
    self.summary = summary
    self.name = self.sources[0]['name']
    self.tasks = self.sources[0]['tasks']

  def _source(self, entry, pp_img, prompts, data_dir, csv, budget=None) -> dict:
    """One dataset's stream and tasks; with a NaFlex `budget` = (patch size, L) its images
    are patchified at L tokens and its metrics named zeroshot/<name>/budget<L>/..."""
    entry = {'dataset': entry} if isinstance(entry, str) else dict(entry)
    unknown = set(entry) - set(_DATASET_FIELDS)
    if unknown:
      raise ValueError(f'Unknown zero-shot dataset fields {sorted(unknown)} in {entry}; '
                       f'valid: {list(_DATASET_FIELDS)}.')
    dataset = entry.pop('dataset')
    is_file = sources.is_file_source(dataset)
    base = sources.short_name(dataset) if is_file else dataset.split('/')[0].split(':')[0]
    protocol = DEFAULT_PROTOCOL if is_file else DATASETS.get(base, DEFAULT_PROTOCOL)
    spec = {**protocol, 'pp_img': pp_img, 'name': base,
            **({'prompts': prompts} if prompts is not None else {}), 'csv': csv,
            **{k: v for k, v in entry.items() if v is not None}}
    builder = None if is_file else input_pipeline.get_builder(dataset, data_dir)
    tasks = spec.pop('tasks', None)
    tasks = ({t: dict(v) for t, v in tasks.items()} if tasks else
             {None: {k: spec[k] for k in _TASK_FIELDS if k in spec}})
    keys = {'image'}
    for task, t in tasks.items():
      unknown = set(t) - set(_TASK_FIELDS)
      if unknown:
        raise ValueError(f'Unknown zero-shot task fields {sorted(unknown)} in task {task!r}; '
                         f'valid: {", ".join(map(repr, _TASK_FIELDS))}.')
      t.setdefault('prompts', spec['prompts'] if task is None else prompts or 'classname')
      t['classnames'] = prompts_lib.classnames(t.get('classnames', 'tfds'), builder,
                                               t['label_key'])
      t['prompts'] = prompts_lib.templates(t['prompts'])
      t['class_subset'] = prompts_lib.class_subset(t.get('class_subset'))
      if t['class_subset'] and max(t['class_subset']) >= len(t['classnames']):
        raise ValueError(f'class_subset of {dataset} indexes past its '
                         f'{len(t["classnames"])} class names.')
      t['prefix'] = (f'zeroshot/{spec["name"]}' + (f'/budget{budget[1]}' if budget else '') +
                     (f'/{task}' if task else ''))
      t.setdefault('metric', 'top1')
      if t['metric'] not in METRICS or (t['metric'] != 'top1' and t.get('multilabel')):
        raise ValueError(f'{t["prefix"]}: metric {t["metric"]!r} is not one of {METRICS} '
                         '(mean_per_class_recall needs single labels).')
      keys |= {t['label_key'], *t.get('where', {})}
    options = None
    if is_file:  # One label column (or .cls / .json key), no captions needed.
      label_keys = sorted({t['label_key'] for t in tasks.values()})
      if len(label_keys) != 1:
        raise ValueError(f'{dataset}: a file source reads one label column; its tasks ask '
                         f'for {label_keys}.')
      options = {**(spec['csv'] or {}), 'label_key': label_keys[0], 'captions': False}
    keep = ', '.join(f'"{k}"' for k in sorted(keys))
    pp_label = f'|{spec["pp_label"]}' if spec.get('pp_label') else ''
    naflex_pp = pp_naflex.pp_suffix(*budget) if budget else ''
    ds = predict.eval_dataset(dataset, spec['split'],
                              f'{spec["pp_img"]}{pp_label}|keep({keep}){naflex_pp}',
                              self.batch_size, data_dir, options)
    return dict(name=spec['name'], ds=ds, tasks=tasks)

  def run(self, params) -> dict[str, float]:
    metrics, main = {}, []
    for src in self.sources:
      zimg, features = predict.embed_dataset(self.predictor, params, src['ds'], self.batch_size)
      for task, t in src['tasks'].items():
        # Shared by every dataset (and evaluator on this Predictor) with the same classes,
        # prompts and text protocol, for as long as the parameters stay the same.
        key = ('zeroshot', t['classnames'], t['prompts'], self.tokenizer_name, self.text_len,
               self.lowercase, self.strip_punctuation)
        classifier = self.predictor.memo(params, key, lambda t=t: class_embeddings(
            self.predictor, params, t['classnames'], t['prompts'], self.tokenizer,
            self.text_len, self.lowercase, self.strip_punctuation))
        counts = predict.host_sum(self._count_hits(zimg, features, t, classifier))
        if counts[2] == 0:
          raise ValueError(f'Zero-shot task {task or src["name"]!r} of {src["name"]!r} '
                           f'selects no image (where={t.get("where")}).')
        metrics[f'{t["prefix"]}/top1'] = float(counts[0] / counts[2])
        metrics[f'{t["prefix"]}/top5'] = float(counts[1] / counts[2])
        if t['metric'] == 'mean_per_class_recall':
          metrics[f'{t["prefix"]}/mean_per_class_recall'] = mean_per_class_recall(
              *counts[3:].reshape(2, -1))
        main.append(metrics[f'{t["prefix"]}/{t["metric"]}'])
    if self.summary:
      metrics[f'zeroshot/{self.summary}/mean'] = float(np.mean(main))
    return metrics

  def _count_hits(self, zimg_NxD, features, t, classifier_CxD) -> np.ndarray:
    """[top-1 hits, top-5 hits, images scored, top-1 hits of each class (C), images of each
    class (C)] on this process's share (per class: zeros for multi-label tasks)."""
    keep = np.ones(len(zimg_NxD), bool)
    for key, allowed in t.get('where', {}).items():
      keep &= np.isin(np.asarray(features[key]), np.atleast_1d(allowed))
    multilabel = t.get('multilabel', False)
    labels = [l for l, k in zip(features.get(t['label_key'], []), keep) if k]
    subset = t['class_subset']
    labels = _labels_in_subset(labels, subset, multilabel, t['prefix'])
    zimg_NxD = zimg_NxD[keep]
    if multilabel:  # ReaL protocol: images without any valid label are not scored.
      has = np.array([len(s) > 0 for s in labels], bool)
      zimg_NxD, labels = zimg_NxD[has], [s for s, h in zip(labels, has) if h]
    if subset is not None:
      classifier_CxD = classifier_CxD[list(subset)]
    if not multilabel and len(labels) and labels.max() >= len(classifier_CxD):
      raise ValueError(f'{t["prefix"]}: label {labels.max()} is past its '
                       f'{len(classifier_CxD)} class names; wrong classnames or label_key?')
    num_classes = len(classifier_CxD)
    hits, per_class = np.zeros(3, np.int64), np.zeros((2, num_classes), np.int64)
    for s in range(0, len(zimg_NxD), _CHUNK):
      logits = zimg_NxD[s:s + _CHUNK] @ classifier_CxD.T
      lab = labels[s:s + _CHUNK]
      top1 = topk_hits(logits, lab, 1, multilabel)
      hits += [top1.sum(), topk_hits(logits, lab, 5, multilabel).sum(), len(logits)]
      if not multilabel:
        per_class += [np.bincount(lab[top1], minlength=num_classes)[:num_classes],
                      np.bincount(lab, minlength=num_classes)[:num_classes]]
    return np.concatenate([hits, per_class.ravel()])


def naflex_budgets(naflex: dict | None) -> list:
  """[(patch size, budget), ...] of the evaluator's `naflex` dict(patch_size, budgets), or
  [None] (plain images) without one."""
  if not naflex:
    return [None]
  naflex = dict(naflex)
  unknown = set(naflex) - {'patch_size', 'budgets'}
  p, budgets = naflex.get('patch_size'), tuple(naflex.get('budgets') or ())
  ok = lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0
  if unknown or not ok(p) or not budgets or not all(map(ok, budgets)):
    raise ValueError(f'Zero-shot naflex={naflex} must be dict(patch_size=P, budgets=(L1, ...)) '
                     'with positive ints: the image tower\'s patch size and the token budgets.')
  return [(p, b) for b in budgets]


def mean_per_class_recall(hits_C, counts_C) -> float:
  """Mean over the classes that have images of (top-1 hits / images) (sklearn's
  balanced_accuracy_score, CLIP's metric for e.g. pets and flowers)."""
  hits_C, counts_C = np.asarray(hits_C), np.asarray(counts_C)
  has = counts_C > 0
  return float(np.mean(hits_C[has] / counts_C[has]))
