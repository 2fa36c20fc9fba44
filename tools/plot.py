r"""Plots one or several runs' metrics.jsonl as PNG curves, to compare runs:

  python tools/plot.py --runs /tmp/run_a,/tmp/run_b --out /tmp/compare.png \
      [--panels train/loss,zeroshot/,train/t,train/lr]

A panel is a metric name or a prefix ending in '/' (all its top-1 metrics, e.g. zeroshot/).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

flags.DEFINE_list('runs', None, 'Workdirs (or metrics.jsonl files), comma-separated.')
flags.DEFINE_string('out', 'metrics.png', 'PNG path.')
flags.DEFINE_list('panels', None, 'Metrics or prefixes/ to draw; default loss, zero-shot, '
                  'temperature, learning rate.')
flags.mark_flags_as_required(['runs'])


def main(argv):
  del argv
  from mmcl.train import plots
  f = flags.FLAGS
  print(plots.plot_runs(f.runs, f.out, f.panels or plots.DEFAULT_PANELS))


if __name__ == '__main__':
  app.run(main)
