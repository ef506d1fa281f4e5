"""Every notebook in colab/ runs top to bottom on CPU (headless, nbclient)."""

import glob
import os

import pytest

nbformat = pytest.importorskip('nbformat')
nbclient = pytest.importorskip('nbclient')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, 'colab', '*.ipynb')))


def test_there_are_notebooks():
  names = {os.path.basename(p) for p in NOTEBOOKS}
  assert {'01_quickstart.ipynb', '02_custom_pipeline.ipynb',
          '03_sweep_vmap.ipynb', '04_rebasin.ipynb',
          '05_llm_safetensors_sharded.ipynb'} <= names


@pytest.mark.parametrize('path', NOTEBOOKS, ids=os.path.basename)
def test_committed_without_outputs(path):
  nb = nbformat.read(path, as_version=4)
  for cell in nb.cells:
    if cell.cell_type == 'code':
      assert not cell.outputs and cell.execution_count is None, (
          f'{os.path.basename(path)} has outputs; clear them before committing '
          '(jupyter nbconvert --clear-output --inplace colab/*.ipynb).')


@pytest.mark.parametrize('path', NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, tmp_path):
  nb = nbformat.read(path, as_version=4)
  env_before = dict(os.environ)
  # CPU only, and no progress bars in the captured output.
  os.environ.update(JAX_PLATFORMS='cpu', MERGEJAX_PROGRESS='0',
                    MPLBACKEND='Agg')
  try:
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name='python3',
        resources={'metadata': {'path': os.path.dirname(path)}})
    client.execute()
  finally:
    os.environ.clear()
    os.environ.update(env_before)
  errors = [o for c in nb.cells if c.cell_type == 'code' for o in c.outputs
            if o.output_type == 'error']
  assert not errors
