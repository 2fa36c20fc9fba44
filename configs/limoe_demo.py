r"""Demo: a small LIMoE (one sparse transformer for images and texts) on synthetic shapes.

Same data, loss and evaluations as configs/demo.py; the two towers are replaced by one
shared 2-layer encoder with 4 experts in each layer (top-1, Batch Prioritized Routing) and
LIMoE's per-modality entropy losses. Expert utilisation per layer and modality goes to
metrics.jsonl (train/moe/layer<i>/<image|text>/expert<e>):

  python tools/train.py --config configs/limoe_demo.py --workdir /tmp/limoe_demo
  python tools/plot_experts.py --workdir /tmp/limoe_demo --out /tmp/limoe_demo/experts.png
  python tools/model_summary.py --config configs/limoe_demo.py

The argument is a comma-separated list of options: 'clip' (default) or 'siglip' picks the
loss; 'tiny' shrinks the model and data to a smoke test that runs in seconds (tests).
"""
import math

import ml_collections
from ml_collections import config_dict

from configs import demo

OPTIONS = demo.OPTIONS


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  c = demo.get_config(arg)  # common.base_config() + the demo's data, loss and evals.
  tiny = 'tiny' in {o for o in (arg or '').split(',') if o}
  # Every text token runs through the whole shared encoder: 32 bytes keep ~3/4 of the
  # captions whole (the rest are cut, EOS kept) at 2/3 of the demo's text cost.
  c.text_len = 32
  num_experts = 4
  old = c.model
  c.model = ml_collections.ConfigDict(dict(
      name='limoe',
      # Depth 2 (MoE in both layers) keeps the CPU cost near the dense demo's, where the
      # text tower had one layer: here every text token goes through the shared encoder.
      variant='pico/8' if tiny else 'nano/16',
      depth=2,
      embed_dim=old.embed_dim,
      text_style=old.text.style,
      vocab_size=old.text.vocab_size,
      max_len=c.get_ref('text_len'),
      temperature_init=old.temperature_init,
      max_temperature=old.max_temperature,
      bias_init=old.bias_init,
      dtype=old.dtype,
      remat=old.remat,
      moe=dict(
          num_experts=num_experts, k=1, every=1, capacity_factor=1.0,
          layers=config_dict.placeholder(tuple),  # Explicit MoE layers; overrides `every`.
          eval_capacity_factor=2.0, group_size=64, bpr=True,
          noise_std=config_dict.placeholder(float),  # None: 1 / num_experts (V-MoE).
          importance_weight=0.0, load_weight=0.0,
          local_entropy_weight=0.01, global_entropy_weight=0.1,
          # Each modality may settle on half the experts before being pushed to spread.
          global_entropy_tau=math.log(num_experts / 2)),
  ))
  return c
