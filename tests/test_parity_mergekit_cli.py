"""`mergejax merge` == `mergekit-yaml` on the same YAML (bf16 tolerance).

mergekit runs in-process (``mergekit.merge.run_merge``) on tiny random
Llama-shaped checkpoints (hidden 64, 4 layers; ``LlamaForCausalLM`` so that
mergekit uses its Llama architecture definition). Trim-based methods use fp32
inputs: bf16 task vectors tie in magnitude and mergekit's argsort breaks ties
in an unspecified order.
"""

import os

import numpy as np
import pytest
import yaml

from mergejax import cli
from mergejax.testing import require_peer
from mergejax.io import _safetensors as st
from mergejax.io import _synthetic as synthetic

pytestmark = pytest.mark.peer




@pytest.fixture(scope='module')
def ckpts(tmp_path_factory):
  root = tmp_path_factory.mktemp('parity')
  out = {}
  for dt in ('bfloat16', 'float32'):
    # fp32 checkpoints feed the trim methods, whose compiled merge is the
    # slow part: vocab = intermediate = hidden leaves two distinct shapes.
    small = dict(vocab=64, intermediate=64) if dt == 'float32' else {}
    conf = synthetic.llama_config(dtype=dt, layers=4, **small)
    d = {'base': str(root / dt / 'base')}
    synthetic.write_random_llama(d['base'], conf, seed=0)
    for i in (1, 2, 3):
      d[f'ft{i}'] = str(root / dt / f'ft{i}')
      synthetic.write_random_llama(d[f'ft{i}'], conf, seed=i, base_seed=0,
                                   delta_scale=0.3)
    out[dt] = d
  return out


def _run_mergekit(config: dict, out: str) -> None:
  require_peer('mergekit')
  from mergekit.config import MergeConfiguration  # pylint: disable=g-import-not-at-top
  from mergekit.merge import run_merge  # pylint: disable=g-import-not-at-top
  from mergekit.options import MergeOptions  # pylint: disable=g-import-not-at-top
  os.environ.setdefault('HF_HUB_OFFLINE', '1')
  run_merge(MergeConfiguration.model_validate(config), out,
            options=MergeOptions(copy_tokenizer=False, lazy_unpickle=False,
                                 quiet=True, random_seed=0))


def _compare(a_dir: str, b_dir: str, *, rtol: float = 2**-7,
             max_bad: float = 0.0) -> None:
  a, b = st.load_checkpoint(a_dir), st.load_checkpoint(b_dir)
  assert sorted(a) == sorted(b)
  for k in a:
    assert a[k].shape == b[k].shape, k
    assert a[k].dtype == b[k].dtype, (k, a[k].dtype, b[k].dtype)
    x, y = a[k].astype(np.float32), b[k].astype(np.float32)
    # One bf16 ulp (2^-8 relative) of rounding either way, plus fp32 noise.
    tol = rtol * np.maximum(np.abs(x), np.abs(y)) + 1e-6
    bad = np.mean(np.abs(x - y) > tol)
    assert bad <= max_bad, (k, bad, np.max(np.abs(x - y)))


def _yaml(cfg, paths):
  text = yaml.safe_dump(cfg)
  for name, p in paths.items():
    text = text.replace(f'@{name}@', p)
  return yaml.safe_load(text)


GRAD = [1.0, 0.3, 0.7]
FILT = [{'filter': 'mlp', 'value': 0.6}, {'filter': 'self_attn',
                                          'value': [0.2, 0.9]},
        {'value': 0.4}]

