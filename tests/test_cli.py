"""`mergejax merge` CLI and the mergekit YAML reader."""

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import yaml

import mergejax as mj
from mergejax import cli
from mergejax.cli import _mergekit_config as mc
from mergejax.io import _atomic as atomic
from mergejax.io import _safetensors as st
from mergejax.io import _synthetic as synthetic


# ------------------------------------------------------------- YAML reader --

def test_gradient_interpolation_matches_reference_example():
  # shared/reference §20.8: layer 20 of 40 with density [1, 0.7, 0.1].
  t = 20 / 39
  v = mc.evaluate_setting([1, 0.7, 0.1], t, 'model.layers.20.mlp.x')
  assert v == pytest.approx(0.7 - (2 * t - 1) * 0.6)
  assert mc.evaluate_setting([1, 0.7, 0.1], 0.0, 'x') == 1
  assert mc.evaluate_setting([1, 0.7, 0.1], 1.0, 'x') == 0.1
  # Non-numeric lists pick without interpolation.
  assert mc.evaluate_setting([True, False], 0.6, 'x') is True
  assert mc.evaluate_setting([], 0.5, 'x') is mc._MISSING  # pylint: disable=protected-access


def test_filters_first_match_wins_and_nest():
  s = [{'filter': 'self_attn', 'value': [0.0, 1.0]},
       {'filter': 'mlp', 'value': 0.5}, {'value': 0.1}]
  assert mc.evaluate_setting(s, 0.5, 'model.layers.3.self_attn.q') == 0.5
  assert mc.evaluate_setting(s, 0.5, 'model.layers.3.mlp.up') == 0.5
  assert mc.evaluate_setting(s, 0.5, 'model.norm.weight') == 0.1
  # An unfiltered entry first shadows everything after it.
  assert mc.evaluate_setting([{'value': 2}, {'filter': 'mlp', 'value': 3}],
                             0, 'mlp') == 2
  assert mc.evaluate_setting({'filter': 'x', 'value': 1}, 0, 'y') is mc._MISSING  # pylint: disable=protected-access


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  root = tmp_path_factory.mktemp('cli')
  conf = synthetic.llama_config(layers=4, dtype='bfloat16')
  paths = {'base': str(root / 'base')}
  synthetic.write_random_llama(paths['base'], conf, seed=0)
  for i in (1, 2):
    paths[f'ft{i}'] = str(root / f'ft{i}')
    synthetic.write_random_llama(paths[f'ft{i}'], conf, seed=i, base_seed=0)
  return paths


def _names(path):
  return st.CheckpointReader(path).keys()


def _plan(cfg):
  parsed = mc.load_config(cfg)
  readers = {m: st.CheckpointReader(m) for m in parsed.referenced_models()}
  return mc.plan(parsed, lambda m: readers[m].keys(),
                 lambda m: readers[m].config())


def test_precedence_and_layer_position(tiny):
  cfg = {'merge_method': 'ties', 'base_model': tiny['base'],
         'slices': [{'sources': [
             {'model': tiny['base'], 'layer_range': [0, 3]},
             {'model': tiny['ft1'], 'layer_range': [1, 4],
              'parameters': {'density': [0.2, 0.8]}},
             {'model': tiny['ft2'], 'layer_range': [0, 3]}],
                     'parameters': {'weight': 0.5, 'lambda': 2.0}}],
         'parameters': {'weight': 0.9, 'density': 0.4, 'lambda': 3.0,
                        'normalize': False}}
  tasks, n_layers = _plan(cfg)
  assert n_layers == 3
  by = {t.out_name: t for t in tasks}
  t = by['model.layers.1.mlp.up_proj.weight']
  assert t.t == 0.5
  # ft1 reads its layer 2; the base and ft2 read layer 1.
  assert [n for _, n in t.inputs] == ['model.layers.1.mlp.up_proj.weight',
                                      'model.layers.2.mlp.up_proj.weight',
                                      'model.layers.1.mlp.up_proj.weight']
  assert t.base_index == 0 and t.per_model[0] == {}
  # Source > slice > top level > default.
  assert t.per_model[1]['density'] == pytest.approx(0.5)
  assert t.per_model[2]['density'] == 0.4
  assert t.per_model[1]['weight'] == t.per_model[2]['weight'] == 0.5
  assert t.shared['lambda'] == 2.0 and t.shared['normalize'] is False
  assert t.shared['rescale'] is False  # the method default
  # Non-layer tensors: t = 0.
  assert by['model.embed_tokens.weight'].t == 0
  assert by['model.embed_tokens.weight'].per_model[1]['density'] == 0.2
  assert by['model.layers.2.self_attn.q_proj.weight'].t == 1.0
  assert [t.out_name for t in tasks][0] == 'model.embed_tokens.weight'
  assert tasks[-1].out_name in ('lm_head.weight', 'model.norm.weight')


