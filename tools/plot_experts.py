r"""Draws MoE expert utilisation per layer and modality from a workdir's metrics.jsonl:

  python tools/plot_experts.py --workdir /tmp/limoe_demo --out /tmp/limoe_demo/experts.png

One heatmap per modality (rows: MoE layers, columns: experts, colour: fraction of that
modality's tokens whose top-1 choice is the expert), at the last logged step or --step.
Modality-specific experts show as columns bright for one modality and dark for the other.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

flags.DEFINE_string('workdir', None, 'Training workdir holding metrics.jsonl.')
flags.DEFINE_string('out', None, 'PNG path; default <workdir>/experts.png.')
flags.DEFINE_integer('step', None, 'Step to draw; default the last step with utilisation.')
flags.mark_flags_as_required(['workdir'])

from mmcl.train.plots import plot_utilisation  # noqa: E402


def main(argv):
  del argv
  f = flags.FLAGS
  print(plot_utilisation(f.workdir, f.out or os.path.join(f.workdir, 'experts.png'), f.step))


if __name__ == '__main__':
  app.run(main)
