"""Analytic train-step FLOPs of a whole config (mmcl/models/flops.py counts model configs):
NaFlex's budget of patch tokens and SigLIP 2's self-distillation passes, which live in the
config beside the model. What tools/bench_step.py and the compile tool print as model FLOPs.
"""
from mmcl.models import flops
from mmcl.train import distill, naflex_input


def self_distill_flops(config) -> float:
  """Per-example train FLOPs of SigLIP 2's self-distillation terms (mmcl/train/distill.py)
  while they are on; 0 without them. The teacher's forward of the global view (no
  gradient); the student's forward and backward of the V local crops (SILC) and of the
  masked global view (TIPS: mask tokens replace patches, so every token still runs); the
  DINO heads over the pooled vectors and, for TIPS, every patch token."""
  sd = distill.from_config(config)
  if sd is None:
    return 0.0
  views = distill.view_shapes(config, sd)
  h = sd.heads
  head = flops.dino_head_flops(h.width, h.hidden, h.bottleneck, h.prototypes)

  def image(size, train):  # (image tower forward, its patch embedding, patch tokens).
    f = flops.two_towers_forward(config.model, size, config.text_len, train=train)
    return f['image'], f['patch_embedding'], (size // sd.patch_size)**2

  global_size = views[sd.global_key][0]
  teacher, _, n = image(global_size, train=False)
  total = teacher + head
  if sd.local_weight:
    num_local, local_size = views[sd.local_key][:2]
    fwd, patch, _ = image(local_size, train=True)
    total += num_local * (3 * (fwd + head) - patch)
  if sd.masked_weight:
    fwd, patch, _ = image(global_size, train=True)
    total += n * head + 3 * (fwd + n * head) - patch  # Teacher's and student's patch heads.
  return total


def train_flops(config, global_batch: int | None = None,
                local_batch: int | None = None) -> dict[str, float]:
  """train_step_flops of a whole config (default: its batch_size): NaFlex images as
  config.naflex.budget patch tokens, and a 'self_distill' entry, included in 'train' (the
  step once those terms are on)."""
  f = flops.train_step_flops(config.model, config.image_size, config.text_len,
                             global_batch=global_batch or config.batch_size,
                             local_batch=local_batch, patches=naflex_input.budget(config))
  f['self_distill'] = self_distill_flops(config)
  f['train'] += f['self_distill']
  return f
