"""Every notebook in colab/ runs top to bottom on CPU (headless, nbclient)."""

import ast
import glob
import os
import re
import subprocess
import sys

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


# Third-party modules every install has (the core dependencies) and modules
# of the checkout itself; anything else a notebook imports must be checked
# for, and installed, by its first code cell.
_CORE = {'jax', 'numpy', 'scipy', 'optax', 'flax', 'orbax', 'yaml', 'tqdm',
         'mergejax', 'experiments'}


def _imports(nb):
  src = '\n'.join(c.source for c in nb.cells if c.cell_type == 'code')
  return set(re.findall(r'^\s*(?:import|from)\s+(\w+)', src, re.M))


@pytest.mark.parametrize('path', NOTEBOOKS, ids=os.path.basename)
def test_first_cells_set_up_what_the_notebook_needs(path):
  nb = nbformat.read(path, as_version=4)
  assert nb.cells[0].cell_type == 'markdown' and nb.cells[0].source.startswith(
      '# '), 'the notebook opens with a title cell'
  setup = next(c for c in nb.cells if c.cell_type == 'code')
  needs = re.search(r'^NEEDS = (\[.*\])$', setup.source, re.M)
  assert needs, 'the first code cell lists what the notebook NEEDS'
  needs = set(ast.literal_eval(needs.group(1)))
  third_party = {m for m in _imports(nb)
                 if m not in sys.stdlib_module_names and m not in _CORE}
  assert third_party <= needs, (
      f'{os.path.basename(path)} imports {sorted(third_party - needs)} '
      'without checking for it in its first cell')
  assert 'pip' in setup.source and 'sys.path.insert(0, ROOT)' in setup.source


def _venv(tmp_path, name, *packages):
  d = tmp_path / name
  subprocess.run([sys.executable, '-m', 'venv', str(d)], check=True)
  py = str(d / 'bin' / 'python')
  subprocess.run([py, '-m', 'pip', 'install', '-q', *packages], check=True,
                 timeout=1200)
  return py


_RUN = r'''
import os, sys, nbformat, nbclient
for path in sys.argv[1:]:
  nb = nbformat.read(path, as_version=4)
  nbclient.NotebookClient(nb, timeout=600, kernel_name='python3', resources={
      'metadata': {'path': os.path.dirname(path)}}).execute()
  print('ok', os.path.basename(path), flush=True)
'''


@pytest.mark.slow
@pytest.mark.parametrize('extra', [(), ('-e', ROOT)], ids=['jupyter_only',
                                                         'mergejax_no_extras'])
def test_notebooks_run_in_fresh_venvs(tmp_path, extra):
  """From colab/, in a venv with only Jupyter, and with plain `mergejax`.

  Installs from the package index (minutes); the first cell of each notebook
  installs whatever else it needs from this checkout.
  """
  py = _venv(tmp_path, 'venv', 'nbclient', 'nbformat', 'ipykernel', *extra)
  env = dict(os.environ, JAX_PLATFORMS='cpu', MERGEJAX_PROGRESS='0',
             MPLBACKEND='Agg', PATH=f'{os.path.dirname(py)}:{os.environ["PATH"]}')
  env.pop('PYTHONPATH', None)
  out = subprocess.run([py, '-c', _RUN, *NOTEBOOKS], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=3000)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
  assert out.stdout.count('ok ') == len(NOTEBOOKS)
