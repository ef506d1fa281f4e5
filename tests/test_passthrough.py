"""passthrough: model copies, layer stacking and scaled tensors (mergekit's)."""

import os

import jax.numpy as jnp
import numpy as np
import pytest

import mergejax as mj
from mergejax import io as mio
from mergejax import testing
from mergejax.cli import _main as cli
from mergejax.io import _synthetic as synthetic


@pytest.fixture(scope='module')
def models(tmp_path_factory):
  root = tmp_path_factory.mktemp('passthrough')
  conf = synthetic.llama_config(layers=4, dtype='float32', vocab=64,
                                intermediate=64)
  out = {}
  for i, name in enumerate(('a', 'b')):
    out[name] = str(root / name)
    synthetic.write_random_llama(out[name], conf, seed=i)
  return out


def test_one_model_scaled_and_more_refused():
  m = {'w': jnp.array([4., -2.])}
  np.testing.assert_allclose(mj.merge(mj.methods.passthrough(), None, [m])['w'],
                             [4., -2.])
  np.testing.assert_allclose(
      mj.merge(mj.methods.passthrough([0.5]), None, [m])['w'], [2., -1.])
  with pytest.raises(ValueError, match='exactly one model per tensor, got 2'):
    mj.merge(mj.methods.passthrough(), None, [m, m])


STACK = {
    'merge_method': 'passthrough', 'dtype': 'float32',
    'slices': [{'sources': [{'model': 'A', 'layer_range': [0, 3]}]},
               {'sources': [{'model': 'B', 'layer_range': [1, 4]}]}],
}
SCALED = {
    'merge_method': 'passthrough', 'dtype': 'float32',
    'slices': [{'sources': [{'model': 'A', 'layer_range': [0, 4],
                             'parameters': {'scale': [
                                 {'filter': 'o_proj', 'value': 0.5},
                                 {'filter': 'down_proj', 'value': 0.25},
                                 {'value': 1.0}]}}]}],
}


def _config(template, models):
  text = repr(template).replace("'A'", repr(models['a'])).replace(
      "'B'", repr(models['b']))
  return eval(text)  # pylint: disable=eval-used


def test_layer_stacking_takes_each_layer_from_its_source(models, tmp_path):
  out = str(tmp_path / 'stack')
  cli.run_merge(_config(STACK, models), out)
  got = mio.load_checkpoint(out)
  a, b = mio.load_checkpoint(models['a']), mio.load_checkpoint(models['b'])
  # Output layers 0-2 are A's 0-2, layers 3-5 are B's 1-3.
  for j, (src, i) in enumerate([(a, 0), (a, 1), (a, 2), (b, 1), (b, 2),
                                (b, 3)]):
    for k in ('self_attn.q_proj.weight', 'mlp.down_proj.weight',
              'input_layernorm.weight'):
      np.testing.assert_array_equal(got[f'model.layers.{j}.{k}'],
                                    src[f'model.layers.{i}.{k}'])
  assert 'model.layers.6.self_attn.q_proj.weight' not in got
  # Non-layer tensors come from the first / last slice's model.
  np.testing.assert_array_equal(got['model.embed_tokens.weight'],
                                a['model.embed_tokens.weight'])
  assert mio.CheckpointReader(out).config()['num_hidden_layers'] == 6


def test_scale_with_filters(models, tmp_path):
  out = str(tmp_path / 'scaled')
  cli.run_merge(_config(SCALED, models), out)
  got, a = mio.load_checkpoint(out), mio.load_checkpoint(models['a'])
  for k, v in a.items():
    s = (0.5 if 'o_proj' in k else 0.25 if 'down_proj' in k else 1.0)
    np.testing.assert_allclose(got[k], s * np.asarray(v), rtol=1e-6,
                               err_msg=k)


def test_every_layer_count_key_follows_the_stack(tmp_path):
  # A GPT-2-style config spells the layer count n_layer.
  d = str(tmp_path)
  rng = np.random.default_rng(0)
  tensors = {f'transformer.h.{i}.mlp.c_fc.weight':
             rng.standard_normal((4, 8)).astype(np.float32) for i in range(2)}
  tensors['transformer.wte.weight'] = np.ones((16, 4), np.float32)
  mio.save_checkpoint(d + '/g', tensors, config={
      'architectures': ['GPT2LMHeadModel'], 'model_type': 'gpt2',
      'n_layer': 2, 'n_embd': 4, 'text_config': {'num_hidden_layers': 2}})
  cfg = {'merge_method': 'passthrough', 'dtype': 'float32',
         'slices': [{'sources': [{'model': d + '/g', 'layer_range': [0, 2]}]},
                    {'sources': [{'model': d + '/g', 'layer_range': [0, 2]}]}]}
  cli.run_merge(cfg, d + '/out')
  conf = mio.CheckpointReader(d + '/out').config()
  assert conf['n_layer'] == 4 and conf['text_config']['num_hidden_layers'] == 4
  assert len([k for k in mio.load_checkpoint(d + '/out') if '.h.' in k]) == 4


def test_two_sources_in_a_passthrough_slice_are_refused(models, tmp_path):
  cfg = _config(STACK, models)
  cfg['slices'][0]['sources'].append({'model': models['b'],
                                      'layer_range': [0, 3]})
  with pytest.raises(ValueError, match='exactly one model'):
    cli.run_merge(cfg, str(tmp_path / 'two'))
  assert not os.path.exists(tmp_path / 'two')


@pytest.mark.peer
@pytest.mark.parametrize('template', [STACK, SCALED], ids=['stack', 'scaled'])
def test_passthrough_matches_mergekit(models, tmp_path, template):
  testing.require_peer('mergekit')
  from mergekit.config import MergeConfiguration  # pylint: disable=g-import-not-at-top
  from mergekit.merge import run_merge  # pylint: disable=g-import-not-at-top
  from mergekit.options import MergeOptions  # pylint: disable=g-import-not-at-top
  os.environ.setdefault('HF_HUB_OFFLINE', '1')
  cfg = _config(template, models)
  theirs, ours = str(tmp_path / 'mergekit'), str(tmp_path / 'ours')
  run_merge(MergeConfiguration.model_validate(cfg), theirs,
            options=MergeOptions(copy_tokenizer=False, lazy_unpickle=False,
                                 quiet=True))
  cli.run_merge(cfg, ours)
  t, o = mio.load_checkpoint(theirs), mio.load_checkpoint(ours)
  assert sorted(t) == sorted(o)
  for k in t:
    np.testing.assert_allclose(np.asarray(o[k], np.float32),
                               np.asarray(t[k], np.float32), rtol=1e-6,
                               atol=1e-7, err_msg=k)
  assert (mio.CheckpointReader(ours).config()['num_hidden_layers'] ==
          mio.CheckpointReader(theirs).config()['num_hidden_layers'])
