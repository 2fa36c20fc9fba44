r"""LIMoE-B/16: one sparse B/16 transformer for images and texts, paper-scale recipe.

From the LIMoE paper (see shared/PAPERS.md): 32 experts placed every 2 layers, top-1
routing with Batch Prioritized Routing, learned temperature initialised at 10, B/16 trained
for 100,000 steps at batch size 8,192, resolution 224. Not from the paper (our choices, to
tune): entropy-loss weights and tau, group size, text length 16, lr and schedule, mesh.

  python tools/train.py --config configs/limoe_b16.py --workdir gs://bucket/limoe_b16 \
      --config.input.name=<tfds image-text dataset> --config.data_dir=<tfds data_dir> \
      --config.tokenizer=sp:/path/to/32k.model
  python tools/model_summary.py --config configs/limoe_b16.py
  python tools/train.py --config configs/limoe_b16.py:tiny --workdir /tmp/limoe_b16_tiny

'tiny': the same recipe shrunk to run on one CPU on the synthetic shapes (a smoke test).
"""
import math

import ml_collections

from configs import common

OPTIONS = ('tiny',)
# Expert weights split over the 'expert' mesh axis; everything else FSDP (a no-op
# without an 'fsdp' axis). Matches mmcl.models.moe's parameter names.
EXPERT_RULES = (
    ('.*/moe/(wi|wo)', ('expert', None, None)),
    ('.*/moe/(bi|bo)', ('expert', None)),
    ('.*', 'fsdp'),
)


def recipe(arg: str, *, variant: str, res: int, batch_size: int, steps: int,
           num_experts: int = 32, group_images: int = 4, mesh=(('data', -1), ('expert', 8)),
           remat: bool = False) -> ml_collections.ConfigDict:
  """The LIMoE recipe shared by the B/16 and H/14 configs."""
  options = common.parse_options(arg, OPTIONS, 'LIMoE')
  tiny = 'tiny' in options
  c = common.base_config()
  c.total_steps = 10 if tiny else steps
  c.batch_size = 32 if tiny else batch_size
  c.image_size = 64 if tiny else res
  c.text_len = 16
  c.lr = 1e-3
  c.schedule.warmup_steps = 2 if tiny else 10_000
  c.optim.weight_decay = 1e-4
  c.log_every = 1 if tiny else 100
  c.ckpt_every = 5 if tiny else 2000
  c.mesh = (('data', -1), ('expert', 1)) if tiny else mesh
  c.sharding_rules = EXPERT_RULES

  c.input.name = 'mmcl_shapes/tiny' if tiny else ''  # Set --config.input.name.
  c.input.pp = (
      'decode|resize({image_size})|value_range(-1, 1)|choice(inkey="captions", outkey="texts")|'
      'tokenize(max_len={text_len}, tokenizer="{tokenizer}", inkey="texts", outkey="text")|'
      'keep("image", "text")')
  if tiny:
    c.input.shuffle_buffer = 512

  patch = 8 if tiny else int(variant.split('/')[1])
  tokens_per_image = (c.image_size // patch)**2
  num_experts = 4 if tiny else num_experts
  c.model.name = 'limoe'
  c.model.variant = 'pico/8' if tiny else variant
  c.model.embed_dim = 64 if tiny else 512
  c.model.text_style = 'clip'
  c.model.vocab_size = 258 if tiny else 32_000
  c.model.max_len = c.get_ref('text_len')
  c.model.temperature_init = 10.0  # Paper: "initialised at 10".
  c.model.dtype = 'float32' if tiny else 'bfloat16'
  c.model.remat = 'full' if remat else 'none'  # A string, so flags can name a policy.
  c.model.moe = dict(
      num_experts=num_experts, k=1, every=2, bpr=True, capacity_factor=1.0,
      # A group holds a few whole images; text groups take the largest divisor below.
      group_size=group_images * tokens_per_image,
      importance_weight=0.0, load_weight=0.0,
      local_entropy_weight=0.01, global_entropy_weight=0.01,
      global_entropy_tau=math.log(num_experts / 4))
  c.loss.name = 'softmax'

  c.evals.update(common.zeroshot_evals(tiny))
  return c


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  return recipe(arg, variant='B/16', res=224, batch_size=8192, steps=100_000)
