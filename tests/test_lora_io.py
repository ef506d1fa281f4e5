"""LoRA extraction to PEFT files, and ``model+lora`` inputs to a merge."""

import json
import os

import numpy as np
import pytest
from mergejax import io as mio
from mergejax import testing
from mergejax.cli import _main as cli
from mergejax.io import _synthetic as synthetic


@pytest.fixture(scope='module')
def pair(tmp_path_factory):
  root = tmp_path_factory.mktemp('lora')
  conf = synthetic.llama_config(layers=2, dtype='float32')
  paths = {'base': str(root / 'base'), 'ft': str(root / 'ft')}
  synthetic.write_random_llama(paths['base'], conf, seed=0)
  base = mio.load_checkpoint(paths['base'])
  rng = np.random.default_rng(1)
  # The fine-tune moves every matrix (a decaying spectrum, so error falls
  # with rank) and one norm (which no LoRA carries).
  ft = {}
  for k, v in base.items():
    v = np.asarray(v, np.float32)
    if v.ndim == 2 and 'embed' not in k and 'lm_head' not in k:
      m, n = v.shape
      u = rng.standard_normal((m, 8)) / np.arange(1, 9) ** 1.5
      v = v + 0.05 * (u @ rng.standard_normal((8, n))).astype(np.float32)
    elif 'norm' in k and '.0.' in k:
      v = v + 0.01
    ft[k] = v
  mio.save_checkpoint(paths['ft'], ft, config=mio.CheckpointReader(
      paths['base']).config())
  paths['root'] = str(root)
  return paths


def test_error_falls_with_rank_and_full_rank_is_exact(pair, tmp_path):
  errors = []
  for r in (1, 2, 4, 8):
    out = str(tmp_path / f'r{r}')
    res = mio.extract_lora(pair['base'], pair['ft'], out, rank=r)
    errors.append(max(res.errors.values()))
    # The norm changed too: reported, not silently dropped.
    assert any('norm' in s for s in res.skipped)
    assert not any('embed' in m or 'lm_head' in m for m in res.modules)
  assert all(a > b for a, b in zip(errors, errors[1:])), errors
  assert errors[-1] < 1e-5  # the delta has rank 8
  # The adapter, merged back, is the fine-tune on every adapted weight.
  merged = mio.LoraCheckpointReader(pair['base'], str(tmp_path / 'r8'))
  ft = mio.CheckpointReader(pair['ft'])
  for name in merged.keys():
    want = ft.read(name)
    if any(name == m + '.weight' for m in res.modules):
      np.testing.assert_allclose(merged.read(name), want, atol=2e-6)
      np.testing.assert_allclose(merged.read(name, rows=3), want[:3],
                                 atol=2e-6)


def test_adapter_files_follow_peft(pair, tmp_path):
  out = str(tmp_path / 'a')
  res = mio.extract_lora(pair['base'], pair['ft'], out, rank=4)
  cfg = json.load(open(os.path.join(out, 'adapter_config.json')))
  assert cfg['peft_type'] == 'LORA' and cfg['r'] == 4 and cfg['lora_alpha'] == 4
  assert set(cfg['target_modules']) == {m.rsplit('.', 1)[-1]
                                        for m in res.modules}
  keys = mio.CheckpointReader(out)
  m = res.modules[0]
  a = keys.read(f'base_model.model.{m}.lora_A.weight')
  b = keys.read(f'base_model.model.{m}.lora_B.weight')
  n_out, n_in = mio.CheckpointReader(pair['base']).shape(m + '.weight')
  assert a.shape == (4, n_in) and b.shape == (n_out, 4)
  assert {'adapter_config.json', 'adapter_model.safetensors'} <= set(
      os.listdir(out))
  config, factors = mio.read_lora(out)
  assert set(factors) == set(res.modules)
  assert all(s == 1.0 for _, _, s in factors.values())
  # Singular values at most sv_epsilon are dropped (the delta has rank 8,
  # its spectrum decays like i^-1.5).
  small = mio.extract_lora(pair['base'], pair['ft'], str(tmp_path / 'eps'),
                           rank=8, sv_epsilon=1e9)
  _, f1 = mio.read_lora(str(tmp_path / 'eps'))
  assert all(a.shape[0] == 1 for a, _, _ in f1.values())
  assert max(small.errors.values()) > 0.1


def test_alpha_rslora_and_fan_in_fan_out(tmp_path):
  d = str(tmp_path)
  w = np.zeros((3, 2), np.float32)  # [out, in]
  mio.save_checkpoint(d + '/m', {'fc.weight': w})
  a4 = np.ones((4, 2), np.float32)
  b4 = np.arange(12.).reshape(3, 4).astype(np.float32)
  a, b = a4[:1], b4[:, :1]
  for cfg, (fa, fb), want in (
      ({'r': 1, 'lora_alpha': 4}, (a, b), 4 * b @ a),
      ({'r': 4, 'lora_alpha': 4, 'use_rslora': True}, (a4, b4), 2 * b4 @ a4),
      ({'r': 4, 'lora_alpha': 4, 'alpha_pattern': {'fc': 8}}, (a4, b4),
       2 * b4 @ a4)):
    mio.save_checkpoint(d + '/ad', {'base_model.model.fc.lora_A.weight': fa,
                                    'base_model.model.fc.lora_B.weight': fb})
    os.rename(d + '/ad/model.safetensors', d + '/ad/adapter_model.safetensors')
    json.dump({'peft_type': 'LORA', **cfg},
              open(d + '/ad/adapter_config.json', 'w'))
    np.testing.assert_allclose(
        mio.LoraCheckpointReader(d + '/m', d + '/ad').read('fc.weight'), want)
  mio.save_checkpoint(d + '/ad', {'base_model.model.fc.lora_A.weight': a,
                                  'base_model.model.fc.lora_B.weight': b})
  os.rename(d + '/ad/model.safetensors', d + '/ad/adapter_model.safetensors')
  # A GPT-2 Conv1D weight is stored [in, out]: the delta is transposed.
  mio.save_checkpoint(d + '/g', {'fc.weight': w.T})
  json.dump({'peft_type': 'LORA', 'r': 1, 'lora_alpha': 1,
             'fan_in_fan_out': True}, open(d + '/ad/adapter_config.json', 'w'))
  np.testing.assert_allclose(
      mio.LoraCheckpointReader(d + '/g', d + '/ad').read('fc.weight'),
      (b @ a).T)
  with pytest.raises(ValueError, match=r"'fc' maps \(2, 3\)"):
    mio.LoraCheckpointReader(d + '/m', d + '/ad')