def test_unknown_parameter_warns_and_required_missing_raises(tiny):
  cfg = {'merge_method': 'task_arithmetic', 'base_model': tiny['base'],
         'models': [{'model': tiny['ft1'], 'parameters': {'weigth': 1.0}}]}
  with pytest.warns(UserWarning, match="'weigth' is not used"):
    parsed = mc.load_config(cfg)
  del parsed
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    with pytest.raises(ValueError, match="needs parameter 'weight' for model"):
      _plan(cfg)
  with pytest.raises(ValueError, match='Unknown merge_method'):
    mc.load_config({'merge_method': 'tie', 'models': []})
  with pytest.raises(ValueError, match='exactly one of'):
    mc.load_config({'merge_method': 'ties'})
  with pytest.raises(FileNotFoundError, match='does not download'):
    mc.load_config({'merge_method': 'linear', 'models': [
        {'model': 'org/not-here', 'parameters': {'weight': 1}}]})


# --------------------------------------------------------------------- CLI --

def _write_cfg(tmp_path, cfg):
  p = tmp_path / 'cfg.yml'
  p.write_text(yaml.safe_dump(cfg))
  return str(p)


def test_cli_layout_dtype_and_shards(tiny, tmp_path):
  cfg = {'merge_method': 'linear',
         'models': [{'model': tiny['ft1'], 'parameters': {'weight': 1.0}},
                    {'model': tiny['ft2'], 'parameters': {'weight': 3.0}}],
         'dtype': 'bfloat16'}
  out = str(tmp_path / 'out')
  rc = cli.main(['merge', _write_cfg(tmp_path, cfg), out, '--dtype',
                 'float16', '--out-shard-size', '40K', '--quiet'])
  assert rc == 0
  files = sorted(os.listdir(out))
  assert st.INDEX_NAME in files and 'config.json' in files
  assert any(f.startswith('model-00001-of-') for f in files)
  conf = json.load(open(os.path.join(out, 'config.json')))
  assert conf['torch_dtype'] == 'float16'
  r = st.CheckpointReader(out)
  assert {r.dtype(k) for k in r.keys()} == {np.dtype(np.float16)}
  a = st.load_checkpoint(tiny['ft1'], dtype='float32')
  b = st.load_checkpoint(tiny['ft2'], dtype='float32')
  k = 'model.layers.2.mlp.up_proj.weight'
  np.testing.assert_allclose(r.read(k).astype(np.float32),
                             (a[k] + 3 * b[k]) / 4, rtol=2**-8, atol=1e-3)
  # The output exists: a second run refuses without --overwrite.
  assert cli.main(['merge', _write_cfg(tmp_path, cfg), out, '--quiet']) == 2
  assert cli.main(['merge', _write_cfg(tmp_path, cfg), out, '--quiet',
                   '--overwrite']) == 0


@pytest.mark.parametrize('out', ['', '.', '..', 'INPUTS'])
def test_cli_refuses_dangerous_output_paths(tiny, tmp_path, monkeypatch,
                                            capsys, out):
  # An unset $OUT ('') or '.' with --overwrite must not replace the working
  # directory; nor may the output hold an input model.
  work = tmp_path / 'work' / 'sub'
  work.mkdir(parents=True)
  (work / 'keep.txt').write_text('keep')
  monkeypatch.chdir(work)
  cfg = _write_cfg(tmp_path, {'merge_method': 'linear', 'models': [
      {'model': tiny['ft1'], 'parameters': {'weight': 1.0}},
      {'model': tiny['ft2'], 'parameters': {'weight': 1.0}}]})
  if out == 'INPUTS':
    out = os.path.dirname(tiny['ft1'])
  before = sorted(os.listdir(os.path.dirname(tiny['ft1'])))
  assert cli.main(['merge', cfg, out, '--quiet', '--overwrite']) == 2
  assert 'Output path' in capsys.readouterr().err
  assert sorted(os.listdir(work)) == ['keep.txt']
  assert sorted(os.listdir(os.path.dirname(tiny['ft1']))) == before


