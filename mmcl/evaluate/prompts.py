"""Class names, prompt templates and text normalisation for zero-shot classification.

Named data ship with the package (mmcl/evaluate/classnames/*.txt, one entry a line):
  classnames 'imagenet'   the 1,000 ImageNet-1k names as curated for CLIP (OpenAI's list,
                          index = ImageNet label; kept as published, with its two repeated
                          names: 'missile' at 657/744 and 'sunglasses' at 836/837).
  classnames 'cifar10', 'cifar100', 'oxford_iiit_pet': CLIP's names for these datasets
                          (CLIP's data/prompts.md), in TFDS label order.
  classnames 'tfds'       the names of the dataset's ClassLabel feature, '_' -> ' '.
  prompts 'clip80'        the 80 ImageNet templates of the CLIP paper.
  prompts 'clip7'         CLIP's 7-template subset (Prompt_Engineering_for_ImageNet.ipynb).
  prompts 'clip_cifar'    CLIP's 18 CIFAR-10/100 templates; 'clip_pets' its Oxford pets one.
  prompts 'classname'     the bare class name.
  class subset 'imagenet_a' / 'imagenet_r': the 200 ImageNet indices of each benchmark.
  The zero-shot suite (mmcl/evaluate/suite.py) adds, per dataset, classnames '<file stem>'
  and prompts 'clip_<key>' (files clip_templates_<key>.txt): CLIP_benchmark's English names
  and templates (clip_benchmark/datasets/en_classnames.json and
  en_zeroshot_classification_templates.json, themselves CLIP's data/prompts.md), in TFDS
  label order; where CLIP_benchmark takes the names from the dataset, they are TFDS's names
  with '_' -> ' ' (SUN397: its '/a/' prefix dropped and '/' -> ' ').
A classnames or prompts spec may also be an explicit list, and classnames a path to a text
file of your own (one name a line, line i = class index i), as a file source needs.
"""
from collections.abc import Sequence
import functools
import os
import string

_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'classnames')
_PROMPT_FILES = {'clip80': 'clip_templates_80.txt', 'clip7': 'clip_templates_7.txt',
                 'clip_cifar': 'clip_templates_cifar.txt', 'clip_pets': 'clip_templates_pets.txt'}
_CLASSNAME_FILES = {'imagenet': 'imagenet.txt', 'cifar10': 'cifar10.txt',
                    'cifar100': 'cifar100.txt', 'oxford_iiit_pet': 'oxford_iiit_pet.txt'}
_SUITE_PROMPTS = ('caltech101', 'cars', 'clevr_count', 'clevr_distance', 'diabetic_retinopathy',
                  'dmlab', 'dtd', 'eurosat', 'flowers', 'food101', 'kitti_distance', 'mnist',
                  'pcam', 'resisc45', 'smallnorb', 'stl10', 'sun397', 'svhn')
_SUITE_CLASSNAMES = ('caltech101', 'cars196', 'clevr_count', 'clevr_distance',
                     'diabetic_retinopathy', 'dmlab', 'dtd', 'eurosat', 'food101',
                     'kitti_distance', 'mnist', 'oxford_flowers102', 'patch_camelyon',
                     'resisc45', 'smallnorb_azimuth', 'smallnorb_elevation', 'stl10', 'sun397',
                     'svhn')
_PROMPT_FILES.update({f'clip_{k}': f'clip_templates_{k}.txt' for k in _SUITE_PROMPTS})
_CLASSNAME_FILES.update({k: f'{k}.txt' for k in _SUITE_CLASSNAMES})
_SUBSET_FILES = {'imagenet_a': 'imagenet_a_indices.txt', 'imagenet_r': 'imagenet_r_indices.txt'}


@functools.cache
def _lines(filename: str) -> tuple[str, ...]:
  # Blank lines inside a file are entries (CLEVR distance's fourth class name is '').
  with open(os.path.join(_DIR, filename), encoding='utf-8') as f:
    return tuple(f.read().rstrip('\n').split('\n'))


def _shape_sets():
  from mmcl.data import shapes  # Lazy: only runs that evaluate on mmcl_shapes pay for it.
  return {f'mmcl_shapes/{task}': tuple(p) for task, p in shapes.PROMPTS.items()}


