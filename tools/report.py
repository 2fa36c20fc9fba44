r"""Writes a run's report: `python tools/report.py WORKDIR [--out DIR]`.

One Markdown page (`DIR/report.md`, default WORKDIR/report) with PNG plots of the training
curves (loss, learning rate, throughput, MFU, time split, memory, input drops), the
evaluation metrics across steps, expert utilisation for MoE runs, and tables of the last
values, the run's starts with versions and devices, and its config (mmcl/train/report.py).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

flags.DEFINE_string('out', None, 'Directory of the page and plots; default WORKDIR/report.')


def main(argv):
  if len(argv) != 2:
    raise app.UsageError('Usage: python tools/report.py WORKDIR [--out DIR]')
  from mmcl.train import report
  result = report.write(argv[1], flags.FLAGS.out)
  for name, points in result['plots'].items():
    print(f'{name}: {points} points')
  print(result['page'])


if __name__ == '__main__':
  app.run(main)
