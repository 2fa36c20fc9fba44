"""Contrastive losses: a registry of loss functions and their distributed execution.

`contrastive_loss(...)` computes any registered loss on global (sharded) embeddings under
`jit`. `impl` picks how negatives reach each device:
  - 'global': the formula on the global arrays, partitioned by the compiler (reference);
  - 'gather': local rows against all-gathered columns, inside `jax.shard_map`;
  - 'ring': column blocks travel around the devices by ppermute, tiled (ring.py).

Every module in this package is imported here, so a new loss is one new file (with a
`@register_loss` function) and one config line; see docs/losses.md.
"""
import importlib
import pkgutil

from mmcl.losses.distributed import contrastive_loss, make_loss_fn
from mmcl.losses.registry import LossContext, get_loss, register_loss, registered_losses

for _module in pkgutil.iter_modules(__path__):  # Importing a loss module registers it.
  importlib.import_module(f'{__name__}.{_module.name}')

__all__ = ['LossContext', 'contrastive_loss', 'get_loss', 'make_loss_fn',
           'register_loss', 'registered_losses']
