"""PNG plots of runs' metrics.jsonl: curves of one or several runs side by side
(`plot_runs`), and a MoE run's expert utilisation per layer and modality
(`plot_utilisation`). tools/plot.py, tools/plot_experts.py and tools/report.py draw them."""
import fnmatch
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
  """{metric: (steps, values)} for a metric name, a family prefix ('zeroshot/': its top-1
  metrics) or a pattern ('retrieval/*_r1')."""
  names = sorted({k for r in rows for k in r if k == panel or
                  (panel.endswith('/') and k.startswith(panel) and k.endswith('top1')) or
                  ('*' in panel and fnmatch.fnmatchcase(k, panel))})
  return {n: ([r['step'] for r in rows if n in r], [r[n] for r in rows if n in r])
          for n in names}


def plot_runs(runs: list[str], out: str, panels=DEFAULT_PANELS, labels=None,
              columns: int | None = None) -> str:
  """Draws one panel per metric (or family), one line per run and metric, `columns` panels
  a row (default: all in one); returns `out`. A run is a path (see load_rows) or its rows."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  labels = labels or [os.path.basename(os.path.normpath(r)) for r in runs]
  data = [r if isinstance(r, list) else load_rows(r) for r in runs]
  drawn = [(p, [_series(rows, p) for rows in data]) for p in panels]
  drawn = [(p, s) for p, s in drawn if any(s)]
  if not drawn:
    available = sorted({k for rows in data for r in rows for k in r} - {'step'})
    raise ValueError(f'None of the panels {list(panels)} is in {runs}; available: '
                     f'{available[:30]}')
  cols = min(columns or len(drawn), len(drawn))
  rows_ = -(-len(drawn) // cols)
  fig, axes = plt.subplots(rows_, cols, figsize=(4.5 * cols, 3.5 * rows_), squeeze=False)
  for ax in axes.flat[len(drawn):]:
    ax.set_visible(False)
  for ax, (panel, per_run) in zip(axes.flat, drawn):
    for label, series in zip(labels, per_run):
      for name, (steps, values) in series.items():
        suffix = ('' if name == panel else ' ' + name if '*' in panel else
                  ' ' + name[len(panel):].removesuffix('/top1'))
        ax.plot(steps, values, marker='.' if len(steps) < 20 else None, label=label + suffix)
    ax.set_title(panel.rstrip('/'))
    ax.set_xlabel('step')
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[1]:  # Not for one unlabelled line.
      ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(out, dpi=100)
  plt.close(fig)
  return out


def plot_utilisation(workdir: str, out: str, step: int | None = None) -> str:
  """Writes the PNG and returns its path; raises ValueError if nothing to draw."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  import numpy as np
  from mmcl.models import moe
  from mmcl.train import metrics
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