def test_cli_overwrite_only_replaces_its_own_output(tiny, tmp_path):
  cfg = _write_cfg(tmp_path, {'merge_method': 'linear', 'models': [
      {'model': tiny['ft1'], 'parameters': {'weight': 1.0}},
      {'model': tiny['ft2'], 'parameters': {'weight': 1.0}}]})
  other = tmp_path / 'data'
  other.mkdir()
  (other / 'results.csv').write_text('1,2,3')
  assert cli.main(['merge', cfg, str(other), '--quiet', '--overwrite']) == 2
  assert os.listdir(other) == ['results.csv']
  out = str(tmp_path / 'merged')
  assert cli.main(['merge', cfg, out, '--quiet']) == 0
  assert cli.main(['merge', cfg, out, '--quiet', '--overwrite']) == 0


def _variant(tiny, tmp_path, name, drop=(), vocab=None, tie=False):
  """A copy of ft1 with tensors dropped or a different vocabulary."""
  src = st.load_checkpoint(tiny['ft1'])
  conf = st.CheckpointReader(tiny['ft1']).config()
  for k in drop:
    src.pop(k)
  if vocab is not None:
    for k in ('model.embed_tokens.weight', 'lm_head.weight'):
      src[k] = np.resize(src[k], (vocab, src[k].shape[1]))
    conf = {**conf, 'vocab_size': vocab}
  if tie:
    conf = {**conf, 'tie_word_embeddings': True}
  out = str(tmp_path / name)
  st.save_checkpoint(out, src, config=conf)
  return out


def test_missing_tied_and_vocab_mismatch(tiny, tmp_path, capsys):
  def run(ft, *flags):
    cfg = {'merge_method': 'task_arithmetic', 'base_model': tiny['base'],
           'models': [{'model': ft, 'parameters': {'weight': 1.0}}]}
    return cli.main(['merge', _write_cfg(tmp_path, cfg),
                     str(tmp_path / 'out'), '--quiet', '--overwrite', *flags])

  # Tied embeddings: a model without lm_head uses its embedding, so with
  # weight 1 the merged lm_head is base + (embedding - base) = the embedding.
  tied = _variant(tiny, tmp_path, 'tied', drop=['lm_head.weight'], tie=True)
  assert run(tied) == 0
  out = st.load_checkpoint(str(tmp_path / 'out'), dtype='float32')
  ft = st.load_checkpoint(tied, dtype='float32')
  np.testing.assert_allclose(out['lm_head.weight'],
                             ft['model.embed_tokens.weight'], atol=1e-2)
  # A missing tensor with no tied partner.
  missing = _variant(tiny, tmp_path, 'miss',
                     drop=['model.layers.1.mlp.up_proj.weight'])
  assert run(missing) == 2
  assert "'model.layers.1.mlp.up_proj.weight'" in capsys.readouterr().err
  # Vocabulary mismatch: explicit error, or crop with the unsafe flag.
  big = _variant(tiny, tmp_path, 'big', vocab=300)
  assert run(big) == 2
  err = capsys.readouterr().err
  assert 'Vocabulary size mismatch' in err and '300' in err
  with pytest.warns(UserWarning, match='keeping the first 256 rows'):
    assert run(big, '--unsafe-truncate-embeddings') == 0
  assert st.CheckpointReader(str(tmp_path / 'out')).shape(
      'model.embed_tokens.weight') == (256, 64)


