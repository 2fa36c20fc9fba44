"""tools/plot.py's library: curves of several runs, and clear errors."""
import json

import pytest

from mmcl.train import plots


def _run(path, scale):
  path.mkdir()
  with open(path / 'metrics.jsonl', 'w') as f:
    for step in range(1, 11):
      f.write(json.dumps({'step': step, 'train/loss': scale / step, 'train/lr': 1e-3,
                          'train/t': 10.0 + step}) + '\n')
    f.write(json.dumps({'step': 10, 'zeroshot/shapes/shape/top1': 0.5 * scale,
                        'zeroshot/shapes/color/top1': 0.9}) + '\n')
  return str(path)


def test_plots_several_runs(tmp_path):
  runs = [_run(tmp_path / 'a', 1.0), _run(tmp_path / 'b', 2.0)]
  out = plots.plot_runs(runs, str(tmp_path / 'cmp.png'))
  data = open(out, 'rb').read()
  assert data.startswith(b'\x89PNG') and len(data) > 10_000
  assert plots._series(plots.load_rows(runs[0]), 'zeroshot/').keys() == {
      'zeroshot/shapes/color/top1', 'zeroshot/shapes/shape/top1'}


def test_missing_metrics_are_clear_errors(tmp_path):
  run = _run(tmp_path / 'a', 1.0)
  with pytest.raises(ValueError, match=r"None of the panels \['retrieval/'\].*train/loss"):
    plots.plot_runs([run], str(tmp_path / 'x.png'), panels=('retrieval/',))
  with pytest.raises(FileNotFoundError, match='No metrics file'):
    plots.load_rows(str(tmp_path / 'nope'))