def prompt_set_names() -> list[str]:
  return sorted(['classname', *_PROMPT_FILES])


def templates(spec: str | Sequence[str]) -> tuple[str, ...]:
  if not isinstance(spec, str):
    out = tuple(spec)
  elif spec == 'classname':
    out = ('{}',)
  elif spec in _PROMPT_FILES:
    out = _lines(_PROMPT_FILES[spec])
  else:
    shape_sets = _shape_sets() if spec.startswith('mmcl_shapes/') else {}
    if spec not in shape_sets:
      raise ValueError(f'Unknown prompt set {spec!r}; valid: {prompt_set_names()}, '
                       f'{sorted(shape_sets) or "mmcl_shapes/<task>"} '
                       '(or a list of templates with one {}).')
    out = shape_sets[spec]
  for t in out:
    if t.count('{}') != 1:
      raise ValueError(f'Prompt template {t!r} must contain exactly one {{}}.')
  return out


def classnames_file(path: str) -> tuple[str, ...]:
  """The class names of a text file, one a line (blank lines skipped; local or gs://)."""
  from mmcl import fs  # pylint: disable=g-import-not-at-top
  names = tuple(line.strip() for line in fs.read_text(path).splitlines() if line.strip())
  if not names:
    raise ValueError(f'Class names file {path!r} holds no name (one name a line).')
  return names


def classnames(spec, builder, label_key: str) -> tuple[str, ...]:
  """Class names from `spec`: a list, a shipped name, 'tfds' (the builder's ClassLabel
  names; no builder for a file source) or a path to a file with one name a line."""
  if not isinstance(spec, str):
    return tuple(spec)
  if spec in _CLASSNAME_FILES:
    return _lines(_CLASSNAME_FILES[spec])
  if spec != 'tfds':
    from mmcl import fs  # pylint: disable=g-import-not-at-top
    if fs.exists(spec):
      return classnames_file(spec)
    raise ValueError(f'Unknown classnames source {spec!r} (and no such file); valid: '
                     f"{['tfds', *_CLASSNAME_FILES]}, a list of names, or a path to a file "
                     'with one name a line.')
  if builder is None:
    raise ValueError("classnames='tfds' needs a TFDS dataset; a file source has no class "
                     'metadata: give classnames (a path to a file with one name a line, '
                     'line i = label i, or a list of names).')
  features = builder.info.features
  feature = features[label_key] if label_key in features else None
  feature = getattr(feature, 'feature', feature)  # Sequence(ClassLabel) for multi-label sets.
  if not hasattr(feature, 'names'):
    raise ValueError(f'{builder.name} has no ClassLabel feature {label_key!r}; '
                     f'features: {sorted(features)}')
  names = tuple(n.replace('_', ' ') for n in feature.names)
  if names == tuple(map(str, range(len(names)))):  # ClassLabel(num_classes=...) alone.
    raise ValueError(f'{builder.name} has no class names in its metadata (only 0..'
                     f'{len(names) - 1}); is it prepared in data_dir? Or give `classnames`.')
  return names


def class_subset(spec) -> tuple[int, ...] | None:
  """Indices (into the full class list) a benchmark scores over; None (or []) = all classes."""
  if not spec:
    return None
  if not isinstance(spec, str):
    return tuple(int(i) for i in spec)
  if spec not in _SUBSET_FILES:
    raise ValueError(f'Unknown class subset {spec!r}; valid: {sorted(_SUBSET_FILES)} or a '
                     'list of class indices.')
  return tuple(int(i) for i in _lines(_SUBSET_FILES[spec]))


_PUNCT = str.maketrans('', '', string.punctuation)


def normalize(text: str, lowercase: bool = False, strip_punctuation: bool = False) -> str:
  """The text protocol of a zero-shot run: optional lowercasing and ASCII punctuation removal.

  Both default off (CLIP's protocol: prompts are embedded as written, e.g. 'a photo of a
  {}.' with the class name's case). Punctuation removal collapses the spaces it leaves.
  """
  if lowercase:
    text = text.lower()
  if strip_punctuation:
    text = ' '.join(text.translate(_PUNCT).split())
  return text