def test_killed_merge_leaves_nothing_complete_and_rerun_succeeds(tiny,
                                                                 tmp_path):
  cfg = {'merge_method': 'task_arithmetic', 'base_model': tiny['base'],
         'models': [{'model': tiny['ft1'], 'parameters': {'weight': 1.0}},
                    {'model': tiny['ft2'], 'parameters': {'weight': 0.5}}]}
  path = _write_cfg(tmp_path, cfg)
  out = tmp_path / 'out'
  env = {**os.environ, 'MERGEJAX_DEBUG_WRITE_DELAY': '0.05',
         'JAX_PLATFORMS': 'cpu'}
  proc = subprocess.Popen(
      [sys.executable, '-m', 'mergejax.cli', 'merge', path, str(out),
       '--quiet', '--out-shard-size', '30K'], env=env,
      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  tmp = tmp_path / f'.out.mergejax-tmp-{proc.pid}'
  deadline = time.time() + 60
  # Wait until at least two shards have been started, then kill -9.
  while time.time() < deadline:
    if tmp.exists() and len([f for f in os.listdir(tmp)
                             if f.endswith('.safetensors')]) >= 2:
      break
    assert proc.poll() is None, proc.stderr.read().decode()
    time.sleep(0.01)
  else:
    pytest.fail('the merge never started writing')
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not out.exists()  # nothing at OUT_DIR that could look complete
  assert tmp.exists()  # the partial write stayed in the hidden directory
  with pytest.raises(Exception):
    st.CheckpointReader(str(tmp))  # and it is not a readable checkpoint
  # A rerun succeeds and removes the dead run's temporary directory.
  assert cli.main(['merge', path, str(out), '--quiet']) == 0
  assert sorted(os.listdir(tmp_path)) == ['cfg.yml', 'out']
  assert 'mergekit_config.yml' in os.listdir(out)
  assert len(st.CheckpointReader(str(out)).keys()) == len(_names(tiny['base']))


def test_parse_size():
  assert cli.parse_size('5B') == 5 * 10**9
  assert cli.parse_size('2G') == 2 * 10**9
  assert cli.parse_size('500M') == 500 * 10**6
  assert cli.parse_size('2GiB') == 2 * 2**30
  assert cli.parse_size('1e9') == 10**9


def test_compile_cache_is_filled_by_one_run_and_reused_by_the_next(tiny,
                                                                   tmp_path):
  cfg = {'merge_method': 'ties', 'base_model': tiny['base'],
         'models': [{'model': tiny['ft1'],
                     'parameters': {'weight': 1.0, 'density': 0.5}},
                    {'model': tiny['ft2'],
                     'parameters': {'weight': 0.5, 'density': 0.5}}]}
  path = _write_cfg(tmp_path, cfg)
  cache = tmp_path / 'xla'
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}

  def run(out):
    subprocess.run([sys.executable, '-m', 'mergejax.cli', 'merge', path,
                    str(tmp_path / out), '--quiet', '--compile-cache',
                    str(cache)], env=env, check=True)

  run('a')
  entries = set(os.listdir(cache))
  assert entries  # the per-tensor merges were written to the cache
  run('b')
  assert set(os.listdir(cache)) == entries  # and found there: no new entry
  a, b = (st.CheckpointReader(str(tmp_path / o)) for o in 'ab')
  for n in a.keys():
    np.testing.assert_array_equal(a.read(n), b.read(n))


@pytest.mark.parametrize('text, match', [
    ('merge_method: [linear', 'not valid YAML'),
    ('- 1\n- 2', 'must be a YAML mapping'),
    ('models:\n  - model: a', 'has no `merge_method:`'),
    ('merge_method: linear\nmodels:\n  - model: a\n    parameters: [1, 2]',
     r'models\[0\].parameters must be a mapping'),
    ('merge_method: linear\nmodels:\n  - model: a\n    parameters:\n'
     '      weight: .inf', r'models\[0\].parameters.weight is inf'),
    ('merge_method: ties\nmodels:\n  - model: a\n    parameters:\n'
     '      density: []', r'density is an empty list'),
    ('merge_method: linear\nparameters:\n  weight: .nan\nmodels:\n'
     '  - model: a', r'parameters.weight is nan'),
])
def test_malformed_configs_give_one_clear_error(text, match):
  from mergejax.cli import _mergekit_config as mc  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match=match):
    mc.load_config(text, resolve_paths=False)


