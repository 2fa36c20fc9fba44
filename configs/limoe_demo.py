r"""Demo: a small LIMoE (one sparse transformer for images and texts) on synthetic shapes.

Same data, loss and evaluations as configs/demo.py; the two towers are replaced by one
shared 4-layer encoder whose last layer has 4 experts (top-1, Batch Prioritized Routing) and
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

from configs import common, demo

OPTIONS = demo.OPTIONS


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  tiny = 'tiny' in common.parse_options(arg, OPTIONS, 'limoe_demo')
  c = demo.get_config(arg)  # common.base_config() + the demo's data, loss and evals.
  num_experts = 4
  old = c.model
  c.model = ml_collections.ConfigDict(dict(
      name='limoe',
      # Four shared layers, the last one sparse (V-MoE's "last-n" placement). With MoE in
      # layers 1 and 3 (the paper's "every 2") shape stopped at 0.86 after 2,000 steps on
      # this small model, with 4 experts per layer whatever the routing knobs; with MoE only
      # in the last layer it reaches the dense encoder's 0.91 (docs/limoe.md, "Demo result").
      variant='pico/8' if tiny else 'nano/16',
      depth=2 if tiny else 4,
      embed_dim=old.embed_dim,
      text_style=old.text.style,
      vocab_size=old.text.vocab_size,
      max_len=c.get_ref('text_len'),  # The dense demo's 48 bytes.
      temperature_init=old.temperature_init,
      max_temperature=old.max_temperature,
      bias_init=old.bias_init,
      dtype=old.dtype,
      remat=old.remat,
      moe=dict(
          num_experts=num_experts, k=1,
          layers=(1,) if tiny else (3,),  # --config.model.moe.layers='(1,3)': every 2.
          # Capacity 2: image tokens crowd 2 of the 4 experts and text 1-2 (modality-specific
          # experts), which at capacity 1 dropped half the tokens.
          capacity_factor=2.0, eval_capacity_factor=2.0, group_size=64, bpr=True,
          noise_std=config_dict.placeholder(float),  # None: 1 / num_experts (V-MoE).
          importance_weight=0.0, load_weight=0.0,
          local_entropy_weight=0.01, global_entropy_weight=0.1,
          # Each modality may settle on half the experts before being pushed to spread.
          global_entropy_tau=math.log(num_experts / 2),
          # False: text padding after EOT is not routed (see docs/limoe.md); True as run.
          route_padding=True),
  ))
  return c
