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


def plot_utilisation(workdir: str, out: str, step: int | None = None) -> str:
  """Writes the PNG and returns its path; raises ValueError if nothing to draw."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from mmcl.models import moe  # pylint: disable=g-import-not-at-top
  from mmcl.train import metrics  # pylint: disable=g-import-not-at-top
  rows = [r for r in metrics.read_metrics(workdir) if moe.utilisation(r)]
  if step is not None:
    rows = [r for r in rows if r['step'] == step]
  if not rows:
    raise ValueError(f'No MoE utilisation metrics (train/moe/layer<i>/<modality>/expert<e>) '
                     f'{"at step %d " % step if step is not None else ""}in '
                     f'{os.path.join(workdir, "metrics.jsonl")}.')
  row = rows[-1]
  use = moe.utilisation(row)
  mods = [m for m in moe.MODALITIES if m in use] + sorted(set(use) - set(moe.MODALITIES))
  fig, axes = plt.subplots(1, len(mods), figsize=(4 + 3 * len(mods), 1.5 + 0.4 * max(
      len(v) for v in use.values())), squeeze=False)
  vmax = max(max(max(v) for v in use[m].values()) for m in mods) or 1.0  # One scale for all.
  for ax, mod in zip(axes[0], mods):
    layers = sorted(use[mod])
    grid_LxE = np.array([use[mod][layer] for layer in layers])
    im = ax.imshow(grid_LxE, vmin=0, vmax=vmax, cmap='viridis', aspect='auto')
    e = grid_LxE.shape[1]
    ax.set_xticks(range(0, e, 1 if e <= 16 else 4))
    ax.set_title(f'{mod} tokens')
    ax.set_xlabel('expert')
    ax.set_ylabel('MoE layer')
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    fig.colorbar(im, ax=ax, fraction=0.046, label='fraction of tokens (top-1)')
  fig.suptitle(f'Expert utilisation at step {row["step"]}')
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  fig.savefig(out, dpi=100)
  plt.close(fig)
  return out


def main(argv):
  del argv
  f = flags.FLAGS
  print(plot_utilisation(f.workdir, f.out or os.path.join(f.workdir, 'experts.png'), f.step))


if __name__ == '__main__':
  app.run(main)
