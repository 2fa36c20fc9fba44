"""Reading and writing flat weight files, and nested <-> flat parameter trees.

Nothing here unpickles: `.safetensors` and `.npz` are plain arrays, and a PyTorch `.pt`/`.bin`
goes through `torch.load(weights_only=True)` (torch's restricted unpickler).
"""
import io as _io
from typing import Mapping
import zipfile

import numpy as np

from mmcl import fs
from mmcl.tree import diff_shapes, flatten, unflatten

# Non-tensor entries of OpenAI's original CLIP state dicts (ints that open_clip drops too).
_OPENAI_META = ('input_resolution', 'context_length', 'vocab_size')


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """A flat {name: float32 array} from `.safetensors`, `.npz`, or `.pt`/`.bin` (needs torch)."""
  if not fs.exists(path) or fs.isdir(path):
    raise FileNotFoundError(f'No weight file at {path!r}.')
  if path.endswith('.safetensors'):
    data = fs.path(path).read_bytes()  # Local or remote: safetensors reads from bytes.
    try:
      from safetensors.numpy import load  # pylint: disable=g-import-not-at-top
      sd = load(data)
    except TypeError as e:  # numpy has no bfloat16: go through torch if it is there.
      sd = _torch_safetensors(path, data, e)
  elif path.endswith('.npz'):
    sd = _load_npz(path)
  elif path.endswith(('.pt', '.pth', '.bin')):
    sd = _torch_load(path)
  else:
    raise ValueError(f'Unknown weight file type {path!r}; expected .safetensors, .npz, '
                     '.pt, .pth or .bin.')
  return {k: np.asarray(v, np.float32) for k, v in sd.items() if k not in _OPENAI_META}


def _torch_safetensors(path, data: bytes, err):
  try:
    from safetensors.torch import load  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ValueError(f'{path!r} holds dtypes numpy cannot read (bfloat16?); install torch '
                     'or save it as float32.') from err
  return {k: v.float().numpy() for k, v in load(data).items()}


def _torch_load(path: str) -> dict:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError(
        f'Reading {path!r} needs PyTorch (pip install torch), which is not installed. '
        'Without torch, convert the file to .safetensors where torch is installed: '
        "safetensors.torch.save_file(torch.load(p, weights_only=True), 'model.safetensors').") \
        from None
  try:
    with fs.open(path, 'rb') as f:
      obj = torch.load(_io.BytesIO(f.read()), map_location='cpu', weights_only=True)
  except Exception as e:  # TorchScript archives and pickled objects land here.
    raise ValueError(
        f'torch.load(weights_only=True) refused {path!r} ({type(e).__name__}: {e}). '
        "OpenAI's original TorchScript .pt files are not state dicts: load them with "
        'open_clip and save model.state_dict().') from e
  if isinstance(obj, Mapping) and 'state_dict' in obj:  # open_clip training checkpoints.
    obj = obj['state_dict']
  if not isinstance(obj, Mapping):
    raise ValueError(f'{path!r} holds a {type(obj).__name__}, not a state dict.')
  prefix = 'module.'  # Saved from DistributedDataParallel.
  if all(k.startswith(prefix) for k in obj):
    obj = {k[len(prefix):]: v for k, v in obj.items()}
  return {k: v.float().numpy() if hasattr(v, 'float') else np.asarray(v)
          for k, v in obj.items()}


def save_safetensors(path: str, tensors: Mapping[str, np.ndarray], metadata=None):
  from safetensors.numpy import save  # pylint: disable=g-import-not-at-top
  # Not np.ascontiguousarray: it turns 0-d arrays (logit_scale) into shape [1].
  data = save({k: np.array(v, np.float32, order='C') for k, v in tensors.items()},
              metadata=metadata)
  with fs.open(path, 'wb') as f:
    f.write(data)


class Tensors:
  """A flat state dict that is consumed by name; what is never taken is an error."""

  def __init__(self, sd: Mapping[str, np.ndarray], source: str = 'checkpoint'):
    self._sd, self._taken, self.source = dict(sd), set(), source

  def __contains__(self, name):
    return name in self._sd

  def names(self):
    return list(self._sd)

  def take(self, name: str, shape: tuple | None = None) -> np.ndarray:
    if name not in self._sd:
      raise KeyError(f'{self.source}: missing tensor {name!r}.')
    x = self._sd[name]
    if shape is not None and tuple(x.shape) != tuple(shape):
      raise ValueError(f'{self.source}: {name!r} has shape {tuple(x.shape)}, expected '
                       f'{tuple(shape)}.')
    self._taken.add(name)
    return x

  def check_all_taken(self):
    left = sorted(set(self._sd) - self._taken)
    if left:
      raise ValueError(f'{self.source}: {len(left)} tensor(s) not mapped to the mmcl model: '
                       f'{", ".join(left[:30])}' + (' ...' if len(left) > 30 else ''))


def check_params(params: Mapping, expected: Mapping, what: str = 'converted params'):
  """Same names and shapes as `expected` (e.g. jax.eval_shape of model.init), or an error."""
  missing, extra, bad = diff_shapes({k: v.shape for k, v in flatten(params).items()},
                                    {k: v.shape for k, v in flatten(expected).items()})
  if missing or extra or bad:
    raise ValueError(f'{what} do not match the mmcl model: missing {missing or "none"}; '
                     f'unexpected {extra or "none"}; shape mismatches {bad or "none"}.')


def save_params(path: str, params: Mapping):
  """Writes a param tree as a flat '/'-joined `.npz` (the format `load_params` reads)."""
  buffer = _io.BytesIO()
  np.savez(buffer, **{k: np.asarray(v, np.float32) for k, v in flatten(params).items()})
  with fs.open(path, 'wb') as f:
    f.write(buffer.getvalue())


def load_params(path: str) -> dict:
  """A param tree from `save_params`'s `.npz`, or from an mmcl orbax checkpoint step directory
  (`<workdir>/ckpt/<step>`: its 'params')."""
  if fs.isdir(path):
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    sub = fs.join(path, 'default')
    state = ocp.StandardCheckpointer().restore(fs.path(sub if fs.isdir(sub) else path))
    return {k: v for k, v in state['params'].items()}
  return unflatten(_load_npz(path))


def _load_npz(path: str) -> dict[str, np.ndarray]:
  """The arrays of an `.npz`. Anything else (not a zip of .npy arrays, or holding Python
  objects) is refused as not a weight file: it is never unpickled, and numpy's hint to
  allow that is not passed on."""
  with fs.open(path, 'rb') as f:
    data = f.read()
  what = ('not an .npz archive' if not zipfile.is_zipfile(_io.BytesIO(data)) else None)
  if what is None:
    try:
      with np.load(_io.BytesIO(data), allow_pickle=False) as z:
        return dict(z.items())
    except ValueError:  # Object arrays: pickled Python objects.
      what = 'it holds Python objects, not arrays'
    except (OSError, EOFError, zipfile.BadZipFile) as e:
      what = f'damaged ({type(e).__name__})'
  raise ValueError(f'{path!r} is not an mmcl weight file ({what}): give a .npz of arrays '
                   'from tools/convert.py import or mmcl.convert.io.save_params, or an mmcl '
                   'checkpoint step directory <workdir>/ckpt/<step>.')
