"""Starting a run from existing weights (`config.model_init`): fine-tuning, LiT.

The weights are a `.npz` written by tools/convert.py (open_clip / big_vision imports) or an
mmcl checkpoint step directory (`<workdir>/ckpt/<step>`). Every parameter of the model comes
from the file, except those matching a `config.model_init_dont_load` regex, which keep their
fresh initialisation (e.g. a new projection head). Anything else that does not match, by
name or shape, is an error that lists it: a silent partial load is the worst outcome.

One shape mismatch is not an error: an image position embedding trained at another resolution
or patch grid is resampled to the model's grid (bilinear, as big_vision's `resample_posemb`;
mmcl/models/posemb.py) and the run says so. One that cannot be resampled (a text position
embedding of another length, another width, a grid that is not square) is an error that says why.
"""
import re
from collections.abc import Sequence

import jax
import numpy as np
from absl import logging

from mmcl import tree
from mmcl.convert import io
from mmcl.models import posemb
from mmcl.models import transformer


def merge(fresh, loaded, dont_load: Sequence[str] = (), source: str = 'model_init',
          resample: str = 'bilinear'):
  """`fresh`'s tree with each leaf taken from `loaded`, except names matching `dont_load`.

  An image position embedding of another grid is resampled with `resample` (posemb.METHODS).

  `fresh` may be abstract (shapes only) for the leaves that are loaded; `loaded` is converted
  between the per-layer and the scanned (`model.scan`) block layouts as the model needs.
  """
  want = tree.flatten(fresh)
  if any('/encoderblock/' in k for k in want):
    loaded = transformer.stack_blocks(loaded)
  else:
    loaded = transformer.unstack_blocks(loaded)
  got = dict(tree.flatten(loaded))
  reasons = []  # Why a position embedding of another size was not resampled.
  for k in sorted(set(got) & set(want)):
    old = tuple(got[k].shape)
    if k in posemb.IMAGE_POSEMB + posemb.TEXT_POSEMB and old != tuple(want[k].shape):
      try:
        got[k] = posemb.fit_to(k, got[k], want[k].shape, resample)
        logging.warning('%s: %s resampled from %s to %s (%s).', source, k, old,
                        tuple(want[k].shape), resample)
      except ValueError as e:
        reasons.append(str(e))
  patterns = [re.compile(p) for p in dont_load]
  keep = {k for k in want if any(p.fullmatch(k) for p in patterns)}
  missing, unused, shapes = tree.diff_shapes(
      {k: v.shape for k, v in got.items()},
      {k: v.shape for k, v in want.items() if k not in keep})
  if missing or shapes:
    why = f' Why: {" ".join(reasons)}' if reasons else ''
    raise ValueError(
        f'{source} does not fit the model: missing [{tree.name_list(missing)}]; shape '
        f'mismatches [{tree.name_list(shapes)}].{why} Keep such parameters freshly initialised '
        'with config.model_init_dont_load (regexes over names like "img/head/kernel").')
  unused = [k for k in unused if k not in keep]  # Kept params may also be in the file.
  if unused:
    logging.warning('%s: %d tensor(s) not used by the model: %s', source, len(unused),
                    ', '.join(unused[:20]))
  return tree.unflatten({k: want[k] if k in keep else np.asarray(got[k], want[k].dtype)
                       for k in want})


def place(tree, shardings):
  """Host arrays -> global jax.Arrays with `shardings`; each process supplies its shards."""
  return jax.tree.map(
      lambda x, s: x if isinstance(x, jax.Array) else
      jax.make_array_from_callback(x.shape, s, lambda idx, x=x: x[idx]), tree, shardings)


def load(path: str, fresh_params, shardings, dont_load: Sequence[str] = ()):
  """The params of a run that starts from `path` (see the module docstring); the ones kept
  from `fresh_params` (global arrays) stay where they are."""
  merged = merge(fresh_params, io.load_params(path), dont_load, source=f'model_init {path!r}')
  return place(merged, shardings)
