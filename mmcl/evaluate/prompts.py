"""Class names and prompt templates, as named data sets or explicit lists.

A task's `classnames` is a list of strings or 'tfds' (the names of the dataset's
ClassLabel feature). `prompts` is a list of templates with one '{}' or the name of a set
below.
"""
from collections.abc import Sequence

PROMPT_SETS = {
    'classname': ('{}',),
}


def _shape_sets():
  from mmcl.data import shapes  # Lazy: only runs that evaluate on mmcl_shapes pay for it.
  return {f'mmcl_shapes/{task}': tuple(p) for task, p in shapes.PROMPTS.items()}


def templates(spec: str | Sequence[str]) -> tuple[str, ...]:
  if not isinstance(spec, str):
    out = tuple(spec)
  else:
    sets = {**PROMPT_SETS, **(_shape_sets() if spec.startswith('mmcl_shapes/') else {})}
    if spec not in sets:
      raise ValueError(f'Unknown prompt set {spec!r}; valid: {sorted(sets)} '
                       '(or a list of templates with one {}).')
    out = sets[spec]
  for t in out:
    if t.count('{}') != 1:
      raise ValueError(f'Prompt template {t!r} must contain exactly one {{}}.')
  return out


def classnames(spec, builder, label_key: str) -> tuple[str, ...]:
  if not isinstance(spec, str):
    return tuple(spec)
  if spec != 'tfds':
    raise ValueError(f"Unknown classnames source {spec!r}; valid: 'tfds' or a list of names.")
  features = builder.info.features
  if label_key not in features or not hasattr(features[label_key], 'names'):
    raise ValueError(f'{builder.name} has no ClassLabel feature {label_key!r}; '
                     f'features: {sorted(features)}')
  return tuple(n.replace('_', ' ') for n in features[label_key].names)
