r"""Draws test images with a decoder checkpoint's greedy outputs: the caption, the box it
predicts for a region caption (referring expression) and the caption it writes for a box.

  python tools/caption_figure.py --config configs/siglip2_demo.py --workdir /tmp/mmcl_siglip2 \
      --out docs/siglip2_captions.png

Reads the config's captioning evaluator (`--eval`, default the first of type 'captioning')
for the dataset, split, tasks and location bins; restores the latest checkpoint (or --step).
Prints each image's outputs and the PNG's path (mmcl/evaluate/caption_plot.py).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

config_flags.DEFINE_config_file('config', None, 'Config file (with a decoder).')
flags.DEFINE_string('workdir', None, 'Training workdir holding ckpt/.')
flags.DEFINE_string('out', None, 'PNG path; default <workdir>/captions.png.')
flags.DEFINE_integer('step', None, 'Checkpoint step; default the latest.')
flags.DEFINE_integer('num', 8, 'Test images to draw.')
flags.DEFINE_integer('columns', 4, 'Panels per row.')
flags.DEFINE_string('eval', None, 'Name of the captioning evaluator in config.evals.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  from mmcl import evaluate
  from mmcl.evaluate import caption_plot
  from mmcl.train import checkpoint_eval
  f = flags.FLAGS
  config = f.config
  names = [n for n, c in config.evals.items() if c.get('type') == 'captioning']
  name = f.eval or (names[0] if names else None)
  if name not in names:
    raise SystemExit(f'--eval={name!r}: config.evals has captioning evaluators {names}.')
  config.evals = {name: config.evals[name]}
  config.evals[name].show = 0
  model, mesh, params, step = checkpoint_eval.restore_params(config, f.workdir, f.step)
  evaluator, _ = evaluate.build_evaluators(config, evaluate.Predictor(model, mesh))[name]
  rows = caption_plot.outputs(evaluator, params, f.num)
  for i, row in enumerate(rows):
    print(f'step {step} image {i}: ' + '; '.join(
        f'{k}: {v}' for k, v in row.items() if k != 'image'))
  print(caption_plot.draw(rows, f.out or os.path.join(f.workdir, 'captions.png'), f.columns))


if __name__ == '__main__':
  app.run(main)
