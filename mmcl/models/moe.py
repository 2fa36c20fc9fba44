"""Sparse mixture-of-experts MLP: V-MoE routing, LIMoE entropy losses, expert parallelism.

Tokens are routed in groups of `group_size` (G groups of S tokens, E experts, buffer C per
expert and group, M model width, H expert width):
  gates_GxSxE = softmax(x_GxSxM @ router_MxE [+ noise in training])
  top-k experts per token; capacity C = ceil(S * k * capacity_factor / E); buffer places
  go to all top-1 choices before any top-2 choice, in token order or, with Batch
  Prioritized Routing (bpr), in order of decreasing top-1 gate. Choices past capacity are
  dropped: a token with no place gets a zero MoE output, so its residual passes through.
  y = sum_k gate_k * Expert_k(x).
Auxiliary losses (each weighted by its own config field, summed into `aux['loss']`):
  importance: CV(sum over a group's tokens of gates)^2, mean over groups (V-MoE);
  load: CV(P(expert e among a token's top-k under the gating noise))^2, mean over groups;
    without noise (eval, noise_std=0) the observed top-k fractions, which have no gradient;
  local entropy: mean over the call's tokens of H(p(.|token)) (LIMoE; minimised);
  global entropy: max(0, tau - H(mean over the call's tokens of p(.|token))) (LIMoE).
Importance and entropies use the clean router probabilities p = softmax(x @ router).
One call sees one modality (LIMoE runs images and texts through the encoder separately),
so the entropy losses and metrics are per modality by construction.

Expert parallelism: when the mesh the model is given (its `mesh` field, from `setup`) has an
`expert` axis of size n > 1, the layer runs in one `shard_map` over all mesh axes: each device
routes its own tokens (groups never cross devices), sends each expert's buffers to the
device holding that expert with `all_to_all` over the expert axis, applies its E/n experts
and sends the results back. Expert weights are sharded over the expert axis (rules in configs/limoe_*),
the batch over the batch axes (data, fsdp, expert). Without such a mesh it is plain code
(and the compiler partitions it from the parameter shardings). The mesh is an argument, never
read from the ambient `jax.set_mesh`, so one config compiles one program wherever it is built.
The layer module itself is `transformer.MoeMlp` (a block's pluggable MLP).
"""
import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mmcl.parallel import mesh as mesh_lib

MODALITIES = ('image', 'text')


@dataclasses.dataclass(frozen=True, eq=False)
class MoeSpec:
  """MoE hyperparameters; built from a config dict by `MoeSpec.make`."""
  num_experts: int = 8
  k: int = 1
  capacity_factor: float = 1.0
  eval_capacity_factor: float | None = None  # None: capacity_factor.
  group_size: int = 256  # Tokens per routing group (see `group_size_for`).
  bpr: bool = True  # Batch Prioritized Routing.
  noise_std: float | None = None  # Gating noise std in training; None: 1 / num_experts.
  every: int = 2  # MoE in layers every-1, 2*every-1, ... (V-MoE 'every 2').
  layers: tuple[int, ...] | None = None  # Explicit MoE layer indices; wins over `every`.
  mlp_dim: int | None = None  # Expert hidden width; None: the encoder's mlp_dim.
  importance_weight: float = 0.0
  load_weight: float = 0.0
  # The entropy weights and tau may be one float or {'image': w, 'text': w}.
  local_entropy_weight: Any = 0.0
  global_entropy_weight: Any = 0.0
  global_entropy_tau: Any = None  # None: log(num_experts), i.e. always push to uniform.
  # False: padding tokens of causal text (after its EOT) are not routed: they take no buffer
  # place, pass through on the residual and are left out of every loss and statistic.
  route_padding: bool = True
  expert_axis: str = 'expert'

  @classmethod
  def make(cls, cfg) -> 'MoeSpec':
    """From a MoeSpec, dict, FrozenDict or ConfigDict-converted mapping; validated."""
    if isinstance(cfg, MoeSpec):
      return cfg
    cfg = dict(cfg)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(cfg) - fields)
    if unknown:
      raise ValueError(f'Unknown MoE field(s) {unknown}; valid: {sorted(fields)}')
    if cfg.get('layers') is not None:
      cfg['layers'] = tuple(int(i) for i in cfg['layers'])
    spec = cls(**cfg)
    spec.validate()
    return spec

  def validate(self):
    checks = [
        (self.num_experts >= 1, f'num_experts={self.num_experts} must be >= 1'),
        (1 <= self.k <= self.num_experts,
         f'k={self.k} must be in [1, num_experts={self.num_experts}]'),
        (self.capacity_factor > 0, f'capacity_factor={self.capacity_factor} must be > 0'),
        (self.eval_capacity_factor is None or self.eval_capacity_factor > 0,
         f'eval_capacity_factor={self.eval_capacity_factor} must be > 0 or None'),
        (self.group_size >= 1, f'group_size={self.group_size} must be >= 1'),
        (self.noise_std is None or self.noise_std >= 0,
         f'noise_std={self.noise_std} must be >= 0 or None'),
        (self.every >= 1, f'every={self.every} must be >= 1'),
    ]
    for ok, msg in checks:
      if not ok:
        raise ValueError(f'Bad MoE config: {msg}.')
    for name in ('local_entropy_weight', 'global_entropy_weight', 'global_entropy_tau'):
      v = getattr(self, name)
      if isinstance(v, Mapping) and set(v) - set(MODALITIES):
        raise ValueError(f'MoE {name} has keys {sorted(v)}; valid: {MODALITIES}.')

  def layer_ids(self, depth: int) -> tuple[int, ...]:
    if self.layers is None:
      return tuple(i for i in range(depth) if i % self.every == self.every - 1)
    bad = [i for i in self.layers if not 0 <= i < depth]
    if bad:
      raise ValueError(f'MoE layers {bad} out of range for depth {depth}: valid 0..{depth - 1}.')
    return tuple(sorted(set(self.layers)))

  def per_modality(self, name: str, modality: str, default=0.0):
    v = getattr(self, name)
    return v.get(modality, default) if isinstance(v, Mapping) else v

  def capacity(self, group_size: int, train: bool) -> int:
    cf = self.capacity_factor if train or self.eval_capacity_factor is None else (
        self.eval_capacity_factor)
    return max(1, math.ceil(group_size * self.k * cf / self.num_experts))


