"""The docs site builds without warnings; every method has a page."""

import os
import shutil
import subprocess
import sys

import pytest

import mergejax as mj

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELPERS = {'reconstruct', 'twin_mix', 'twin_apply', 'twin_dense', 'twin_route',
           'twin_train_router', 'fit_adamerging', 'prediction_entropy',
           'AdaMergingResult', 'concrete_mask', 'fit_concrete',
           'ConcreteResult', 'DamResult',  # documented in the API reference only
           'fit_dam',  # its page is methods/dam.md
           'fit_surgery', 'surgery_apply', 'SurgeryResult',  # methods/surgery.md
           'fit_expert_merging', 'ExpertMergingResult',  # expert_merging.md
           'importance_chunks',  # expert_merging.md
           'concrete_adamerging', 'fit_concrete_adamerging',
           'ConcreteAdaMergingResult',  # methods/concrete.md
           'wemoe_init', 'wemoe_apply', 'wemoe_gates', 'wemoe_dense',
           'fit_wemoe', 'WEMoEState', 'WEMoEResult', 'WEMoERouter',
           'PrunedTaskVectors',  # methods/wemoe.md
           'mwa_weights', 'mwa_tracker', 'mwa_optax', 'MWAState',
           'MWATracker', 'MWATrackerState', 'MWAOptaxState',  # methods/mwa.md
           't3_coefficients', 'js_divergence', 'T3Output',  # methods/t3_apply.md
           'FWResult', 'CandidatePool'}  # methods/fit_fw_merging.md


def test_every_method_has_a_page_in_the_nav():
  nav = open(os.path.join(ROOT, 'mkdocs.yml')).read()
  missing = []
  for name in dir(mj.methods):
    if name.startswith('_') or name in HELPERS:
      continue
    if not callable(getattr(mj.methods, name)):
      continue
    page = os.path.join(ROOT, 'docs', 'methods', f'{name}.md')
    if not os.path.exists(page) or f'methods/{name}.md' not in nav:
      missing.append(name)
  assert not missing, (
      f'mergejax.methods {missing} have no docs page: add docs/methods/<name>.md '
      '(formula, defaults, peer settings, "::: mergejax.methods.<name>") and '
      'list it under Methods in mkdocs.yml.')


def test_api_pages_match_the_public_namespaces():
  sys.path.insert(0, os.path.join(ROOT, 'docs', 'tools'))
  try:
    import gen_api  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.pop(0)
  stale = [page for page, *_ in gen_api.PAGES
           if open(os.path.join(ROOT, 'docs', 'api', f'{page}.md')).read()
           != gen_api.render(page)]
  assert not stale, (f'docs/api pages {stale} are out of date: run '
                     '`python docs/tools/gen_api.py`.')


def test_mkdocs_build_strict(tmp_path):
  pytest.importorskip('mkdocs')
  pytest.importorskip('mkdocstrings_handlers.python')
  mkdocs = shutil.which('mkdocs', path=os.path.dirname(sys.executable))
  cmd = ([mkdocs] if mkdocs else [sys.executable, '-m', 'mkdocs'])
  out = subprocess.run(cmd + ['build', '--strict', '-d', str(tmp_path / 'site')],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-4000:]
  assert (tmp_path / 'site' / 'methods' / 'ties' / 'index.html').exists()
  assert (tmp_path / 'site' / 'api' / 'core' / 'index.html').exists()