def test_model_plus_lora_merges_like_the_dense_fine_tune(pair, tmp_path):
  adapter = str(tmp_path / 'full')
  res = mio.extract_lora(pair['base'], pair['ft'], adapter, rank=8)
  # The dense reference: the base with only the adapted weights moved.
  dense = mio.load_checkpoint(pair['base'])
  ft = mio.load_checkpoint(pair['ft'])
  for m in res.modules:
    dense[m + '.weight'] = ft[m + '.weight']
  ref_model = str(tmp_path / 'dense')
  mio.save_checkpoint(ref_model, dense, config=mio.CheckpointReader(
      pair['base']).config())
  outs = {}
  for label, model in (('lora', f"{pair['base']}+{adapter}"),
                       ('mapping', {'model': pair['base'], 'lora': adapter}),
                       ('dense', ref_model)):
    cfg = {'merge_method': 'task_arithmetic', 'base_model': pair['base'],
           'models': [{'model': model, 'parameters': {'weight': 0.7}}],
           'dtype': 'float32'}
    out = str(tmp_path / f'out_{label}')
    cli.run_merge(cfg, out)
    outs[label] = mio.load_checkpoint(out)
  for label in ('lora', 'mapping'):
    for k, v in outs['dense'].items():
      np.testing.assert_allclose(outs[label][k], v, atol=1e-5, err_msg=k)


def test_extraction_errors_name_the_problem(pair, tmp_path):
  with pytest.raises(ValueError, match='rank must be a positive int'):
    mio.extract_lora(pair['base'], pair['ft'], str(tmp_path / 'x'), rank=0)
  with pytest.raises(ValueError, match='nothing to extract'):
    mio.extract_lora(pair['base'], pair['base'], str(tmp_path / 'y'), rank=2)
  with pytest.raises(ValueError, match='not a PEFT adapter'):
    mio.LoraCheckpointReader(pair['base'], pair['ft'])


def test_cli_extract_lora(pair, tmp_path, capsys):
  out = str(tmp_path / 'cli')
  assert cli.main(['extract-lora', pair['base'], pair['ft'], out,
                   '--rank', '2', '--include', '*mlp*']) == 0
  report = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
  _, factors = mio.read_lora(out)
  assert report['modules'] == len(factors) > 0
  assert all('mlp' in m for m in factors)
  assert any('self_attn' in s for s in report['not_carried'])
  # A second run refuses to replace it without --overwrite.
  assert cli.main(['extract-lora', pair['base'], pair['ft'], out,
                   '--rank', '2']) == 2


@pytest.mark.peer
def test_extract_lora_matches_mergekit(pair, tmp_path):
  """The same products B A, ranks and config as ``mergekit-extract-lora``."""
  testing.require_peer('mergekit')
  from mergekit.scripts import extract_lora as mk  # pylint: disable=g-import-not-at-top
  os.environ.setdefault('HF_HUB_OFFLINE', '1')
  theirs, ours = str(tmp_path / 'mergekit'), str(tmp_path / 'ours')
  mk.main.main(['--model', pair['ft'], '--base-model', pair['base'],
                '--out-path', theirs, '--max-rank', '4'],
               standalone_mode=False)
  res = mio.extract_lora(pair['base'], pair['ft'], ours, rank=4)
  cfg_t = json.load(open(os.path.join(theirs, 'adapter_config.json')))
  cfg_o = json.load(open(os.path.join(ours, 'adapter_config.json')))
  for key in ('r', 'lora_alpha', 'use_rslora'):
    assert cfg_o[key] == cfg_t[key], key
  assert set(cfg_o['target_modules']) <= set(cfg_t['target_modules'])
  t = mio.CheckpointReader(theirs)
  for m in res.modules:
    a = t.read(f'base_model.model.{m}.lora_A.weight').astype(np.float32)
    b = t.read(f'base_model.model.{m}.lora_B.weight').astype(np.float32)
    _, fo = mio.read_lora(ours)
    a2, b2, _ = fo[m]
    np.testing.assert_allclose(b2 @ a2, b @ a, atol=1e-5, err_msg=m)


@pytest.mark.peer
def test_peft_merges_our_adapter_to_what_we_read(pair, tmp_path):
  """PEFT's merge_and_unload of the adapter equals LoraCheckpointReader."""
  testing.require_peer('peft')
  import peft  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  adapter = str(tmp_path / 'a')
  res = mio.extract_lora(pair['base'], pair['ft'], adapter, rank=3)
  model = transformers.AutoModelForCausalLM.from_pretrained(
      pair['base'], torch_dtype=torch.float32)
  merged = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload()
  state = {k: v.detach().numpy() for k, v in merged.state_dict().items()}
  ours = mio.LoraCheckpointReader(pair['base'], adapter)
  for m in res.modules:
    np.testing.assert_allclose(state[m + '.weight'], ours.read(m + '.weight'),
                               atol=1e-6, err_msg=m)