def group_size_for(num_tokens: int, group_size: int) -> int:
  """The largest divisor of `num_tokens` (a device's tokens) that is <= group_size."""
  for s in range(min(group_size, num_tokens), 0, -1):
    if num_tokens % s == 0:
      return s
  return 1


def route(gates_GxSxE, *, k: int, capacity: int, bpr: bool, valid_GxS=None):
  """Top-k routing with capacity. Returns (combine_GxSxExC, kept_GxSxK, experts_GxSxK).

  Buffer places per expert go to every token's 1st choice before any 2nd choice; within a
  rank, in token order, or by decreasing top-1 gate with BPR. Tokens where `valid_GxS` is
  False take no place and are never kept.
  """
  g, s, e = gates_GxSxE.shape
  vals_GxSxK, experts_GxSxK = jax.lax.top_k(gates_GxSxE, k)
  if bpr:
    order_GxS = jnp.argsort(-vals_GxSxK[..., 0], axis=1, stable=True)
  else:
    order_GxS = jnp.broadcast_to(jnp.arange(s), (g, s))
  sorted_GxSxK = jnp.take_along_axis(experts_GxSxK, order_GxS[..., None], axis=1)
  # Rank-major flattening puts all 1st choices ahead of all 2nd choices.
  onehot_GxKSxE = jax.nn.one_hot(
      jnp.swapaxes(sorted_GxSxK, 1, 2).reshape(g, k * s), e, dtype=jnp.int32)
  if valid_GxS is not None:
    valid_sorted_GxS = jnp.take_along_axis(valid_GxS, order_GxS, axis=1)
    onehot_GxKSxE = onehot_GxKSxE * jnp.tile(valid_sorted_GxS, (1, k))[..., None]
  pos_GxKS = jnp.sum((jnp.cumsum(onehot_GxKSxE, axis=1) - 1) * onehot_GxKSxE, axis=-1)
  pos_sorted_GxSxK = jnp.swapaxes(pos_GxKS.reshape(g, k, s), 1, 2)
  inverse_GxS = jnp.argsort(order_GxS, axis=1)
  pos_GxSxK = jnp.take_along_axis(pos_sorted_GxSxK, inverse_GxS[..., None], axis=1)
  kept_GxSxK = pos_GxSxK < capacity
  if valid_GxS is not None:
    kept_GxSxK = kept_GxSxK & valid_GxS[..., None]
  weight_GxSxK = jnp.where(kept_GxSxK, vals_GxSxK, 0.0)
  combine_GxSxExC = jnp.einsum(
      'gsk,gske,gskc->gsec', weight_GxSxK,
      jax.nn.one_hot(experts_GxSxK, e, dtype=weight_GxSxK.dtype),
      jax.nn.one_hot(pos_GxSxK, capacity, dtype=weight_GxSxK.dtype))
  return combine_GxSxExC, kept_GxSxK, experts_GxSxK


def _cv2(x_GxE):
  """Squared coefficient of variation over experts, per group."""
  return jnp.var(x_GxE, axis=-1) / jnp.square(jnp.mean(x_GxE, axis=-1) + 1e-9)


