"""Streaming executor: == in-memory merge, one compile per shape, global trim."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

import mergejax as mj
from mergejax import cli
from mergejax.parallel import _stream as stream
from mergejax.io import _safetensors as st
from mergejax.io import _synthetic as synthetic


def _make(root, dtype='bfloat16', n=2, **kw):
  conf = synthetic.llama_config(dtype=dtype, **kw)
  paths = [str(root / 'base')] + [str(root / f'ft{i}') for i in range(1, n + 1)]
  synthetic.write_random_llama(paths[0], conf, seed=0)
  for i, p in enumerate(paths[1:], 1):
    synthetic.write_random_llama(p, conf, seed=i, base_seed=0, delta_scale=0.3)
  return paths


def _load_jnp(path):
  return {k: jnp.asarray(v) for k, v in st.load_checkpoint(path).items()}


def _assert_same(out_dir, ref):
  got = st.load_checkpoint(out_dir)
  assert sorted(got) == sorted(ref)
  for k in ref:
    assert got[k].dtype == np.dtype(ref[k].dtype), k
    np.testing.assert_array_equal(got[k].astype(np.float32),
                                  np.asarray(ref[k], np.float32), err_msg=k)


@pytest.fixture(scope='module')
def bf16_models(tmp_path_factory):
  return _make(tmp_path_factory.mktemp('bf16'), 'bfloat16', n=2)


@pytest.fixture(scope='module')
def fp32_models(tmp_path_factory):
  # Trim methods compile slowly: two distinct shapes, two layers.
  return _make(tmp_path_factory.mktemp('fp32'), 'float32', n=3, vocab=64,
               intermediate=64, layers=2)


@pytest.mark.parametrize('shard_size,prefetch', [(0, 1 << 30), (20_000, 0)])
def test_stream_equals_in_memory_merge(bf16_models, tmp_path, shard_size,
                                       prefetch):
  base, *fts = bf16_models
  tx = mj.methods.task_arithmetic(weight=[0.7, 0.4], lambda_=0.8)
  stats = stream.stream_merge(tx, base, fts, str(tmp_path / 'out'),
                              max_shard_size=shard_size,
                              prefetch_bytes=prefetch)
  ref = mj.merge(tx, _load_jnp(base), [_load_jnp(f) for f in fts])
  _assert_same(str(tmp_path / 'out'), ref)
  assert stats.tensors == len(ref)
  assert (stats.shards > 1) == (shard_size > 0)


SAMPLE = ('model.layers.1.mlp.down_proj.weight', 'model.norm.weight')
SAMPLE_FAST = ('model.norm.weight',)


@pytest.mark.parametrize('sample', [
    SAMPLE_FAST, pytest.param(SAMPLE, marks=pytest.mark.slow)])
def test_stream_equals_in_memory_ties_and_slerp(fp32_models, tmp_path, sample):
  # Tensor-local methods: compare on a few tensors (an in-memory TIES over
  # the whole tree compiles for a minute on a busy 2-core machine).
  base, *fts = fp32_models
  pick = lambda tree: {k: tree[k] for k in sample}
  b, ms = pick(_load_jnp(base)), [pick(_load_jnp(f)) for f in fts]
  tx = mj.methods.ties(weight=[1.0, 0.5, 0.8], density=[0.3, 0.5, 0.9])
  stream.stream_merge(tx, base, fts, str(tmp_path / 'ties'), names=sample)
  _assert_same(str(tmp_path / 'ties'), mj.merge(tx, b, ms))
  tx = mj.methods.slerp(t=0.3)
  stream.stream_merge(tx, base, fts[:1], str(tmp_path / 'slerp'),
                      out_dtype='bfloat16', names=sample)
  ref = jax.tree.map(lambda x: x.astype(jnp.bfloat16), mj.merge(tx, b, ms[:1]))
  _assert_same(str(tmp_path / 'slerp'), ref)


def test_one_compile_per_distinct_shape(tmp_path):
  # Shapes not used elsewhere in the session, so the jit cache starts cold.
  base, *fts = _make(tmp_path, 'bfloat16', n=2, hidden=40, intermediate=24,
                     vocab=72, heads=2, layers=3)
  shapes = {(s.shape, s.dtype) for s in synthetic.llama_specs(
      st.CheckpointReader(base).config())}
  tx = mj.methods.task_arithmetic(weight=[0.7, 0.4], lambda_=0.8,
                                  normalize=True)
  before = stream.compile_count()
  s1 = stream.stream_merge(tx, base, fts, str(tmp_path / 'o1'))
  assert s1.compiles == stream.compile_count() - before == len(shapes) == 5
  # New numbers, same static configuration: no new compile.
  tx2 = mj.methods.task_arithmetic(weight=[0.1, 2.0], lambda_=0.3,
                                   normalize=True)
  s2 = stream.stream_merge(tx2, base, fts, str(tmp_path / 'o2'))
  assert s2.compiles == 0
  # Per-tensor numbers from gradients and filters (a YAML) re-use them too.
  cfg = {'merge_method': 'task_arithmetic', 'base_model': base,
         'models': [{'model': fts[0], 'parameters': {'weight': [0.1, 0.9]}},
                    {'model': fts[1], 'parameters': {'weight': [
                        {'filter': 'mlp', 'value': 0.3}, {'value': [1, 0]}]}}],
         'parameters': {'lambda': [1.0, 0.5], 'normalize': True}}
  s3 = cli.run_merge(cfg, str(tmp_path / 'o3'))
  assert s3.compiles == 0 and s3.tensors == s1.tensors


def test_global_thresholds_match_numpy(fp32_models):
  base, *fts = fp32_models
  readers = [st.CheckpointReader(p) for p in [base] + fts]
  names = readers[0].keys()
  jobs = [stream.Job(n, [(r, n) for r in readers], 0, None) for n in names]
  dens = np.array([0.2, 0.5, 0.35])
  keep = [dens * np.prod(readers[0].shape(n)) for n in names]
  import concurrent.futures as cf  # pylint: disable=g-import-not-at-top
  with cf.ThreadPoolExecutor(2) as pool:
    thr = stream.global_thresholds(jobs, keep, pool=pool)
  thr = thr.view(np.float32)
  for i in range(3):
    tv = np.concatenate([
        np.abs(readers[i + 1].read(n) - readers[0].read(n)).reshape(-1)
        for n in names])
    k = int(dens[i] * tv.size)
    assert thr[i] == np.sort(tv)[::-1][k - 1]
    assert np.sum(tv >= thr[i]) == k  # no ties in fp32 random data


@pytest.mark.slow
def test_global_trim_first_pass_equals_in_memory_global_ties(fp32_models,
                                                             tmp_path):
  base, *fts = fp32_models
  dens = [0.2, 0.5, 0.35]
  cfg = {'merge_method': 'ties', 'base_model': base,
         'models': [{'model': f, 'parameters': {'weight': 1.0, 'density': d}}
                    for f, d in zip(fts, dens)],
         'parameters': {'trim_scope': 'global'}}
  cli.run_merge(cfg, str(tmp_path / 'g'))
  b, ms = _load_jnp(base), [_load_jnp(f) for f in fts]
  ref = mj.merge(mj.methods.ties(weight=1.0, density=dens, scope='global'),
                 b, ms)
  got = st.load_checkpoint(str(tmp_path / 'g'))
  for k in ref:
    np.testing.assert_allclose(got[k], np.asarray(ref[k]), rtol=1e-6,
                               atol=1e-7, err_msg=k)
  # ...and differs from the per-tensor trim.
  cfg['parameters'] = {}
  cli.run_merge(cfg, str(tmp_path / 't'))
  per_tensor = st.load_checkpoint(str(tmp_path / 't'))
  assert any(not np.array_equal(per_tensor[k], got[k]) for k in got)


_BIG_SCRIPT = textwrap.dedent('''
    import json, resource, sys, time
    from mergejax import cli
    t0 = time.perf_counter()
    stats = cli.run_merge(sys.argv[1], sys.argv[2], progress=False,
                          out_shard_size='2G', overwrite=True)
    print(json.dumps({'seconds': time.perf_counter() - t0,
                      'tensors': stats.tensors, 'compiles': stats.compiles,
                      'read_GB': stats.bytes_read / 1e9,
                      'peak_rss_GiB': resource.getrusage(
                          resource.RUSAGE_SELF).ru_maxrss / 2**20}))
''')


@pytest.mark.slow
@pytest.mark.parametrize('method', ['task_arithmetic', 'ties'])
def test_three_1b_models_under_6gib(tmp_path_factory, method):
  """Three ~1B-parameter bf16 fine-tunes + base, merged under 6 GiB RSS.

  Set MERGEJAX_BIG_DIR to keep the generated checkpoints between runs.
  """
  root = os.environ.get('MERGEJAX_BIG_DIR')
  root = root if root else str(tmp_path_factory.mktemp('big'))
  # ~1.1B parameters: TinyLlama-like (hidden 2048, 22 layers, vocab 32000).
  conf = synthetic.llama_config(hidden=2048, intermediate=5632, layers=22,
                                vocab=32000, heads=32, kv_heads=4)
  paths = [os.path.join(root, n) for n in ('base', 'ft1', 'ft2', 'ft3')]
  for i, p in enumerate(paths):
    if not os.path.exists(os.path.join(p, 'config.json')):
      synthetic.write_random_llama(p, conf, seed=i,
                                   base_seed=None if i == 0 else 0,
                                   max_shard_size=2 * 10**9)
  params = {'weight': 1.0, 'density': 0.3} if method == 'ties' else {
      'weight': 0.5}
  cfg = {'merge_method': method, 'base_model': paths[0],
         'models': [{'model': p, 'parameters': params} for p in paths[1:]],
         'dtype': 'float32', 'out_dtype': 'bfloat16'}
  cfg_path = os.path.join(root, f'{method}.yml')
  with open(cfg_path, 'w') as f:
    yaml.safe_dump(cfg, f)
  out = os.path.join(root, f'out_{method}')
  res = subprocess.run(
      [sys.executable, '-c', _BIG_SCRIPT, cfg_path, out, ],
      capture_output=True, text=True, check=True)
  import json  # pylint: disable=g-import-not-at-top
  report = json.loads(res.stdout.strip().splitlines()[-1])
  print(report)
  assert report['peak_rss_GiB'] < 6.0, report
  # Sampled tensors == the in-memory merge of those tensors.
  readers = [st.CheckpointReader(p) for p in paths]
  got = st.CheckpointReader(out)
  names = ['model.embed_tokens.weight', 'model.layers.7.mlp.up_proj.weight',
           'model.layers.21.self_attn.k_proj.weight', 'model.norm.weight']
  tx = (mj.methods.ties(weight=1.0, density=0.3) if method == 'ties' else
        mj.methods.task_arithmetic(weight=0.5))
  for n in names:
    b = {n: jnp.asarray(readers[0].read(n), jnp.float32)}
    ms = [{n: jnp.asarray(r.read(n), jnp.float32)} for r in readers[1:]]
    ref = np.asarray(mj.merge(tx, b, ms)[n].astype(jnp.bfloat16))
    np.testing.assert_array_equal(got.read(n), ref, err_msg=n)
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.rmtree(out, ignore_errors=True)
