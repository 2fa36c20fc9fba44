"""Contrastive losses: a registry of loss functions and their distributed execution.

`contrastive_loss(...)` computes any registered loss on global (sharded) embeddings under
`jit`. `impl` picks how negatives reach each device:
  - 'global': the formula on the global arrays, partitioned by the compiler (reference);
  - 'gather': local rows against all-gathered columns, inside `jax.shard_map`.
"""
# Importing the loss modules registers them.
from mmcl.losses import (  # noqa: F401
    align_uniform, auc, cwcl, dcl, focal, hard_negative, multi_positive, sigmoid, softmax,
    symile)
from mmcl.losses.distributed import contrastive_loss, make_loss_fn
from mmcl.losses.registry import LossContext, get_loss, register_loss, registered_losses

__all__ = ['LossContext', 'contrastive_loss', 'get_loss', 'make_loss_fn',
           'register_loss', 'registered_losses']
