"""Curves of one or several runs' metrics.jsonl, side by side, as one PNG."""
import os

# Panels drawn by default: each is a metric name, or a prefix ending in '/' for a family.
DEFAULT_PANELS = ('train/loss', 'zeroshot/', 'train/t', 'train/lr')


def load_rows(run: str) -> list[dict]:
  """Rows of `run`: a workdir holding metrics.jsonl, or the .jsonl file itself."""
  from mmcl import fs
  from mmcl.train import metrics  # A live run's torn last line is skipped, not fatal.
  path = run if run.endswith('.jsonl') else fs.join(run, 'metrics.jsonl')
  if not fs.exists(path):
    raise FileNotFoundError(f'No metrics file at {path}.')
  return metrics.read_metrics_file(path)


def _series(rows, panel):
  """{metric: (steps, values)} for a metric name or a family prefix ('zeroshot/')."""
  names = sorted({k for r in rows for k in r if k == panel or
                  (panel.endswith('/') and k.startswith(panel) and k.endswith('top1'))})
  return {n: ([r['step'] for r in rows if n in r], [r[n] for r in rows if n in r])
          for n in names}


def plot_runs(runs: list[str], out: str, panels=DEFAULT_PANELS, labels=None) -> str:
  """Draws one panel per metric (or family), one line per run and metric; returns `out`."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  labels = labels or [os.path.basename(os.path.normpath(r)) for r in runs]
  data = [load_rows(r) for r in runs]
  drawn = [(p, [_series(rows, p) for rows in data]) for p in panels]
  drawn = [(p, s) for p, s in drawn if any(s)]
  if not drawn:
    available = sorted({k for rows in data for r in rows for k in r} - {'step'})
    raise ValueError(f'None of the panels {list(panels)} is in {runs}; available: '
                     f'{available[:30]}')
  fig, axes = plt.subplots(1, len(drawn), figsize=(4.5 * len(drawn), 3.5), squeeze=False)
  for ax, (panel, per_run) in zip(axes[0], drawn):
    for label, series in zip(labels, per_run):
      for name, (steps, values) in series.items():
        suffix = '' if name == panel else ' ' + name[len(panel):].removesuffix('/top1')
        ax.plot(steps, values, marker='.' if len(steps) < 20 else None, label=label + suffix)
    ax.set_title(panel.rstrip('/'))
    ax.set_xlabel('step')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(out, dpi=100)
  plt.close(fig)
  return out
