"""Per-method configs: load locked, typos name the fields, every method runs."""

import glob
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mergejax as mj
from experiments.tools import sweep as sweep_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHOD_CONFIGS = sorted(
    p for p in glob.glob(os.path.join(ROOT, 'configs', 'methods', '*.py'))
    if not os.path.basename(p).startswith('_'))
NAMES = [os.path.splitext(os.path.basename(p))[0] for p in METHOD_CONFIGS]


def _variants(path):
  mod_cfg = sweep_lib.load_config(path, lock=False)
  # The variant list is the error message's "valid" list: ask for a bad one.
  with pytest.raises(ValueError, match='valid') as e:
    sweep_lib.load_config(f'{path}:variant=__nope__')
  valid = str(e.value).split('valid: ')[1].rstrip('.')
  return mod_cfg, eval(valid)  # pylint: disable=eval-used


def test_there_is_a_config_per_method():
  assert {'task_arithmetic', 'ties', 'dare_ties', 'slerp',
          'model_stock'} <= set(NAMES)


@pytest.mark.parametrize('path', METHOD_CONFIGS, ids=NAMES)
def test_config_loads_locked_and_typo_fails(path):
  name = os.path.splitext(os.path.basename(path))[0]
  cfg, variants = _variants(path)
  assert cfg.merge.method == name and cfg.experiment == 'sweep'
  for v in variants:
    c = sweep_lib.load_config(f'{path}:variant={v},zoo=smoke,sweep=False')
    assert c.is_locked and c.sweep.product == '' and c.variant == v
    with pytest.raises(AttributeError, match='method'):
      c.merge.densty = 0.3  # locked: no new fields
    with pytest.raises(KeyError, match='Did you mean|Other fields present'):
      sweep_lib.apply_overrides(c, {'merge.densty': 0.3})
  # The default sweep parses and only names existing fields.
  for point in sweep_lib.parse_sweep(cfg.sweep.product, cfg.sweep.zip):
    cfg_locked = sweep_lib.load_config(path)
    sweep_lib.apply_overrides(cfg_locked, point)


def _tiny():
  rng = np.random.default_rng(0)
  base = {'dense': {'kernel': jnp.asarray(rng.normal(size=(6, 4)), jnp.float32),
                    'bias': jnp.asarray(rng.normal(size=(4,)), jnp.float32)}}
  fts = [jax.tree.map(lambda x: x + 0.1 * jnp.asarray(
      rng.normal(size=x.shape), jnp.float32), base) for _ in range(3)]
  return base, fts


@pytest.mark.parametrize('path', METHOD_CONFIGS, ids=NAMES)
def test_config_builds_at_every_sweep_point(path):
  """The factory accepts the config's fields at its default and sweep points."""
  cfg = sweep_lib.load_config(path)
  if not hasattr(mj.methods, cfg.merge.method):
    pytest.fail(f'mergejax.methods.{cfg.merge.method} does not exist')
  for point in sweep_lib.parse_sweep(cfg.sweep.product, cfg.sweep.zip):
    c = sweep_lib.apply_overrides(cfg, point)
    tx = sweep_lib.build_method(c.merge)
    assert isinstance(tx, mj.MergeTransformation)


# A fast subset covers each code path (vmapped floats, structural ints,
# protocols no_base / sum_endpoint / fold); every config runs under -m slow.
FAST = ('task_arithmetic', 'karcher', 'slerp', 'nuslerp')


def _shrink(points):
  """The first two values of every swept name (enough to vmap)."""
  seen = {}
  for p in points:
    for k, v in p.items():
      seen.setdefault(k, [])
      if v not in seen[k] and len(seen[k]) < 2:
        seen[k].append(v)
  return [p for p in points if all(v in seen[k] for k, v in p.items())]


@pytest.mark.parametrize('path', [
    pytest.param(p, marks=() if n in FAST else pytest.mark.slow)
    for p, n in zip(METHOD_CONFIGS, NAMES)], ids=NAMES)
def test_config_merges_and_sweeps(path):
  """Each config's default point and (shrunk) default sweep run end to end."""
  from experiments import sweep as sweep_exp  # pylint: disable=g-import-not-at-top
  cfg = sweep_lib.load_config(path)
  if not hasattr(mj.methods, cfg.merge.method):
    pytest.fail(f'mergejax.methods.{cfg.merge.method} does not exist')
  base, fts = _tiny()
  key = jax.random.key(0)
  one = sweep_exp.merge_points(cfg, {}, base, fts, key)
  assert jax.tree.map(jnp.shape, one) == jax.tree.map(
      lambda x: (1,) + x.shape, base)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(one))
  points = _shrink(sweep_lib.parse_sweep(cfg.sweep.product, cfg.sweep.zip))

  def job(c, numeric):
    out = sweep_exp.merge_points(c, numeric, base, fts, key)
    n = out['dense']['bias'].shape[0]
    return [{'norm': float(jnp.linalg.norm(out['dense']['kernel'][i]))}
            for i in range(n)]

  static = [n for n in cfg.sweep.static.split(',') if n.strip()]
  res = sweep_lib.run_sweep(cfg, points, job, static=static)
  assert len(res.rows) == len(points)
  assert all(np.isfinite(r['norm']) for r in res.rows)


def test_cli_typo_names_valid_fields():
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  out = subprocess.run(
      [sys.executable, '-m', 'experiments.main',
       '--config=configs/methods/ties.py:zoo=smoke', '--workdir=/tmp/unused',
       '--config.merge.densty=0.3'],
      cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
  assert out.returncode != 0
  assert 'densty' in out.stderr and 'density' in out.stderr
  assert 'lambda_' in out.stderr  # the valid fields are listed


@pytest.mark.slow
def test_sweep_experiment_end_to_end(tmp_path):
  """The launcher runs a method sweep on a tiny zoo and writes one table."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', MERGEJAX_PROGRESS='0')
  out = subprocess.run(
      [sys.executable, '-m', 'experiments.main',
       '--config=configs/methods/ties.py:zoo=smoke', f'--workdir={tmp_path}',
       '--config.zoo.base.steps=2', '--config.zoo.finetune.steps=2',
       "--config.sweep.product=merge.density=(0.2, 1.0); merge.scope=('tensor', 'global')"],
      cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  rows = json.loads((tmp_path / 'sweep.json').read_text())
  assert len(rows) == 4 and {r['group'] for r in rows} == {0, 1}
  assert (tmp_path / 'sweep.png').exists()
  assert json.loads((tmp_path / 'results.json').read_text())['groups'] == 2
