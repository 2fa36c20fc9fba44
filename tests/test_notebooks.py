"""The notebooks run end to end with small settings, and their plots are in the outputs."""
import os

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize('name,images', [('zero_shot', 2), ('new_loss', 1), ('geometry', 1),
                                         ('siglip2', 2)])
def test_notebook_runs_and_shows_its_plots(name, images, shapes_data_dir, tmp_path, monkeypatch):
  monkeypatch.setenv('MMCL_NOTEBOOK_SMALL', '1')
  monkeypatch.setenv('MMCL_DATA_DIR', shapes_data_dir)
  monkeypatch.setenv('MMCL_NOTEBOOK_WORKDIR', str(tmp_path))
  monkeypatch.setenv('MPLBACKEND', 'module://matplotlib_inline.backend_inline')
  nb = nbformat.read(os.path.join(ROOT, 'notebooks', f'{name}.ipynb'), as_version=4)
  NotebookClient(nb, timeout=600, kernel_name='python3',
                 resources={'metadata': {'path': os.path.join(ROOT, 'notebooks')}}).execute()
  outputs = [o for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', [])]
  assert not [o for o in outputs if o.output_type == 'error']
  assert sum('image/png' in o.get('data', {}) for o in outputs) >= images