def entropy(p_xE, axis=-1):
  return -jnp.sum(p_xE * jnp.log(jnp.maximum(p_xE, 1e-9)), axis=axis)


def expert_mlp(params, x_XxExCxM, dtype, act=nn.gelu):
  """The E expert MLPs on their buffers (any leading dims X); `act` the activation."""
  wi, bi, wo, bo = (params[n].astype(dtype) for n in ('wi', 'bi', 'wo', 'bo'))
  lead = (1,) * (x_XxExCxM.ndim - 3)
  h = jnp.einsum('...ecm,emh->...ech', x_XxExCxM, wi) + bi.reshape(lead + (bi.shape[0], 1, -1))
  y = jnp.einsum('...ech,ehm->...ecm', act(h), wo)
  return y + bo.reshape(lead + (bo.shape[0], 1, -1))


def moe_apply(params, x_BxLxM, noise_BxLxE=None, valid_BxL=None, *, spec: MoeSpec,
              train: bool, modality: str = 'image', expert_axis: str | None = None,
              reduce_axes: tuple[str, ...] = (), act=nn.gelu):
  """The MoE MLP on this device's tokens. Returns (y_BxLxM, stats, dropped_BxL).

  valid_BxL (bool, optional): False marks tokens not to route (padding): their output is 0,
  and they count in no loss or statistic.

  params: router [M, E]; wi [E', M, H], bi [E', H], wo [E', H, M], bo [E', M], where
  E' = E / (size of `expert_axis`) inside a shard_map, else E. `reduce_axes`: the mesh
  axes the batch is split over, whose sums make the statistics global.
  stats: scalars 'loss' (weighted sum), each loss, 'dropped', 'entropy', 'expert{e}'.
  """
  b, l, m = x_BxLxM.shape
  e = spec.num_experts
  s = group_size_for(b * l, spec.group_size)
  g, c = b * l // s, spec.capacity(s, train)
  x_GxSxM = x_BxLxM.reshape(g, s, m)
  rdt = jnp.promote_types(x_BxLxM.dtype, jnp.float32)  # Route in >= float32, even for bf16.
  logits_GxSxE = jnp.einsum('gsm,me->gse', x_GxSxM.astype(rdt), params['router'].astype(rdt))
  probs_GxSxE = jax.nn.softmax(logits_GxSxE)
  noisy_GxSxE = logits_GxSxE
  if noise_BxLxE is not None:
    noisy_GxSxE = logits_GxSxE + noise_BxLxE.reshape(g, s, e).astype(rdt)
  gates_GxSxE = jax.nn.softmax(noisy_GxSxE)
  valid_GxS = None if valid_BxL is None else valid_BxL.reshape(g, s)
  combine_GxSxExC, kept_GxSxK, experts_GxSxK = route(
      gates_GxSxE, k=spec.k, capacity=c, bpr=spec.bpr, valid_GxS=valid_GxS)

  dtype = x_BxLxM.dtype
  dispatch_GxSxExC = (combine_GxSxExC > 0).astype(dtype)
  buf_GxExCxM = jnp.einsum('gsec,gsm->gecm', dispatch_GxSxExC, x_GxSxM)
  if expert_axis is None:
    out_GxExCxM = expert_mlp(params, buf_GxExCxM, dtype, act)
  else:  # Each device gets its experts' buffers from every device of the expert axis.
    buf_NGxElxCxM = jax.lax.all_to_all(buf_GxExCxM, expert_axis, 1, 0, tiled=True)
    out_NGxElxCxM = expert_mlp(params, buf_NGxElxCxM, dtype, act)
    out_GxExCxM = jax.lax.all_to_all(out_NGxElxCxM, expert_axis, 0, 1, tiled=True)
  y_GxSxM = jnp.einsum('gsec,gecm->gsm', combine_GxSxExC.astype(dtype), out_GxExCxM)
  dropped_GxS = ~jnp.any(kept_GxSxK, axis=-1)
  w_GxS = jnp.ones((g, s), rdt)  # Which tokens the statistics count.
  if valid_GxS is not None:
    dropped_GxS = dropped_GxS & valid_GxS
    w_GxS = valid_GxS.astype(rdt)
  w_GxSx1 = w_GxS[..., None]

  # Statistics: sums over this device's tokens/groups, then over the batch axes.
  topk_GxSxE = jnp.sum(jax.nn.one_hot(experts_GxSxK, e), axis=2)
  if noise_BxLxE is not None and train:
    # P(e in top-k) = P(logit_e + noise > k-th largest noisy logit), noise ~ N(0, std).
    std = spec.noise_std if spec.noise_std is not None else 1.0 / e
    kth_GxS = jax.lax.top_k(noisy_GxSxE, spec.k)[0][..., -1]
    load_GxSxE = 1.0 - jax.scipy.stats.norm.cdf((kth_GxS[..., None] - logits_GxSxE) / std)
  else:
    load_GxSxE = topk_GxSxE  # Observed selections: a diagnostic without gradient.
  counted_Gx1 = jnp.maximum(jnp.sum(w_GxSx1, axis=1), 1.0)
  sums = {
      'importance_loss': jnp.sum(_cv2(jnp.sum(probs_GxSxE * w_GxSx1, axis=1))),
      'load_loss': jnp.sum(_cv2(jnp.sum(load_GxSxE * w_GxSx1, axis=1) / counted_Gx1)),
      'groups': jnp.asarray(g, jnp.float32),
      'tokens': jnp.sum(w_GxS),
      'entropy': jnp.sum(entropy(probs_GxSxE) * w_GxS),
      'dropped': jnp.sum(dropped_GxS.astype(jnp.float32)),
      'mean_probs': jnp.sum(probs_GxSxE * w_GxSx1, axis=(0, 1)),
      'top1': jnp.sum(jax.nn.one_hot(experts_GxSxK[..., 0], e) * w_GxSx1, axis=(0, 1)),
  }
  if reduce_axes:
    sums = jax.lax.psum(sums, reduce_axes)
  n = jnp.maximum(sums['tokens'], 1.0)
  mean_probs_E = sums['mean_probs'] / n
  stats = {
      'importance_loss': sums['importance_loss'] / sums['groups'],
      'load_loss': sums['load_loss'] / sums['groups'],
      'local_entropy_loss': sums['entropy'] / n,
      'global_entropy': entropy(mean_probs_E),
  }
  tau = spec.per_modality('global_entropy_tau', modality, None)
  tau = math.log(e) if tau is None else tau
  stats['global_entropy_loss'] = jnp.maximum(0.0, tau - stats['global_entropy'])
  stats['loss'] = sum(
      spec.per_modality(f'{name}_weight', modality) * stats[f'{name}_loss']
      for name in ('importance', 'load', 'local_entropy', 'global_entropy'))
  stats['dropped'] = sums['dropped'] / n
  stats['entropy'] = stats['local_entropy_loss']
  stats.update({f'expert{i}': sums['top1'][i] / n for i in range(e)})
  return y_GxSxM.reshape(b, l, m), stats, dropped_GxS.reshape(b, l)


