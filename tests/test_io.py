"""Checkpoint IO: safetensors layout, lazy reads, atomic writes, layouts, orbax."""

import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors
from jax.sharding import NamedSharding, PartitionSpec as P

import mergejax.io as mio
from mergejax.io import _atomic as atomic
from mergejax.io import _safetensors as st
from mergejax.io import _synthetic as synthetic

DTYPES = [np.float32, np.float16, ml_dtypes.bfloat16]


def _bytes(x):
  return np.asarray(x).reshape(-1).view(np.uint8)


def _tensors(dtype, seed=0):
  rng = np.random.default_rng(seed)
  return {
      'model.embed_tokens.weight': rng.standard_normal((10, 4)).astype(dtype),
      'model.layers.0.mlp.up_proj.weight': rng.standard_normal((6, 4)).astype(dtype),
      'model.norm.weight': rng.standard_normal(4).astype(dtype),
      'scalar': np.asarray(3.0, dtype),
  }


@pytest.mark.parametrize('dtype', DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize('shard', [0, 50])
def test_roundtrip_matches_safe_open(tmp_path, dtype, shard):
  t = _tensors(dtype)
  out = str(tmp_path / 'ckpt')
  mio.save_checkpoint(out, t, max_shard_size=shard, config={'a': 1})
  files = sorted(os.listdir(out))
  if shard == 0:  # one shard: HF's single-file name, no index
    assert files == [atomic.MARKER_NAME, 'config.json', 'model.safetensors']
  else:
    index = json.load(open(os.path.join(out, st.INDEX_NAME)))
    shards = sorted(set(index['weight_map'].values()))
    assert len(shards) > 1
    assert shards[0] == f'model-00001-of-{len(shards):05d}.safetensors'
    assert index['metadata']['total_size'] == sum(a.nbytes for a in t.values())
  # Our reader and safetensors' own numpy reader return the same bytes.
  r = mio.CheckpointReader(out)
  for f in st.checkpoint_files(out):
    with safetensors.safe_open(f, framework='numpy') as h:
      for k in h.keys():
        ref = h.get_tensor(k)
        got = r.read(k)
        assert got.dtype == ref.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(_bytes(got), _bytes(ref))
        np.testing.assert_array_equal(_bytes(got), _bytes(t[k]))
        assert got.shape == t[k].shape
  assert r.config() == {'a': 1}


def test_dtype_cast_and_rows(tmp_path):
  t = _tensors(np.float32)
  out = str(tmp_path / 'c')
  mio.save_checkpoint(out, t, dtype='torch.bfloat16', config={})
  back = mio.load_checkpoint(out)
  assert back['model.norm.weight'].dtype == ml_dtypes.bfloat16
  assert mio.CheckpointReader(out).config()['torch_dtype'] == 'bfloat16'
  r = mio.CheckpointReader(out)
  rows = r.read('model.embed_tokens.weight', rows=3)
  np.testing.assert_array_equal(rows, back['model.embed_tokens.weight'][:3])


def test_reads_are_aligned_so_jax_uses_them_without_a_copy(tmp_path):
  out = str(tmp_path / 'c')
  mio.save_checkpoint(out, _tensors(np.float32), dtype='torch.bfloat16')
  r = mio.CheckpointReader(out)
  for name in r.keys():
    x = r.read(name)
    assert x.ctypes.data % 64 == 0, name
    if x.nbytes:
      assert jax.device_put(x).unsafe_buffer_pointer() == x.ctypes.data, name


def test_truncated_file_is_reported(tmp_path):
  out = str(tmp_path / 'c')
  mio.save_checkpoint(out, _tensors(np.float32))
  f = os.path.join(out, 'model.safetensors')
  data = open(f, 'rb').read()
  open(f, 'wb').write(data[:-10])
  with pytest.raises(ValueError, match='truncated'):
    mio.CheckpointReader(out)


def test_missing_shard_is_reported(tmp_path):
  out = str(tmp_path / 'c')
  mio.save_checkpoint(out, _tensors(np.float32), max_shard_size=50)
  os.remove(os.path.join(out, sorted(f for f in os.listdir(out)
                                     if f.endswith('.safetensors'))[0]))
  with pytest.raises(FileNotFoundError, match='incomplete'):
    mio.CheckpointReader(out)


def test_writer_checks_order_and_shapes(tmp_path):
  specs = [st.TensorSpec('a', (2,), np.dtype(np.float32)),
           st.TensorSpec('b', (3,), np.dtype(np.float32))]
  w = st.ShardedWriter(str(tmp_path), specs)
  with pytest.raises(ValueError, match='plan order'):
    w.write('b', np.zeros(3, np.float32))
  with pytest.raises(ValueError, match='planned'):
    w.write('a', np.zeros(3, np.float32))
  w.write('a', np.zeros(2, np.float32))
  with pytest.raises(ValueError, match='before all tensors'):
    w.finalize()


def test_atomic_dir_failure_leaves_nothing(tmp_path):
  out = str(tmp_path / 'out')
  with pytest.raises(RuntimeError):
    with atomic.atomic_output_dir(out) as tmp:
      open(os.path.join(tmp, 'model.safetensors'), 'w').write('partial')
      raise RuntimeError('killed')
  assert os.listdir(tmp_path) == []


def test_atomic_dir_refuses_existing_and_cleans_stale(tmp_path):
  out = tmp_path / 'out'
  with atomic.atomic_output_dir(str(out)) as tmp:
    open(os.path.join(tmp, 'x'), 'w').write('old')
  assert atomic.is_mergejax_output(str(out))
  with pytest.raises(FileExistsError, match='overwrite'):
    with atomic.atomic_output_dir(str(out)):
      pass
  # A temporary directory of a dead process (pid 2**22 + 1 does not exist).
  stale = tmp_path / f'.out.mergejax-tmp-{2**22 + 1}'
  stale.mkdir()
  with atomic.atomic_output_dir(str(out), overwrite=True) as tmp:
    open(os.path.join(tmp, 'y'), 'w').write('new')
  assert sorted(os.listdir(tmp_path)) == ['out']
  assert sorted(os.listdir(out)) == [atomic.MARKER_NAME, 'y']


def test_overwrite_never_deletes_a_directory_mergejax_did_not_write(tmp_path):
  out = tmp_path / 'notes'
  out.mkdir()
  (out / 'thesis.tex').write_text('precious')
  with pytest.raises(FileExistsError, match='not written by mergejax'):
    with atomic.atomic_output_dir(str(out), overwrite=True):
      raise AssertionError('must not be reached')
  assert (out / 'thesis.tex').read_text() == 'precious'
  assert sorted(os.listdir(tmp_path)) == ['notes']
  # A marker that is not mergejax's does not count either.
  (out / atomic.MARKER_NAME).write_text('{"written_by": "someone"}')
  assert not atomic.is_mergejax_output(str(out))


@pytest.mark.parametrize('which', ['empty', 'dot', 'cwd_parent', 'home',
                                   'root', 'input_parent', 'input_itself'])
def test_dangerous_output_paths_are_refused(tmp_path, monkeypatch, which):
  work = tmp_path / 'work'
  (work / 'models' / 'ft1').mkdir(parents=True)
  (work / 'keep.txt').write_text('keep')
  monkeypatch.chdir(work)
  monkeypatch.setenv('HOME', str(tmp_path / 'home'))
  (tmp_path / 'home').mkdir()
  out = {'empty': '', 'dot': '.', 'cwd_parent': str(tmp_path),
         'home': '~', 'root': '/', 'input_parent': 'models',
         'input_itself': 'models/ft1'}[which]
  out = os.path.expanduser(out)
  with pytest.raises(ValueError, match='Output path'):
    with atomic.atomic_output_dir(out, overwrite=True,
                                  inputs=['models/ft1']):
      raise AssertionError('must not be reached')
  assert (work / 'keep.txt').read_text() == 'keep'
  assert sorted(os.listdir(work)) == ['keep.txt', 'models']


def test_hf_flax_roundtrip_llama(tmp_path):
  conf = synthetic.llama_config(hidden=8, intermediate=12, vocab=16, layers=2,
                                heads=2, kv_heads=1, dtype='float32')
  hf = {s.name: np.random.default_rng(0).standard_normal(s.shape).astype(
      np.float32) for s in synthetic.llama_specs(conf)}
  flax_params = mio.hf_to_flax(hf)
  layer = flax_params['model']['layers']['1']
  # HF (out, in) -> Flax (in, out): k_proj is (kv=4, hidden=8) in HF.
  assert layer['self_attn']['k_proj']['kernel'].shape == (8, 4)
  np.testing.assert_array_equal(layer['mlp']['down_proj']['kernel'],
                                hf['model.layers.1.mlp.down_proj.weight'].T)
  assert flax_params['model']['embed_tokens']['embedding'].shape == (16, 8)
  assert flax_params['lm_head']['kernel'].shape == (8, 16)
  back = mio.flax_to_hf(flax_params)
  assert sorted(back) == sorted(hf)
  for k in hf:
    np.testing.assert_array_equal(back[k], hf[k])


def test_generic_rules_conv_and_linear():
  hf = {'enc.conv.weight': np.zeros((5, 3, 2, 2)), 'enc.fc.weight': np.zeros((7, 5)),
        'enc.fc.bias': np.zeros(7), 'enc.ln.weight': np.zeros(5)}
  p = mio.hf_to_flax(hf, mio.GENERIC_RULES)
  assert p['enc']['conv']['kernel'].shape == (2, 2, 3, 5)
  assert p['enc']['fc']['kernel'].shape == (5, 7)
  back = mio.flax_to_hf(p, mio.GENERIC_RULES)
  assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in hf.items()}
  with pytest.raises(ValueError, match='NameRule'):
    mio.hf_to_flax({'x.weight': np.zeros(3)}, rules=[mio.NameRule('a', 'b')])