def test_bad_config_file_exits_with_a_message_naming_it(tmp_path, capsys):
  from mergejax import cli  # pylint: disable=g-import-not-at-top
  cfg = tmp_path / 'bad.yml'
  cfg.write_text('merge_method: [linear')
  assert cli.main(['merge', str(cfg), str(tmp_path / 'out'), '--quiet']) == 2
  err = capsys.readouterr().err
  assert 'bad.yml is not valid YAML' in err and 'Traceback' not in err


# --------------------------------------------------------------------------- #
# Faults: checksums, NaN inputs, missing config.json, kill -9 and resume.
# --------------------------------------------------------------------------- #
def _ta_cfg(tiny):
  return {'merge_method': 'task_arithmetic', 'base_model': tiny['base'],
          'models': [{'model': tiny['ft1'], 'parameters': {'weight': 1.0}},
                     {'model': tiny['ft2'], 'parameters': {'weight': 0.5}}]}


def _flip_byte(path, offset=-3):
  with open(path, 'r+b') as f:
    f.seek(offset, os.SEEK_END)
    b = f.read(1)
    f.seek(offset, os.SEEK_END)
    f.write(bytes([b[0] ^ 0xFF]))


def test_outputs_record_checksums_and_corrupt_inputs_are_named(tiny, tmp_path,
                                                               capsys):
  out = tmp_path / 'out'
  assert cli.main(['merge', _write_cfg(tmp_path, _ta_cfg(tiny)), str(out),
                   '--quiet', '--out-shard-size', '30K']) == 0
  meta = json.loads((out / atomic.MARKER_NAME).read_text())
  shards = sorted(f for f in os.listdir(out) if f.endswith('.safetensors'))
  assert len(shards) > 2 and set(shards) <= set(meta['sha256'])
  assert meta['written_by'] == 'mergejax' and 'config.json' in meta['sha256']
  assert st.verify_checkpoint(str(out))
  assert not os.path.exists(out / atomic.PROGRESS_NAME)
  # One flipped byte in a shard: loading it names the file.
  _flip_byte(out / shards[1])
  with pytest.raises(ValueError, match=shards[1] + ' changed since mergejax'):
    st.load_checkpoint(str(out))
  st.load_checkpoint(str(out), verify=False)  # explicitly unchecked
  # The corrupt checkpoint as a merge input: refused, naming the file.
  cfg = {'merge_method': 'linear', 'models': [
      {'model': str(out), 'parameters': {'weight': 1.0}},
      {'model': tiny['ft1'], 'parameters': {'weight': 1.0}}]}
  path = _write_cfg(tmp_path, cfg)
  assert cli.main(['merge', path, str(tmp_path / 'o2'), '--quiet']) == 2
  assert shards[1] in capsys.readouterr().err
  assert not (tmp_path / 'o2').exists()
  assert cli.main(['merge', path, str(tmp_path / 'o2'), '--quiet',
                   '--no-verify']) == 0


def test_nan_in_a_shard_stops_the_merge_naming_it(tiny, tmp_path, capsys):
  src = st.load_checkpoint(tiny['ft1'])
  name = 'model.layers.2.mlp.up_proj.weight'
  bad = np.array(src[name])
  bad.reshape(-1)[5] = np.nan
  src[name] = bad
  nan_model = str(tmp_path / 'nan')
  st.save_checkpoint(nan_model, src,
                     config=st.CheckpointReader(tiny['ft1']).config())
  cfg = _ta_cfg(tiny)
  cfg['models'][0]['model'] = nan_model
  path = _write_cfg(tmp_path, cfg)
  assert cli.main(['merge', path, str(tmp_path / 'out'), '--quiet']) == 2
  err = capsys.readouterr().err
  assert f"'{name}' holds NaN/Inf" in err and nan_model in err
  assert '1 NaN/Inf entries' in err
  assert not (tmp_path / 'out').exists()
  assert [e for e in os.listdir(tmp_path) if 'mergejax-tmp' in e] == []
  assert cli.main(['merge', path, str(tmp_path / 'out'), '--quiet',
                   '--allow-nonfinite']) == 0
  assert np.isnan(st.load_checkpoint(str(tmp_path / 'out'))[name]).sum() == 1