def expert_mesh(mesh, expert_axis: str):
  """`mesh` when it has `expert_axis` of size > 1 (expert parallelism), else None."""
  if mesh is None or mesh.shape.get(expert_axis, 1) <= 1:
    return None
  return mesh


def moe_sharded(params, x_BxLxM, noise_BxLxE=None, valid_BxL=None, *, spec: MoeSpec,
                train: bool, modality: str = 'image', mesh=None, act=nn.gelu):
  """`moe_apply` over a mesh with an expert axis: one shard_map, all_to_all dispatch."""
  ax = spec.expert_axis
  n = mesh.shape[ax]
  if spec.num_experts % n:
    raise ValueError(f'num_experts={spec.num_experts} does not divide over the {n} devices '
                     f'of mesh axis {ax!r}; use a multiple of {n}.')
  batch = tuple(a for a in mesh.axis_names if a in mesh_lib.BATCH_AXES)
  expert_specs = {'router': P(), 'wi': P(ax), 'bi': P(ax), 'wo': P(ax), 'bo': P(ax)}
  fn = lambda p, x, z, v: moe_apply(  # pylint: disable=g-long-lambda
      p, x, z, v, spec=spec, train=train, modality=modality, expert_axis=ax,
      reduce_axes=batch, act=act)
  optional = lambda a: None if a is None else P(batch)
  return jax.shard_map(
      fn, mesh=mesh,
      in_specs=(expert_specs, P(batch), optional(noise_BxLxE), optional(valid_BxL)),
      out_specs=(P(batch), P(), P(batch)))(params, x_BxLxM, noise_BxLxE, valid_BxL)


def utilisation(row: Mapping[str, float], prefix: str = 'train/') -> dict:
  """{modality: {layer: [fraction of its tokens per expert]}} from one metrics row
  (names as transformer.Encoder writes them: '<prefix>moe/layer<i>/<modality>/expert<e>')."""
  found = {}
  for name, v in row.items():
    parts = name[len(prefix):].split('/') if name.startswith(prefix) else []
    if len(parts) == 4 and parts[0] == 'moe' and parts[3].startswith('expert'):
      layer, mod, e = int(parts[1][len('layer'):]), parts[2], int(parts[3][len('expert'):])
      found.setdefault(mod, {}).setdefault(layer, {})[e] = float(v)
  return {mod: {layer: [es[e] for e in sorted(es)] for layer, es in sorted(layers.items())}
          for mod, layers in found.items()}