CASES = {
    'linear': ('bfloat16', {
        'merge_method': 'linear',
        'models': [{'model': '@ft1@', 'parameters': {'weight': GRAD}},
                   {'model': '@ft2@', 'parameters': {'weight': FILT}}],
        'dtype': 'float32', 'out_dtype': 'bfloat16'}),
    'task_arithmetic': ('bfloat16', {
        'merge_method': 'task_arithmetic', 'base_model': '@base@',
        'models': [{'model': '@ft1@', 'parameters': {'weight': FILT}},
                   {'model': '@ft2@', 'parameters': {'weight': GRAD}},
                   {'model': '@ft3@', 'parameters': {'weight': 0.5}}],
        'parameters': {'lambda': [0.5, 1.0], 'normalize': True},
        'dtype': 'float32', 'out_dtype': 'bfloat16'}),
    'ties': ('float32', {
        'merge_method': 'ties', 'base_model': '@base@',
        'models': [{'model': '@ft1@',
                    'parameters': {'weight': 1.0, 'density': [0.9, 0.3]}},
                   {'model': '@ft2@',
                    'parameters': {'weight': FILT, 'density': 0.5}},
                   {'model': '@ft3@',
                    'parameters': {'weight': 0.7, 'density': FILT}}],
        'parameters': {'lambda': 0.9},
        'dtype': 'float32', 'out_dtype': 'bfloat16'}),
    'breadcrumbs_ties': ('float32', {
        'merge_method': 'breadcrumbs_ties', 'base_model': '@base@',
        'models': [{'model': '@ft1@', 'parameters': {
            'weight': 1.0, 'density': 0.8, 'gamma': [0.0, 0.05]}},
                   {'model': '@ft2@', 'parameters': {
                       'weight': 0.5, 'density': 0.6, 'gamma': 0.02}}],
        'dtype': 'float32'}),
    'sce': ('float32', {
        'merge_method': 'sce', 'base_model': '@base@',
        'models': [{'model': '@ft1@'}, {'model': '@ft2@'}, {'model': '@ft3@'}],
        'parameters': {'select_topk': [0.3, 0.8]}, 'dtype': 'float32'}),
    'model_stock': ('bfloat16', {
        'merge_method': 'model_stock', 'base_model': '@base@',
        'models': [{'model': '@ft1@'}, {'model': '@ft2@'}, {'model': '@ft3@'}],
        'dtype': 'float32', 'out_dtype': 'bfloat16'}),
    'nuslerp': ('bfloat16', {
        'merge_method': 'nuslerp', 'base_model': '@base@',
        'models': [{'model': '@ft1@', 'parameters': {'weight': GRAD}},
                   {'model': '@ft2@', 'parameters': {'weight': 0.5}}],
        'dtype': 'float32', 'out_dtype': 'bfloat16'}),
    'multislerp': ('bfloat16', {
        'merge_method': 'multislerp', 'base_model': '@base@',
        'models': [{'model': '@ft1@', 'parameters': {'weight': GRAD}},
                   {'model': '@ft2@', 'parameters': {'weight': FILT}},
                   {'model': '@ft3@', 'parameters': {'weight': 0.5}}],
        'dtype': 'float32', 'out_dtype': 'bfloat16'}),
    'karcher': ('bfloat16', {
        'merge_method': 'karcher',
        'models': [{'model': '@ft1@'}, {'model': '@ft2@'}, {'model': '@ft3@'}],
        'dtype': 'float32', 'out_dtype': 'bfloat16'}),
    'nearswap': ('bfloat16', {
        'merge_method': 'nearswap', 'base_model': '@base@',
        'models': [{'model': '@ft1@'}],
        'parameters': {'t': [0.05, 0.3]},
        'dtype': 'float32', 'out_dtype': 'bfloat16'}),
    'breadcrumbs': ('float32', {
        'merge_method': 'breadcrumbs', 'base_model': '@base@',
        'models': [{'model': '@ft1@', 'parameters': {
            'weight': 1.0, 'density': 0.7, 'gamma': 0.05}},
                   {'model': '@ft2@', 'parameters': {
                       'weight': FILT, 'density': [0.5, 0.9]}}],
        'dtype': 'float32'}),
    'slerp': ('bfloat16', {
        'merge_method': 'slerp', 'base_model': '@base@',
        'models': [{'model': '@base@'}, {'model': '@ft1@'}],
        'parameters': {'t': [{'filter': 'self_attn', 'value': [0, 0.5, 1]},
                             {'filter': 'mlp', 'value': [1, 0.5, 0]},
                             {'value': 0.5}]},
        'dtype': 'float32', 'out_dtype': 'bfloat16'}),
    'slices_task_arithmetic': ('bfloat16', {
        'merge_method': 'task_arithmetic', 'base_model': '@base@',
        'slices': [
            {'sources': [
                {'model': '@base@', 'layer_range': [0, 2]},
                {'model': '@ft1@', 'layer_range': [0, 2],
                 'parameters': {'weight': GRAD}},
                {'model': '@ft2@', 'layer_range': [2, 4],
                 'parameters': {'weight': FILT}}]},
            {'sources': [
                {'model': '@base@', 'layer_range': [1, 4]},
                {'model': '@ft1@', 'layer_range': [1, 4],
                 'parameters': {'weight': 0.3}},
                {'model': '@ft2@', 'layer_range': [0, 3],
                 'parameters': {'weight': [0.1, 1.0]}}],
             'parameters': {'lambda': 0.5}}],
        'parameters': {'lambda': 0.8},
        'dtype': 'float32', 'out_dtype': 'bfloat16'}),
    'slices_slerp': ('bfloat16', {
        'merge_method': 'slerp', 'base_model': '@base@',
        'slices': [{'sources': [{'model': '@base@', 'layer_range': [0, 3]},
                                {'model': '@ft2@', 'layer_range': [1, 4]}]},
                   {'sources': [{'model': '@base@', 'layer_range': [3, 4]},
                                {'model': '@ft2@', 'layer_range': [3, 4]}]}],
        'parameters': {'t': [0.1, 0.9]},
        'dtype': 'float32', 'out_dtype': 'bfloat16'}),
}


FAST = ('linear', 'task_arithmetic', 'ties', 'slerp', 'slices_task_arithmetic',
        'slices_slerp')


@pytest.mark.parametrize('case', [
    c if c in FAST else pytest.param(c, marks=pytest.mark.slow)
    for c in sorted(CASES)])
def test_cli_matches_mergekit(case, ckpts, tmp_path):
  dt, cfg = CASES[case]
  cfg = _yaml(cfg, ckpts[dt])
  _run_mergekit(cfg, str(tmp_path / 'mergekit'))
  path = tmp_path / 'config.yml'
  path.write_text(yaml.safe_dump(cfg))
  assert cli.main(['merge', str(path), str(tmp_path / 'mergejax'),
                   '--quiet']) == 0
  _compare(str(tmp_path / 'mergekit'), str(tmp_path / 'mergejax'))
  # Same output layout: file names and the config's layer count / dtype.
  mk = {f for f in os.listdir(tmp_path / 'mergekit')
        if f.endswith(('.safetensors', '.json'))}
  mj = {f for f in os.listdir(tmp_path / 'mergejax')
        if f.endswith(('.safetensors', '.json'))}
  assert 'mergekit_config.yml' in os.listdir(tmp_path / 'mergejax')
  assert mk == mj
  c_mk = st.CheckpointReader(str(tmp_path / 'mergekit')).config()
  c_mj = st.CheckpointReader(str(tmp_path / 'mergejax')).config()
  assert c_mk['num_hidden_layers'] == c_mj['num_hidden_layers']
