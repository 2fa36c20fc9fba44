"""Zero-shot classification: class names x prompt templates -> text classifiers.

For each class, every prompt template is filled with the class name, embedded, and the
L2-normalised embeddings are averaged and re-normalised (CLIP's prompt ensembling).
Images are embedded once per run and scored against each task's classifier; a task may
restrict itself to a subset of the images (`where`: feature -> allowed values).
"""
from collections.abc import Sequence

import numpy as np

from mmcl.data import input_pipeline, tokenizers
from mmcl.evaluate import prompts as prompts_lib
from mmcl.evaluate.predict import Predictor, l2_normalize, topk_correct


def class_embeddings(predictor: Predictor, params, classnames: Sequence[str],
                     templates: Sequence[str], tokenizer, text_len: int,
                     lowercase: bool = False) -> np.ndarray:
  """[C, D] zero-shot classifier: mean of normalised prompt embeddings per class."""
  texts = [t.format(c) for c in classnames for t in templates]
  if lowercase:
    texts = [t.lower() for t in texts]
  z = predictor.texts(params, tokenizer.tokenize(texts, text_len))
  z = l2_normalize(z).reshape(len(classnames), len(templates), -1).mean(axis=1)
  return l2_normalize(z)


class ZeroShotEvaluator:
  """Top-1/top-5 zero-shot accuracy on one dataset, for one or more label tasks."""

  def __init__(self, predictor: Predictor, *, dataset: str, split: str, pp_img: str,
               tasks: dict, tokenizer: str, text_len: int, data_dir=None,
               batch_size: int = 256, lowercase: bool = False, name: str | None = None):
    self.predictor = predictor
    self.name = name or dataset.split('/')[0].split(':')[0]
    self.tasks = {k: dict(v) for k, v in tasks.items()}
    self.tokenizer = tokenizers.get_tokenizer(tokenizer)
    self.text_len = text_len
    self.lowercase = lowercase
    builder = input_pipeline.get_builder(dataset, data_dir)
    keys = {'image'}
    for task, spec in self.tasks.items():
      unknown = set(spec) - {'label_key', 'classnames', 'prompts', 'where'}
      if unknown:
        raise ValueError(f'Unknown zero-shot task fields {sorted(unknown)} in task {task!r}; '
                         "valid: 'label_key', 'classnames', 'prompts', 'where'.")
      spec['classnames'] = prompts_lib.classnames(spec.get('classnames', 'tfds'), builder,
                                                  spec['label_key'])
      spec['prompts'] = prompts_lib.templates(spec.get('prompts', 'classname'))
      keys |= {spec['label_key'], *spec.get('where', {})}
    keep = ', '.join(f'"{k}"' for k in sorted(keys))
    self._ds = input_pipeline.get_dataset(
        name=dataset, split=split, pp=f'{pp_img}|keep({keep})', batch_size=batch_size,
        data_dir=data_dir, train=False)
    self.batch_size = batch_size

  def _embed_dataset(self, params):
    zimg, features = [], {}
    for batch in self._ds.as_numpy_iterator():
      zimg.append(self.predictor.images(params, batch.pop('image'), self.batch_size))
      for k, v in batch.items():
        features.setdefault(k, []).append(v)
    return np.concatenate(zimg), {k: np.concatenate(v) for k, v in features.items()}

  def run(self, params) -> dict[str, float]:
    zimg, features = self._embed_dataset(params)
    metrics = {}
    for task, spec in self.tasks.items():
      keep = np.ones(len(zimg), bool)
      for key, allowed in spec.get('where', {}).items():
        keep &= np.isin(features[key], np.atleast_1d(allowed))
      if not keep.any():
        raise ValueError(f'Zero-shot task {task!r} of {self.name!r} selects no image '
                         f'(where={spec.get("where")}).')
      classifier = class_embeddings(self.predictor, params, spec['classnames'], spec['prompts'],
                                    self.tokenizer, self.text_len, self.lowercase)
      logits = zimg[keep] @ classifier.T
      labels = features[spec['label_key']][keep]
      prefix = f'zeroshot/{self.name}/{task}'
      metrics[f'{prefix}/top1'] = float(topk_correct(logits, labels, 1).mean())
      metrics[f'{prefix}/top5'] = float(topk_correct(logits, labels, 5).mean())
    return metrics