def test_load_onto_sharding(tmp_path):
  out = str(tmp_path / 'c')
  t = {'a.weight': np.arange(64, dtype=np.float32).reshape(8, 8),
       'b.bias': np.arange(8, dtype=np.float32)}
  mio.save_checkpoint(out, t)
  mesh = jax.make_mesh((8,), ('fsdp',),
                       axis_types=(jax.sharding.AxisType.Explicit,))
  rules = [(r'weight$', NamedSharding(mesh, P('fsdp', None))),
           (r'.*', NamedSharding(mesh, P()))]
  got = mio.load_checkpoint(out, shardings=rules)
  assert got['a.weight'].sharding.spec == P('fsdp', None)
  assert len(got['a.weight'].addressable_shards) == 8
  np.testing.assert_array_equal(np.asarray(got['a.weight']), t['a.weight'])


def test_orbax_roundtrip_onto_sharding(tmp_path):
  params = {'dense': {'kernel': jnp.arange(16.).reshape(8, 2),
                      'bias': jnp.ones(2, jnp.bfloat16)}}
  path = str(tmp_path / 'orbax')
  mio.save_orbax(path, params)
  mesh = jax.make_mesh((8,), ('x',), axis_types=(jax.sharding.AxisType.Auto,))

  def sharding(p, shape):
    del p
    return NamedSharding(mesh, P('x') if shape[0] % 8 == 0 else P())
  got = mio.load_orbax(path, shardings=sharding)
  assert got['dense']['kernel'].sharding.spec == P('x')
  assert got['dense']['bias'].dtype == jnp.bfloat16
  jax.tree.map(np.testing.assert_array_equal, got, params)
  # With an abstract tree.
  got2 = mio.load_orbax(path, jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                     sharding=NamedSharding(mesh, P())), params))
  jax.tree.map(np.testing.assert_array_equal, got2, params)
  # HF safetensors -> Flax -> orbax -> back to HF.
  hf = {'model.layers.0.mlp.up_proj.weight': np.ones((6, 4), np.float32)}
  mio.save_orbax(str(tmp_path / 'o2'), mio.hf_to_flax(hf))
  back = mio.flax_to_hf(mio.load_orbax(str(tmp_path / 'o2')))
  np.testing.assert_array_equal(np.asarray(back['model.layers.0.mlp.up_proj.weight']),
                                hf['model.layers.0.mlp.up_proj.weight'])


def test_hf_names_that_nest_inside_each_other_are_refused():
  # 'a' is a tensor and a module holding 'a.b': no Flax tree holds both.
  for names in (['a', 'a.b'], ['a.b', 'a']):
    tensors = {n: np.zeros(2, np.float32) for n in names}
    with pytest.raises(ValueError, match="'a'.*rename one with a NameRule"):
      mio.hf_to_flax(tensors)
