r"""Prints a config's model size from shapes only (no parameters are allocated):

  python tools/model_summary.py --config configs/limoe_b16.py
  python tools/model_summary.py --config configs/demo.py:tiny --batch 4

total parameters, parameters active per token (MoE: k of E experts), forward FLOPs per
(image, text) example from XLA's cost analysis. Logic: mmcl.models.summarize.
"""
import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/limoe_b16.py[:arg].')
flags.DEFINE_integer('batch', 8, 'Examples per compiled forward pass (FLOPs are per example).')
flags.mark_flags_as_required(['config'])


def _human(n: float) -> str:
  for unit, size in (('T', 1e12), ('B', 1e9), ('M', 1e6), ('K', 1e3)):
    if n >= size:
      return f'{n / size:.2f}{unit}'
  return f'{n:.0f}'


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  from mmcl import models
  c = flags.FLAGS.config
  s = models.summarize(c.model, c.image_size, c.text_len, batch=flags.FLAGS.batch)
  m = c.model
  what = m.get('variant') or f"{m.image.get('variant')} + text {m.text.get('variant')}"
  print(f'model            {m.name} {what} at {c.image_size}px, text_len {c.text_len}')
  print(f'total params     {s["total_params"]:,} ({_human(s["total_params"])})')
  print(f'active params    {s["active_params"]:,} ({_human(s["active_params"])}) per token')
  print(f'forward FLOPs    {_human(s["forward_flops"])} per (image, text) example '
        f'(a train step: about 3x)')


if __name__ == '__main__':
  app.run(main)