def test_nan_input_hidden_by_the_merge_still_stops_it(tmp_path):
  # TIES trims a NaN task-vector entry away (it never wins the top-k), so the
  # output alone is finite: the inputs' own finiteness must stop the merge.
  ckpts = {}
  for name, w in [('base', [1.0, 1.0, 1.0, 1.0]), ('a', [np.nan, 1.0, 1.0, 5.0]),
                  ('b', [1.0, 1.0, 1.0, 4.0])]:
    ckpts[name] = str(tmp_path / name)
    st.save_checkpoint(ckpts[name], {'w': np.asarray(w, np.float32)})
  tx = mj.methods.ties(density=0.25)
  out = str(tmp_path / 'out')
  with pytest.raises(ValueError, match=r"'w' is finite but its inputs are not"):
    mj.parallel.stream_merge(tx, ckpts['base'], [ckpts['a'], ckpts['b']], out)
  assert not os.path.exists(out)
  mj.parallel.stream_merge(tx, ckpts['base'], [ckpts['a'], ckpts['b']], out,
                           allow_nonfinite=True)
  assert np.isfinite(st.load_checkpoint(out)['w']).all()


def test_model_without_config_json_warns(tiny, tmp_path):
  bare = str(tmp_path / 'bare')
  st.save_checkpoint(bare, st.load_checkpoint(tiny['ft1']))  # no config
  cfg = _ta_cfg(tiny)
  cfg['models'][0]['model'] = bare
  with pytest.warns(UserWarning, match='bare has no config.json'):
    assert cli.main(['merge', _write_cfg(tmp_path, cfg), str(tmp_path / 'out'),
                     '--quiet']) == 0


def _kill_trials(tiny, tmp_path, trials, seed):
  """Kills CLI merges at random moments; checks what they leave; resumes."""
  path = _write_cfg(tmp_path, _ta_cfg(tiny))
  args = ['--quiet', '--out-shard-size', '30K']
  ref = tmp_path / 'ref'
  assert cli.main(['merge', path, str(ref), *args]) == 0
  want = json.loads((ref / atomic.MARKER_NAME).read_text())['sha256']
  env = {**os.environ, 'MERGEJAX_DEBUG_WRITE_DELAY': '0.03',
         'JAX_PLATFORMS': 'cpu'}
  rng = np.random.default_rng(seed)
  out = tmp_path / 'out'
  resumed = []
  for _ in range(trials):
    proc = subprocess.Popen(
        [sys.executable, '-m', 'mergejax.cli', 'merge', path, str(out), *args],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(rng.uniform(0.5, 4.0))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if out.exists():  # finished before the kill: complete and identical
      assert json.loads((out / atomic.MARKER_NAME).read_text())['sha256'] == want
    # Resume (the same merge): the same bytes as the uninterrupted run.
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
      assert cli.main(['merge', path, str(out), '--out-shard-size', '30K',
                       '--overwrite']) == 0
    stats = json.loads(stderr.getvalue().strip().splitlines()[-1])
    resumed.append(stats['resumed_shards'])
    assert json.loads((out / atomic.MARKER_NAME).read_text())['sha256'] == want
    assert st.verify_checkpoint(str(out))
    shutil.rmtree(out)
    assert [e for e in os.listdir(tmp_path) if 'mergejax-tmp' in e] == []
  return resumed


def test_killed_merges_resume_to_identical_output(tiny, tmp_path):
  resumed = _kill_trials(tiny, tmp_path, 4, seed=0)
  assert max(resumed) > 0, resumed  # some trial kept finished shards


@pytest.mark.slow
def test_thirty_kill_trials_never_leave_a_wrong_output(tiny, tmp_path):
  resumed = _kill_trials(tiny, tmp_path, 30, seed=1)
  assert sum(r > 0 for r in resumed) >= 5, resumed


@pytest.mark.parametrize('text', ['-1', -3, '1e400G', '', 'x', '.', 'eB'])
def test_parse_size_rejects_bad_sizes_as_value_errors(text):
  with pytest.raises(ValueError, match='Bad size'):
    cli.parse_size(text)


def test_parse_size_units():
  assert cli.parse_size('5B') == 5 * 10 ** 9
  assert cli.parse_size('512MiB') == 512 * 2 ** 20
  assert cli.parse_size('1e3') == 1000 and cli.parse_size(7) == 7
