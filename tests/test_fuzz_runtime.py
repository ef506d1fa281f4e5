"""Property-based fuzzing of the rest of the public API.

`tests/test_fuzz.py` covers the merge methods, building blocks, permutation
entry points and the CLI config parser. This file covers everything else a
user calls: the core (`mergejax.merge`, composition, checks, path helpers),
`mergejax.stats`, `mergejax.io`, `mergejax.parallel`, `mergejax.cli`,
`mergejax.testing` and the remaining helpers of `mergejax.permute`. Each call
gets random (often malformed) input and must return a correct result or raise
a clean, non-empty error (`ValueError`, `TypeError`; in IO also the `OSError`
family and `KeyError` for a missing tensor): never a crash inside NumPy or
XLA, a silent NaN, or a wrong file on disk.

`test_every_public_name_is_covered` fails when a public name of any
namespace has neither a fuzz test (here or in `tests/test_fuzz.py`) nor an
exemption saying where it is tested instead.
"""

from __future__ import annotations

import json
import re
import os
import warnings

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import mergejax as mj
from mergejax import io as mio
from mergejax import parallel
from mergejax import permute

CLEAN = (ValueError, TypeError)
IO_CLEAN = (ValueError, TypeError, OSError, KeyError)
# More examples: MERGEJAX_FUZZ_EXAMPLES=100 (`test_long_fuzz`, -m slow, runs 60).
EXAMPLES_ENV = 'MERGEJAX_FUZZ_EXAMPLES'
FAST = hypothesis.settings(max_examples=int(os.environ.get(EXAMPLES_ENV, 6)),
                           deadline=None, derandomize=True,
                           database=None,
                           suppress_health_check=list(hypothesis.HealthCheck))
# Cheap tests with many categorical choices draw more examples.
MORE = hypothesis.settings(FAST, max_examples=max(FAST.max_examples, 20))
NAN = float('nan')
DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
SHAPES = ((), (1,), (0, 3), (3,), (2, 3), (4, 1), (2, 2, 2))


def _clean(e: Exception, kinds=CLEAN) -> None:
  assert isinstance(e, kinds), f'unclean {type(e).__name__}: {e}'
  assert str(e), 'an error without a message'


def _finite(tree) -> bool:
  return all(bool(jnp.all(jnp.isfinite(jnp.asarray(x, jnp.float32))))
             for x in jax.tree.leaves(tree)
             if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact))


@st.composite
def trees(draw, shapes=SHAPES, dtypes=DTYPES, k=(1, 2, 3)):
  """``(base, models)`` of one random architecture (nested dicts)."""
  n = draw(st.integers(1, 3))
  leaf_shapes = [draw(st.sampled_from(shapes)) for _ in range(n)]
  dtype = draw(st.sampled_from(dtypes))
  rng = np.random.default_rng(draw(st.integers(0, 2 ** 16)))
  base = {f'layers_{i}': {'kernel' if len(s) > 1 else 'bias':
                          rng.normal(size=s)} for i, s in enumerate(leaf_shapes)}
  models = [jax.tree.map(lambda x: x + rng.normal(size=np.shape(x)), base)
            for _ in range(draw(st.sampled_from(k)))]
  cast = lambda t: jax.tree.map(lambda x: jnp.asarray(x, dtype), t)
  return cast(base), [cast(m) for m in models]


# --------------------------------------------------------------------------- #
# Core: checks, merge, composition, path helpers.
# --------------------------------------------------------------------------- #
MUTATIONS = ('none', 'shape', 'extra_leaf', 'missing_leaf', 'nan', 'inf',
             'string', 'none_leaf', 'int_leaf', 'mixed_dtype', 'empty_models',
             'list_for_dict')


def _mutate(kind, base, models):
  """Returns ``(base, models, must_fail)`` with one defect of ``kind``."""
  m0 = jax.tree.map(lambda x: x, models[0])
  leaf = next(iter(m0))
  name = next(iter(m0[leaf]))
  x = m0[leaf][name]
  if kind == 'shape':
    m0[leaf][name] = jnp.zeros(x.shape + (2,), x.dtype)
  elif kind == 'extra_leaf':
    m0['extra'] = {'bias': jnp.zeros(2, x.dtype)}
  elif kind == 'missing_leaf':
    del m0[leaf]
  elif kind in ('nan', 'inf'):
    if not x.size:
      return base, models, False
    m0[leaf][name] = x.at[(0,) * x.ndim].set(NAN if kind == 'nan' else np.inf)
  elif kind == 'string':
    m0[leaf][name] = 'weights.bin'
  elif kind == 'none_leaf':
    m0[leaf][name] = None  # None is an empty subtree: the structure differs
  elif kind == 'int_leaf':
    m0[leaf][name] = jnp.zeros(x.shape, jnp.int32)
  elif kind == 'mixed_dtype':
    other = jnp.float32 if x.dtype != jnp.float32 else jnp.bfloat16
    m0[leaf][name] = x.astype(other)
    return base, [m0] + list(models[1:]), False  # cast, with a warning
  elif kind == 'empty_models':
    return base, [], True
  elif kind == 'list_for_dict':
    return base, [list(jax.tree.leaves(m0))] + list(models[1:]), True
  else:
    return base, models, False
  return base, [m0] + list(models[1:]), True


@MORE
@hypothesis.given(trees(), st.sampled_from(MUTATIONS),
                  st.sampled_from(('task_arithmetic', 'ties', 'average')))
def test_merge_and_check_models_reject_bad_trees(data, kind, method):
  base, models = data
  base, models, must_fail = _mutate(kind, base, models)
  tx = getattr(mj.methods, method)()
  zero_size = any(0 in np.shape(x) for x in jax.tree.leaves(base))
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')  # the mixed-dtype cast warns once
    try:
      out = mj.merge(tx, None if method == 'average' else base, models)
    except Exception as e:  # pylint: disable=broad-except
      _clean(e)
      # Zero-size leaves are refused with a clean error naming them.
      assert must_fail or (zero_size and 'zero-size' in str(e)), (kind, e)
      with pytest.raises(CLEAN):
        mj.check_models(base, models)
      return
  assert not must_fail, f'{kind} was accepted'
  assert jax.tree.structure(out) == jax.tree.structure(base)
  assert _finite(out)
  for o, b in zip(jax.tree.leaves(out), jax.tree.leaves(base)):
    assert (o.shape, o.dtype) == (b.shape, b.dtype)
  if kind == 'mixed_dtype':  # merge casts; the bare check names the leaf
    with pytest.raises(ValueError, match='dtype'):
      mj.check_models(base, models)
  else:
    mj.check_models(base, models)


@MORE
@hypothesis.given(
    st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(),
              st.booleans(), st.none(), st.text(max_size=3),
              st.lists(st.floats(-2, 2), max_size=3)),
    st.sampled_from(((None, None), (0.0, 1.0), (0.0, None), (None, 0.0))),
    st.booleans(), st.booleans())
def test_check_hparam(value, bounds, low_inclusive, high_inclusive):
  low, high = bounds
  kw = dict(low=low, high=high, low_inclusive=low_inclusive,
            high_inclusive=high_inclusive)
  try:
    out = mj.check_hparam(value, 'h', **kw)
  except Exception as e:  # pylint: disable=broad-except
    _clean(e)
    assert "'h'" in str(e) or ' h ' in str(e) or 'h=' in str(e) or 'h:' in str(
        e) or 'h ' in str(e), f'the error does not name the parameter: {e}'
    return
  v = np.asarray(out, np.float64)
  assert np.all(np.isfinite(v)), f'{value!r} accepted'
  if low is not None:
    assert np.all(v >= low if low_inclusive else v > low)
  if high is not None:
    assert np.all(v <= high if high_inclusive else v < high)
  # The same check traced under jit raises when the value is out of range.
  if v.ndim == 0:
    jax.block_until_ready(jax.jit(lambda x: mj.check_hparam(x, 'h', **kw))(
        jnp.float32(v)))


def _label(path, *, pattern):
  return 'avg' if re.search(pattern, path) else 'ta'


@FAST
@hypothesis.given(trees(shapes=((3,), (2, 3), (4, 1))),
                  st.sampled_from(('chain', 'named_chain', 'identity',
                                   'static_fn', 'masked', 'partition')),
                  st.sampled_from((r'kernel$', r'bias$', r'nothing', r'.*')))
def test_composition_matches_plain_merges(data, how, pattern):
  base, models = data
  T = mj.transforms
  ta = mj.methods.task_arithmetic(lambda_=0.5)
  ref = mj.merge(ta, base, models)
  if how == 'chain':
    tx = mj.chain(T.task_vectors(), T.mean(), T.scale(0.5 * len(models)),
                  T.apply_to_base())
  elif how == 'named_chain':
    tx = mj.named_chain(('tv', T.task_vectors()), ('sum', T.weighted_sum()),
                        ('scale', T.scale(0.5)), ('base', T.apply_to_base()))
  elif how == 'identity':
    tx = mj.chain(mj.identity(), ta, mj.identity())
  elif how == 'static_fn':
    # A hashable labeller: equal instances share partition's jit cache.
    labels = mj.static_fn(_label, (('pattern', pattern),))
    assert labels == mj.static_fn(_label, (('pattern', pattern),))
    assert hash(labels) == hash(mj.static_fn(_label, (('pattern', pattern),)))
    tx = mj.partition({'ta': ta, 'avg': mj.methods.average()}, labels)
  elif how == 'masked':
    # Masking a model-axis-preserving step to nothing is the plain merge.
    tx = mj.chain(T.task_vectors(), mj.masked(T.scale(1.0), pattern),
                  T.weighted_sum(), T.scale(0.5), T.apply_to_base())
  else:
    tx = mj.partition({'ta': ta, 'avg': mj.methods.average()},
                      [(pattern, 'avg'), (r'.*', 'ta')])
  try:
    out = mj.merge(tx, base, models)
  except CLEAN as e:
    _clean(e)
    raise AssertionError(f'{how}: {e}') from e
  if how in ('partition', 'static_fn'):
    avg = mj.merge(mj.methods.average(), None, models)
    paths = mj.leaf_paths(base)
    ref = jax.tree.unflatten(jax.tree.structure(base), [
        a if re.search(pattern, p) else r for p, a, r in
        zip(paths, jax.tree.leaves(avg), jax.tree.leaves(ref))])
  tol = 2e-2 if base['layers_0'][next(iter(base['layers_0']))].dtype != (
      jnp.float32) else 1e-5
  mj.testing.assert_trees_close(out, ref, rtol=tol, atol=tol)


@FAST
@hypothesis.given(trees(), st.sampled_from((jnp.float32, jnp.bfloat16)))
def test_stack_models_and_path_helpers(data, dtype):
  base, models = data
  stacked = mj.stack_models(models, dtype=dtype)
  for s, leaves in zip(jax.tree.leaves(stacked),
                       zip(*[jax.tree.leaves(m) for m in models])):
    assert s.shape == (len(models),) + leaves[0].shape and s.dtype == dtype
    np.testing.assert_array_equal(np.asarray(s, np.float32), np.stack(
        [np.asarray(jnp.asarray(x, dtype), np.float32) for x in leaves]))
  paths = mj.leaf_paths(base)
  flat = mj.flatten_to_dict(base)
  assert list(flat) == paths and len(set(paths)) == len(paths)
  for p in paths:
    assert mj.layer_index(p) == int(p.split('/')[0].split('_')[1]), p
  with pytest.raises(CLEAN):
    mj.stack_models([])
  with pytest.raises(CLEAN):
    mj.stack_models(models + [{'other': jnp.zeros(2)}])


@MORE
@hypothesis.given(st.text(alphabet='abl_ers0123/.hDn', max_size=14))
def test_layer_index_of_any_path(path):
  out = mj.layer_index(path)
  assert out is None or (isinstance(out, int) and str(out) in path)


# --------------------------------------------------------------------------- #
# Statistics: Fisher diagonals and input Grams of random MLPs and batches.
# --------------------------------------------------------------------------- #
def _mlp(widths):
  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  class MLP(nn.Module):

    @nn.compact
    def __call__(self, x):
      for i, w in enumerate(widths[:-1]):
        x = nn.relu(nn.Dense(w, name=f'Dense_{i}')(x))
      return nn.Dense(widths[-1], name=f'Dense_{len(widths) - 1}')(x)

  return MLP()


@st.composite
def mlp_and_batches(draw):
  widths = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=3))) + (
      draw(st.integers(2, 4)),)
  d_in = draw(st.integers(1, 3))
  module = _mlp(widths)
  params = module.init(jax.random.key(draw(st.integers(0, 99))),
                       jnp.zeros((1, d_in)))['params']
  rng = np.random.default_rng(draw(st.integers(0, 2 ** 16)))
  sizes = draw(st.lists(st.integers(0, 3), max_size=3))
  batches = [(jnp.asarray(rng.normal(size=(n, d_in)), jnp.float32),
              jnp.asarray(rng.integers(0, widths[-1], size=n), jnp.int32))
             for n in sizes]
  return module, params, batches


def _rows(batches):
  return sum(int(x.shape[0]) for x, _ in batches)


@FAST
@hypothesis.given(mlp_and_batches(), st.sampled_from(mj.stats.FISHER_KINDS +
                                                     ('nope',)),
                  st.sampled_from((None, 1, 2)), st.booleans(), st.booleans())
def test_fisher_diagonal(data, kind, num_examples, poison, labels):
  module, params, batches = data
  logits = lambda p, x: module.apply({'params': p}, x)
  if poison and _rows(batches):
    i = next(i for i, (x, _) in enumerate(batches) if x.shape[0])
    batches[i] = (batches[i][0].at[0, 0].set(NAN), batches[i][1])
  if not labels:
    batches = [x for x, _ in batches]
  run = lambda bs, n=num_examples: mj.stats.fisher_diagonal(
      logits, params, bs, kind=kind, key=jax.random.key(1), num_examples=n)
  try:
    fisher = run(batches)
  except CLEAN as e:
    _clean(e)
    assert (kind == 'nope' or poison or not _rows(batches if labels else [
        (x, None) for x in batches]) or (kind == 'empirical' and not labels)), e
    return
  assert kind != 'nope' and not poison and not (kind == 'empirical' and
                                                not labels)
  assert jax.tree.structure(fisher) == jax.tree.structure(params)
  for f, p in zip(jax.tree.leaves(fisher), jax.tree.leaves(params)):
    assert f.shape == p.shape and f.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(f))) and bool(jnp.all(f >= 0))
  # Per-example kinds: the batches' Fisher is the example-weighted mean of
  # the one-example Fisher diagonals (batch_sqrt has cross-example terms).
  if kind in ('exact', 'empirical') and labels and num_examples is None:
    singles = [(x[i:i + 1], y[i:i + 1]) for x, y in batches
               for i in range(x.shape[0])]
    each = [run([s]) for s in singles]
    mean = jax.tree.map(lambda *fs: sum(fs) / len(fs), *each)
    mj.testing.assert_trees_close(fisher, mean, rtol=1e-4, atol=1e-6)


@FAST
@hypothesis.given(mlp_and_batches(), st.sampled_from((None, 1, 3)),
                  st.booleans())
def test_input_grams_of_linen_dense_inputs(data, num_examples, poison):
  module, params, batches = data
  if poison and _rows(batches):
    i = next(i for i, (x, _) in enumerate(batches) if x.shape[0])
    batches[i] = (batches[i][0].at[0, 0].set(np.inf), batches[i][1])
  inputs_fn = mj.stats.linen_dense_inputs(module)
  try:
    grams = mj.stats.input_grams(inputs_fn, params, batches,
                                 num_examples=num_examples)
  except CLEAN as e:
    _clean(e)
    assert poison or not _rows(batches), e
    return
  assert not poison
  kernels = [p for p in mj.leaf_paths(params) if p.endswith('kernel')]
  assert sorted(grams) == sorted(kernels)
  # The first layer reads the data: its Gram is X^T X / N of the rows used.
  x = np.concatenate([np.asarray(x) for x, _ in batches])
  x = x[:num_examples] if num_examples else x
  np.testing.assert_allclose(grams['Dense_0/kernel'], x.T @ x / len(x),
                             rtol=1e-5, atol=1e-6)
  for g in grams.values():
    np.testing.assert_allclose(g, g.T, atol=1e-6)
    assert np.linalg.eigvalsh(np.asarray(g, np.float64)).min() > -1e-5


# --------------------------------------------------------------------------- #
# IO: checkpoints on disk, corruption, layouts, dtypes, output paths.
# --------------------------------------------------------------------------- #
IO_DTYPES = (np.float32, np.float16, ml_dtypes.bfloat16, np.int32, np.int64,
             np.uint8, np.bool_)


@st.composite
def tensor_dicts(draw):
  n = draw(st.integers(0, 4))
  names = draw(st.lists(st.text('ab.c_/0', min_size=1, max_size=6),
                        min_size=n, max_size=n, unique=True))
  rng = np.random.default_rng(draw(st.integers(0, 2 ** 16)))
  out = {}
  for name in names:
    shape = draw(st.sampled_from(((), (0,), (3,), (2, 0), (2, 3), (1, 1, 2))))
    dtype = draw(st.sampled_from(IO_DTYPES))
    out[name] = (rng.normal(size=shape) * 3).astype(dtype)
  return out


def _same_bytes(a, b):
  a, b = np.asarray(a), np.asarray(b)
  assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype,
                                                     b.dtype)
  np.testing.assert_array_equal(a.reshape(-1).view(np.uint8),
                                b.reshape(-1).view(np.uint8))


@FAST
@hypothesis.given(tensor_dicts(), st.sampled_from((0, 16, 1 << 30)),
                  st.sampled_from((None, 'bfloat16', 'float32', 'fp16')),
                  st.booleans())
def test_checkpoint_roundtrip(tmp_path_factory, tensors, shard, dtype, config):
  out = str(tmp_path_factory.mktemp('ckpt') / 'out')
  try:
    mio.save_checkpoint(out, tensors, dtype=dtype, max_shard_size=shard,
                        config={'model_type': 'x'} if config else None)
  except IO_CLEAN as e:
    _clean(e, IO_CLEAN)
    assert not tensors, e  # only an empty checkpoint may be refused
    assert not os.path.exists(out)
    return
  assert mio.verify_checkpoint(out)
  got = mio.load_checkpoint(out)
  assert sorted(got) == sorted(tensors)
  for k, v in tensors.items():
    want = v.astype(mio.parse_dtype(dtype)) if dtype and np.issubdtype(
        v.dtype, np.floating) or (dtype and v.dtype == ml_dtypes.bfloat16) else v
    _same_bytes(got[k], want)
  r = mio.CheckpointReader(out)
  assert sorted(r.keys()) == sorted(tensors)
  if config:
    cfg = json.load(open(os.path.join(out, 'config.json')))
    assert cfg['model_type'] == 'x'


@MORE
@hypothesis.given(st.sampled_from(('flip', 'truncate', 'garbage_header',
                                   'delete', 'bad_index', 'bad_config',
                                   'bad_marker', 'extra_bytes')),
                  st.integers(0, 2 ** 16), st.booleans())
def test_corrupt_checkpoints_are_rejected_naming_the_file(tmp_path_factory,
                                                         how, seed, sharded):
  out = str(tmp_path_factory.mktemp('ckpt') / 'out')
  rng = np.random.default_rng(seed)
  tensors = {f'layers.{i}.weight': rng.normal(size=(4, 3)).astype(np.float32)
             for i in range(3)}
  mio.save_checkpoint(out, tensors, max_shard_size=60 if sharded else 0,
                      config={'model_type': 'x'})
  shards = sorted(f for f in os.listdir(out) if f.endswith('.safetensors'))
  victim = os.path.join(out, shards[rng.integers(len(shards))])
  if how == 'flip':
    data = bytearray(open(victim, 'rb').read())
    data[rng.integers(len(data))] ^= 0xFF
    open(victim, 'wb').write(bytes(data))
  elif how == 'truncate':
    size = os.path.getsize(victim)
    os.truncate(victim, int(rng.integers(0, size)))
  elif how == 'garbage_header':
    open(victim, 'wb').write(b'\xff' * 8 + b'{not json')
  elif how == 'delete':
    os.remove(victim)
  elif how == 'bad_index':
    if not sharded:
      return
    victim = os.path.join(out, 'model.safetensors.index.json')
    open(victim, 'w').write('{"weight_map": [')
  elif how == 'bad_config':
    victim = os.path.join(out, 'config.json')
    open(victim, 'w').write('{"model_type": ')
  elif how == 'bad_marker':
    victim = os.path.join(out, '.mergejax-output')
    open(victim, 'w').write('not json')
  else:
    with open(victim, 'ab') as f:
      f.write(b'\0' * 7)
  errors = []
  for call in (lambda: mio.load_checkpoint(out), lambda: mio.verify_checkpoint(
      out)):
    try:
      call()
    except IO_CLEAN as e:
      _clean(e, IO_CLEAN)
      errors.append(str(e))
  if how == 'bad_config':  # tensors intact; config.json is read by the CLI
    with pytest.raises(ValueError, match='config.json'):
      mj.cli.run_merge({'merge_method': 'linear', 'models': [{'model': out}],
                        'dtype': 'float32'}, out + '_merged')
    return
  assert errors, f'{how} of {os.path.basename(victim)} went unnoticed'
  assert all(os.path.basename(victim) in e or 'mergejax' in e for e in errors
             ), errors


@MORE
@hypothesis.given(st.one_of(
    st.sampled_from(('float32', 'fp32', 'bf16', 'bfloat16', 'float16', 'half',
                     'float8', 'int8', 'int32', 'torch.bfloat16', '', 'F32')),
    st.text(max_size=6), st.none(), st.integers(-2, 40),
    st.sampled_from((np.float32, jnp.bfloat16, np.dtype('float16'), object))))
def test_parse_dtype(name):
  try:
    d = mio.parse_dtype(name)
  except CLEAN as e:
    _clean(e)
    return
  assert isinstance(d, np.dtype)
  # Accepted names mean the same dtype the second time (idempotent).
  assert mio.parse_dtype(d) == d


LLAMA_NAMES = ('model.embed_tokens.weight', 'model.norm.weight',
               'lm_head.weight', 'model.layers.{i}.self_attn.q_proj.weight',
               'model.layers.{i}.self_attn.k_proj.bias',
               'model.layers.{i}.mlp.gate_proj.weight',
               'model.layers.{i}.input_layernorm.weight',
               'vision.blocks.{i}.conv.weight', 'head.bias', 'scale', 'a.b',
               'a')


@MORE
@hypothesis.given(st.lists(st.tuples(st.sampled_from(LLAMA_NAMES),
                                     st.integers(0, 2)), max_size=6, unique=True),
                  st.integers(0, 2 ** 16))
def test_hf_flax_layouts_roundtrip(names, seed):
  rng = np.random.default_rng(seed)
  tensors = {}
  for template, i in names:
    name = template.format(i=i)
    ndim = 4 if 'conv' in name else (1 if 'norm' in name or 'bias' in name
                                     else 2)
    tensors[name] = rng.normal(size=tuple(rng.integers(1, 4, ndim)))
  try:
    flax = mio.hf_to_flax(tensors)
  except CLEAN as e:
    _clean(e)
    # Only a name that is both a tensor and a prefix of another collides.
    assert any(other.startswith(n + '.') for n in tensors for other in tensors)
    return
  back = mio.flax_to_hf(flax)
  assert sorted(back) == sorted(tensors)
  for k, v in tensors.items():
    np.testing.assert_array_equal(back[k], v)


@MORE
@hypothesis.given(st.sampled_from(('', '.', 'cwd_parent', 'home', 'root',
                                   'input_parent', 'input', 'foreign', 'file',
                                   'fresh', 'ours')), st.booleans())
def test_atomic_output_dir_refuses_dangerous_paths(tmp_path_factory, where,
                                                   overwrite):
  root = tmp_path_factory.mktemp('atomic')
  model = root / 'models' / 'a'
  model.mkdir(parents=True)
  (model / 'keep.txt').write_text('data')
  foreign = root / 'foreign'
  foreign.mkdir()
  (foreign / 'keep.txt').write_text('data')
  (root / 'file').write_text('data')
  ours = root / 'ours'
  mio.save_checkpoint(str(ours), {'w': np.ones(2, np.float32)})
  target = {'': '', '.': '.', 'cwd_parent': '..', 'home': os.path.expanduser(
      '~'), 'root': '/', 'input_parent': str(root / 'models'),
            'input': str(model), 'foreign': str(foreign),
            'file': str(root / 'file'), 'fresh': str(root / 'new' / 'out'),
            'ours': str(ours)}[where]
  cwd = os.getcwd()
  os.chdir(model)
  try:
    with mio.atomic_output_dir(target, overwrite=overwrite,
                               inputs=[str(model)]) as tmp:
      open(os.path.join(tmp, 'x'), 'w').write('merged')
  except IO_CLEAN as e:
    _clean(e, IO_CLEAN)
    assert where != 'fresh' and not (where == 'ours' and overwrite), e
  else:
    assert where == 'fresh' or (where == 'ours' and overwrite), where
    assert open(os.path.join(target, 'x')).read() == 'merged'
  finally:
    os.chdir(cwd)
  # Nothing mergejax did not write was touched.
  assert (model / 'keep.txt').read_text() == 'data'
  assert (foreign / 'keep.txt').read_text() == 'data'
  assert (root / 'file').read_text() == 'data'
  assert not [e for e in os.listdir(root) if 'mergejax-tmp' in e]


@MORE
@hypothesis.given(st.lists(st.sampled_from(('dead', 'alive', 'other_name',
                                            'unrelated')), max_size=4))
def test_remove_stale_tmp_dirs(tmp_path_factory, kinds):
  root = tmp_path_factory.mktemp('stale')
  out = root / 'out'
  dead_pid = 2 ** 22 + 17  # above Linux's default pid_max
  made = {}
  for i, kind in enumerate(kinds):
    name = {'dead': f'.out.mergejax-tmp-{dead_pid + i}',
            'alive': f'.out.mergejax-tmp-{os.getpid()}',
            'other_name': f'.other.mergejax-tmp-{dead_pid + i}',
            'unrelated': f'.out.tmp-{i}'}[kind]
    (root / name).mkdir(exist_ok=True)
    made[name] = kind
  removed = mio.remove_stale_tmp_dirs(str(out))
  assert sorted(removed) == sorted(n for n, k in made.items() if k == 'dead')
  for n, k in made.items():
    assert (root / n).exists() == (k != 'dead'), n


@FAST
@hypothesis.given(trees(shapes=((), (3,), (2, 3)), k=(1,)), st.booleans())
def test_orbax_roundtrip(tmp_path_factory, data, overwrite):
  base, _ = data
  path = str(tmp_path_factory.mktemp('orbax') / 'params')
  mio.save_orbax(path, base)
  try:
    mio.save_orbax(path, base, overwrite=overwrite)
  except IO_CLEAN as e:
    _clean(e, IO_CLEAN)
    assert not overwrite
  got = mio.load_orbax(path, jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), base))
  for g, b in zip(jax.tree.leaves(got), jax.tree.leaves(base)):
    assert g.dtype == b.dtype
    _same_bytes(np.asarray(g), np.asarray(b))
  with pytest.raises(IO_CLEAN):
    mio.load_orbax(path + '_missing')


# --------------------------------------------------------------------------- #
# Parallel: meshes, specs, sharded and streamed merges equal the in-memory one.
# --------------------------------------------------------------------------- #
P = jax.sharding.PartitionSpec
MESHES = ((1, 8), (2, 4), (4, 2), (8, 1))


@MORE
@hypothesis.given(st.one_of(st.none(), st.lists(st.integers(-1, 9), max_size=3)),
                  st.sampled_from((('models', 'fsdp'), ('fsdp',), ('a', 'a'),
                                   ('models', 'fsdp', 'x'))))
def test_make_mesh(shape, names):
  try:
    mesh = parallel.make_mesh(shape, names)
  except CLEAN as e:
    _clean(e)
    ok = (shape is None and len(set(names)) == len(names)) or (
        shape is not None and len(shape) == len(names) == len(set(names)) and
        all(s > 0 for s in shape) and np.prod(shape) == jax.device_count())
    assert not ok, e
    return
  assert tuple(mesh.axis_names) == tuple(names)
  assert mesh.devices.size == jax.device_count()
  if shape is not None:
    assert tuple(mesh.devices.shape) == tuple(shape)


@FAST
@hypothesis.given(st.lists(st.sampled_from(((), (0,), (3,), (8,), (6, 4),
                                            (16, 3), (4, 8, 2))), min_size=1,
                           max_size=4),
                  st.sampled_from(MESHES),
                  st.sampled_from(('fsdp', 'fsdp_largest', 'replicate', None,
                                   'fsdp(axis="models")', P('fsdp'),
                                   P(None, 'fsdp'), P('nope'), '(', 'bogus',
                                   P('fsdp', 'fsdp'))))
def test_param_specs_and_fsdp_spec(shapes, mesh_shape, rule):
  mesh = parallel.make_mesh(mesh_shape)
  tree = {f'l{i}': np.zeros(s, np.float32) for i, s in enumerate(shapes)}
  try:
    specs = parallel.param_specs(tree, mesh, [(r'^l0$', rule), ('.*', 'fsdp')])
    placed = parallel.put_sharded(tree, mesh, specs)
  except CLEAN as e:
    _clean(e)
    return
  for name, x in tree.items():
    spec = specs[name]
    assert len(spec) <= x.ndim, (name, spec)
    for dim, axes in zip(x.shape, spec):
      for a in (axes,) if isinstance(axes, str) else (axes or ()):
        assert dim % mesh.shape[a] == 0, (name, x.shape, spec)
    np.testing.assert_array_equal(np.asarray(placed[name]), x)
    fs = parallel.fsdp_spec(x.shape, mesh)
    assert all(d % mesh.shape['fsdp'] == 0 for d, a in zip(x.shape, fs) if a)
    st_spec = parallel.stacked_spec(fs, 3, mesh)
    assert len(st_spec) == len(fs) + 1 and tuple(st_spec)[1:] == tuple(fs)


@FAST
@hypothesis.given(trees(shapes=((), (3,), (8,), (4, 6), (8, 2), (0, 2)),
                        k=(1, 2, 3, 4)),
                  st.sampled_from(('task_arithmetic', 'ties', 'average',
                                   'dare_ties')),
                  st.sampled_from(MESHES))
def test_sharded_merge_equals_merge(data, method, mesh_shape):
  base, models = data
  mesh = parallel.make_mesh(mesh_shape)
  tx = getattr(mj.methods, method)()
  b = None if method == 'average' else base
  key = jax.random.key(3)
  try:
    ref = mj.merge(tx, b, models, key=key)
  except CLEAN:
    with pytest.raises(CLEAN):
      parallel.sharded_merge(tx, b, models, key=key, mesh=mesh)
    return
  out = parallel.sharded_merge(tx, b, models, key=key, mesh=mesh)
  tol = 1e-5 if jax.tree.leaves(base)[0].dtype == jnp.float32 else 1e-2
  mj.testing.assert_trees_close(out, ref, rtol=tol, atol=tol)
  fn, args = parallel.prepare_sharded_merge(tx, b, models, key=key, mesh=mesh)
  merged, _ = fn(*args)
  mj.testing.assert_trees_close(merged, ref, rtol=tol, atol=tol)
  specs = jax.tree.map(lambda s: parallel.stacked_spec(s, len(models), mesh),
                       parallel.param_specs(base, mesh))
  stacked = parallel.stack_sharded(models, mesh, specs)
  for s, leaves in zip(jax.tree.leaves(stacked),
                       zip(*[jax.tree.leaves(m) for m in models])):
    np.testing.assert_array_equal(np.asarray(s, np.float32), np.stack(
        [np.asarray(x, np.float32) for x in leaves]))


def _flat(tree):
  return {p.replace('/', '.'): np.asarray(x) for p, x in
          mj.flatten_to_dict(tree).items()}


@FAST
@hypothesis.given(trees(shapes=((), (3,), (4, 6), (8, 2), (0, 2)), k=(1, 2, 3),
                        dtypes=(jnp.float32, jnp.bfloat16)),
                  st.sampled_from(('task_arithmetic', 'ties', 'dare_linear')),
                  st.sampled_from(('none', 'nan', 'missing_file', 'shape')),
                  st.sampled_from((0, 40)))
def test_stream_merge_equals_merge(tmp_path_factory, data, method, fault,
                                   shard):
  base, models = data
  root = tmp_path_factory.mktemp('stream')
  tx = getattr(mj.methods, method)()
  key = jax.random.key(5)
  paths = []
  for i, m in enumerate([base] + models):
    flat = _flat(m)
    if i == 1 and fault == 'nan':
      name = next((n for n, x in flat.items() if x.size), None)
      if name is None:  # nothing to poison: the merge is valid
        fault = 'none'
      else:
        flat[name] = flat[name].copy()
        flat[name].reshape(-1)[0] = np.nan
    if i == 1 and fault == 'shape':
      name = next(iter(flat))
      flat[name] = np.zeros(flat[name].shape + (2,), flat[name].dtype)
    mio.save_checkpoint(str(root / f'm{i}'), flat, max_shard_size=shard)
    paths.append(str(root / f'm{i}'))
  if fault == 'missing_file':
    paths[1] = str(root / 'nowhere')
  out = str(root / 'out')
  try:
    stats = parallel.stream_merge(tx, paths[0], paths[1:], out, key=key)
  except IO_CLEAN as e:
    _clean(e, IO_CLEAN)
    assert fault != 'none', e
    assert not os.path.exists(out), 'a failed stream left an output'
    return
  assert fault == 'none', f'{fault} went unnoticed'
  assert stats.tensors == len(jax.tree.leaves(base))
  got = mio.load_checkpoint(out)
  # The streamed merge is the in-memory merge of the same leaves. (In memory,
  # zero-size leaves are refused; streamed, they are written as they are.)
  sized = lambda t: {k: v for k, v in t.items() if v.size}
  for name, x in _flat(base).items():
    assert got[name].shape == x.shape and got[name].dtype == x.dtype
  ref = None
  if method != 'dare_linear' and sized(_flat(base)):  # DARE: keys per leaf
    unflat = lambda t: {k: {'w': v} for k, v in sized(_flat(t)).items()}
    ref = {k: v['w'] for k, v in mj.merge(
        tx, unflat(base), [unflat(m) for m in models], key=key).items()}
  for name, x in (ref or {}).items():
    tol = 1e-5 if x.dtype == np.float32 else 1e-2
    np.testing.assert_allclose(np.asarray(got[name], np.float32),
                               np.asarray(x, np.float32), rtol=tol, atol=tol)


def test_single_process_distributed_helpers():
  # Multi-process behaviour is tested in tests/test_distributed.py; in one
  # process every helper must be a cheap no-op with the obvious answer.
  assert not parallel.is_initialized()
  assert parallel.is_coordinator()
  parallel.sync('fuzz')
  tree = {'w': jnp.arange(3.0), 'b': {'c': jnp.ones((2, 2), jnp.bfloat16)}}
  got = parallel.gather(tree)
  for g, t in zip(jax.tree.leaves(got), jax.tree.leaves(tree)):
    assert isinstance(g, np.ndarray)
    _same_bytes(g, np.asarray(t))
  port = parallel.free_port()
  assert isinstance(port, int) and 1024 <= port < 65536
  parallel.shutdown()  # not initialised: nothing to shut down


# --------------------------------------------------------------------------- #
# The command line: random configs, YAML and flags end in a verified output or
# a one-line error with exit code 1 or 2; never a traceback or a stray file.
# --------------------------------------------------------------------------- #
@pytest.fixture(scope='module')
def small_ckpts(tmp_path_factory):
  root = tmp_path_factory.mktemp('cli_fuzz')
  rng = np.random.default_rng(0)
  base = {'model.layers.0.mlp.up_proj.weight': rng.normal(size=(6, 4)),
          'model.layers.1.mlp.up_proj.weight': rng.normal(size=(6, 4)),
          'model.norm.weight': rng.normal(size=4)}
  out = {}
  for i in range(3):
    tensors = {k: (v + (0.1 * i) * rng.normal(size=v.shape)).astype(
        ml_dtypes.bfloat16) for k, v in base.items()}
    out[f'm{i}'] = str(root / f'm{i}')
    mio.save_checkpoint(out[f'm{i}'], tensors, config={'model_type': 'llama'})
  return out


_CLI_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2, 3),
                        st.floats(allow_nan=True, allow_infinity=True),
                        st.text(max_size=3), st.lists(st.floats(-1, 2),
                                                      max_size=3))
_FLAGS = (('--overwrite',), ('--dtype', 'bfloat16'), ('--dtype', 'float8'),
          ('--out-shard-size', '1K'), ('--out-shard-size', 'lots'),
          ('--random-seed', '1'), ('--random-seed', 'x'), ('--no-verify',),
          ('--allow-nonfinite',), ('--copy-tokenizer',), ('--bogus',),
          ('--compute-dtype', 'float32'), ('--prefetch', '1M'))


@MORE
@hypothesis.given(
    st.sampled_from(('linear', 'task_arithmetic', 'ties', 'dare_ties', 'slerp',
                     'della', 'sce', 'model_stock', 'nuslerp', 'passthrough',
                     'nope', None)),
    st.lists(st.tuples(st.sampled_from(('m1', 'm2', 'missing', 'm0')),
                       st.dictionaries(st.sampled_from(
                           ('weight', 'density', 't', 'epsilon', 'foo')),
                           _CLI_VALUES, max_size=2)), max_size=3),
    st.sampled_from(('m0', None, 'missing')),
    st.dictionaries(st.sampled_from(('t', 'density', 'normalize', 'int8_mask',
                                     'lambda')), _CLI_VALUES, max_size=2),
    st.lists(st.sampled_from(_FLAGS), max_size=3, unique=True),
    st.sampled_from(('yaml', 'garbage', 'list')))
def test_cli_merge(tmp_path_factory, capsys, small_ckpts, method, models, base,
                   params, flags, form):
  root = tmp_path_factory.mktemp('cli_run')
  where = lambda name: small_ckpts.get(name, str(root / 'nowhere'))
  cfg = {'merge_method': method,
         'models': [{'model': where(m), 'parameters': p} for m, p in models],
         'parameters': params}
  if base is not None:
    cfg['base_model'] = where(base)
  cfg = {k: v for k, v in cfg.items() if v is not None}
  import yaml  # pylint: disable=g-import-not-at-top
  text = {'yaml': yaml.safe_dump(cfg), 'garbage': 'merge_method: [ties\n  x: :',
          'list': yaml.safe_dump([cfg])}[form]
  path = root / 'cfg.yml'
  path.write_text(text)
  out = str(root / 'out')
  argv = ['merge', str(path), out, '--quiet'] + [f for fl in flags for f in fl]
  usage_error = any(f[0] == '--bogus' or f[-1] in ('lots', 'x') for f in flags)
  try:
    with warnings.catch_warnings():
      warnings.simplefilter('ignore')
      rc = mj.cli.main(argv)
  except SystemExit as e:  # argparse's own usage error
    rc = e.code
  err = capsys.readouterr().err
  if usage_error:
    assert rc == 2 and err.startswith('usage:') and 'error:' in err, (rc, err)
    return
  assert 'Traceback' not in err
  assert not [e for e in os.listdir(root) if 'mergejax-tmp' in e]
  if rc == 0:
    assert mio.verify_checkpoint(out)
    got = mio.load_checkpoint(out)
    assert got and all(np.isfinite(np.asarray(v, np.float32)).all() for v in
                       got.values())
  else:
    assert rc in (1, 2) and err.startswith('mergejax: error: '), (rc, err)
    assert not os.path.exists(out)


@MORE
@hypothesis.given(st.one_of(
    st.sampled_from(('5B', '2G', '500M', '1e9', '1K', '1KiB', '512MiB', '0',
                     '-1', '', 'x', '1.5G', 'nanG', 'infB', '10 GB')),
    st.integers(-5, 10 ** 10), st.text(max_size=5)))
def test_parse_size(text):
  try:
    n = mj.cli.parse_size(text)
  except CLEAN as e:
    _clean(e)
    return
  assert isinstance(n, int) and n >= 0, (text, n)


@pytest.mark.parametrize('env', ('none', '', '/tmp/mergejax-cache', None))
def test_default_compile_cache(monkeypatch, env):
  if env is None:
    monkeypatch.delenv('MERGEJAX_COMPILE_CACHE', raising=False)
  else:
    monkeypatch.setenv('MERGEJAX_COMPILE_CACHE', env)
  got = mj.cli.default_compile_cache()
  if env in ('none', ''):
    assert got is None
  elif env is not None:
    assert got == env
  else:
    assert isinstance(got, str) and got.endswith(os.path.join('mergejax', 'xla'))


@FAST
@hypothesis.given(st.sampled_from(('linear', 'ties', 'task_arithmetic', 'slerp')),
                  st.sampled_from((None, 'bfloat16', 'float16')))
def test_build_jobs_and_run_merge(tmp_path_factory, small_ckpts, method, dtype):
  from mergejax.cli import _mergekit_config as mc  # pylint: disable=g-import-not-at-top
  two = [small_ckpts['m1']] + ([] if method == 'slerp' else [small_ckpts['m2']])
  cfg = {'merge_method': method, 'base_model': small_ckpts['m0'],
         'models': [{'model': m} for m in two],
         'parameters': {'t': 0.3, 'weight': 0.5, 'density': 0.5}}
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    jobs, config, _, readers = mj.cli.build_jobs(mc.load_config(cfg),
                                                 out_dtype=dtype)
    names = sorted(j.out_name for j in jobs)
    assert names == sorted(mio.CheckpointReader(small_ckpts['m0']).keys())
    assert config['model_type'] == 'llama' and readers
    out = str(tmp_path_factory.mktemp('run') / 'out')
    mj.cli.run_merge(cfg, out, dtype=dtype)
  got = mio.load_checkpoint(out)
  assert sorted(got) == names
  want = mio.parse_dtype(dtype or 'bfloat16')
  assert all(v.dtype == want for v in got.values())


# --------------------------------------------------------------------------- #
# Testing helpers.
# --------------------------------------------------------------------------- #
@FAST
@hypothesis.given(st.one_of(st.none(), st.dictionaries(
    st.sampled_from(('a', 'b/c', 'd')), st.lists(st.integers(0, 3), max_size=3)
    .map(tuple), min_size=1, max_size=3)), st.integers(1, 4),
                  st.sampled_from(DTYPES), st.booleans(), st.booleans())
def test_random_models_and_assert_trees_close(shapes, k, dtype, nested,
                                               as_numpy):
  base, models = mj.testing.random_models(shapes, k, dtype=dtype, nested=nested,
                                          as_numpy=as_numpy, seed=1)
  assert len(models) == k
  for m in models:
    assert jax.tree.structure(m) == jax.tree.structure(base)
    for x, b in zip(jax.tree.leaves(m), jax.tree.leaves(base)):
      assert x.shape == b.shape and np.dtype(x.dtype) == np.dtype(dtype)
  again = mj.testing.random_models(shapes, k, dtype=dtype, nested=nested,
                                   as_numpy=as_numpy, seed=1)
  mj.testing.assert_trees_close(again[0], base, rtol=0, atol=0)
  if any(np.size(x) for x in jax.tree.leaves(base)):
    moved = jax.tree.map(lambda x: np.asarray(x, np.float32) + 1.0, base)
    with pytest.raises(AssertionError):
      mj.testing.assert_trees_close(moved, base)
  with pytest.raises(AssertionError):
    mj.testing.assert_trees_close({'other': jnp.zeros(1)}, base)


def test_log_compilations_and_require_peer(monkeypatch):
  f = jax.jit(lambda x: x * 3.0 + 1.0)
  with mj.testing.log_compilations() as log:
    f(jnp.ones(3))
    f(jnp.ones(3) * 2)  # a cache hit: not a compilation
    f(jnp.ones(4))
  assert log.count('<lambda>') == 2
  assert isinstance(mj.testing.SMALL_SHAPES, dict) and mj.testing.SMALL_SHAPES
  monkeypatch.delenv(mj.testing.REQUIRE_PEERS_ENV, raising=False)
  with pytest.raises(pytest.skip.Exception, match='peer'):
    mj.testing.require_peer('no_such_peer_module')
  assert 'pip install' in mj.testing.PEER_SKIP_REASON
  monkeypatch.setenv(mj.testing.REQUIRE_PEERS_ENV, '1')
  with pytest.raises(ImportError):
    mj.testing.require_peer('no_such_peer_module')
  assert mj.testing.require_peer('json') is json


# --------------------------------------------------------------------------- #
# Permutation helpers (the entry points are fuzzed in tests/test_fuzz.py).
# --------------------------------------------------------------------------- #
@st.composite
def mlps(draw):
  widths = tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=3)))
  d_in, d_out = draw(st.integers(1, 3)), draw(st.integers(1, 3))
  m = permute.models.MLP(widths, num_outputs=d_out)
  x = jnp.asarray(np.random.default_rng(draw(st.integers(0, 99))).normal(
      size=(4, d_in)), jnp.float32)
  a = permute.models.init(m, jax.random.key(draw(st.integers(0, 99))), x)
  b = m.init(jax.random.key(draw(st.integers(100, 199))), x)
  return m, a['params'], b['params'], x


MALFORMED = ('ok', 'duplicate', 'out_of_range', 'negative', 'float', 'short',
             'unknown_group', 'missing_group', 'nan')


def _malform(kind, perms):
  perms = dict(perms)
  g = sorted(perms)[0]
  p = np.asarray(perms[g])
  if kind == 'duplicate' and len(p) > 1:
    perms[g] = jnp.asarray(np.r_[p[:1], p[:-1]])
  elif kind == 'out_of_range':
    perms[g] = jnp.asarray(np.r_[p[:-1], len(p)])
  elif kind == 'negative':
    perms[g] = jnp.asarray(np.r_[p[:-1], -1])
  elif kind == 'float':
    perms[g] = jnp.asarray(p, jnp.float32)
  elif kind == 'short':
    perms[g] = jnp.asarray(p[:-1])
  elif kind == 'unknown_group':
    perms['P_nope'] = jnp.asarray(p)
  elif kind == 'missing_group':  # documented: the group stays as it is
    del perms[g]
    return perms, False
  elif kind == 'nan':
    perms[g] = jnp.full(p.shape, jnp.nan)
  else:
    return perms, False
  return perms, not (kind == 'duplicate' and len(p) == 1)


@FAST
@hypothesis.given(mlps(), st.sampled_from(MALFORMED))
def test_permutation_algebra_and_checks(net, kind):
  module, a, _, x = net
  spec = permute.mlp_spec(len(module.features))
  ident = permute.identity_permutations(spec, a)
  perm = permute.random_permutations(spec, a, jax.random.key(0))
  permute.check_permutations(spec, perm, a)
  # A random permutation keeps the function; its inverse undoes it.
  y = module.apply({'params': a}, x)
  pa = permute.apply_permutation(spec, perm, a)
  np.testing.assert_allclose(module.apply({'params': pa}, x), y, rtol=1e-5,
                             atol=1e-5)
  back = permute.apply_permutation(spec, permute.inverse(perm), pa)
  mj.testing.assert_trees_close(back, a, rtol=0, atol=0)
  both = permute.compose(perm, permute.inverse(perm), spec)
  for g in spec.groups:
    np.testing.assert_array_equal(both[g], ident[g])
  twice = permute.apply_permutation(spec, permute.compose(perm, perm, spec), a)
  mj.testing.assert_trees_close(twice, permute.apply_permutation(
      spec, perm, pa), rtol=0, atol=0)
  for g, m in permute.permutation_matrices(perm).items():
    m = np.asarray(m)
    assert set(np.unique(m)) <= {0.0, 1.0}
    np.testing.assert_array_equal(m.sum(0), 1)
    np.testing.assert_array_equal(m.sum(1), 1)
  # <a, perm(a)> is at most <a, a> (Cauchy-Schwarz), equal at the identity.
  same = float(permute.objective(spec, a, a))
  assert float(permute.objective(spec, a, a, perm)) <= same + 1e-4 * abs(same)
  bad, must_fail = _malform(kind, perm)
  try:
    permute.check_permutations(spec, bad, a)
    permute.apply_permutation(spec, bad, a)
  except CLEAN as e:
    _clean(e)
    assert must_fail, e
  else:
    assert not must_fail, f'{kind} permutation accepted'


@MORE
@hypothesis.given(st.sampled_from(('mlp', 'cnn', 'resnet', 'transformer')),
                  st.integers(-1, 3), st.sampled_from(('layer', 'batch', 'group',
                                                       'none', 'bogus')))
def test_spec_builders(kind, n, norm):
  build = {'mlp': lambda: permute.mlp_spec(n),
           'cnn': lambda: permute.cnn_spec(n, norm=norm),
           'resnet': lambda: permute.resnet_spec((n, n), norm=norm),
           'transformer': lambda: permute.transformer_spec(n)}[kind]
  minimum = {'mlp': 0, 'cnn': 0, 'resnet': 1, 'transformer': 0}[kind]
  bad_norm = kind in ('cnn', 'resnet') and norm == 'bogus'
  try:
    spec = build()
  except CLEAN as e:
    _clean(e)
    assert n < minimum or bad_norm, e
    return
  assert n >= minimum and not bad_norm, (kind, n, norm)
  assert isinstance(spec, permute.PermutationSpec)
  assert permute.same_groups(spec, spec)
  assert permute.describe_difference(spec, spec) == '' or isinstance(
      permute.describe_difference(spec, spec), str)
  if kind == 'mlp':
    other = permute.mlp_spec(n + 1)
    assert not permute.same_groups(spec, other)
    assert permute.describe_difference(spec, other)
  networks = {'mlp': lambda: permute.mlp_network(n),
              'cnn': lambda: permute.cnn_network(n, norm=norm)}
  if kind in networks:
    net = networks[kind]()
    assert isinstance(net, permute.PleasNetwork) and net.layers
    assert len(net.groups) == len(spec.groups)


@FAST
@hypothesis.given(mlps())
def test_infer_spec_and_check_spec(net):
  module, a, _, x = net
  spec = permute.infer_spec(module, x, variables={'params': a})
  if min(module.features) == 1:  # a width-1 layer has no symmetry to find
    spec = permute.mlp_spec(len(module.features))
  assert permute.same_groups(spec, permute.mlp_spec(len(module.features))), (
      permute.describe_difference(spec, permute.mlp_spec(len(
          module.features))))
  apply_fn = lambda p, x: module.apply({'params': p}, x)
  permute.check_spec(spec, apply_fn, a, x, key=jax.random.key(1), trials=2)
  # A spec that also permutes the output units changes the function.
  wrong = permute.PermutationSpec({**spec.axes, **{
      f'Dense_{len(module.features)}/bias': ('P_out',)}})
  if a[f'Dense_{len(module.features)}']['bias'].shape[0] > 1:
    with pytest.raises((AssertionError, ValueError)):
      permute.check_spec(wrong, apply_fn, a, x, key=jax.random.key(2),
                         trials=3)


@FAST
@hypothesis.given(mlps(), st.sampled_from((2, 5)),
                  st.sampled_from(('endpoints', 'chord', 'bogus')))
def test_lerp_and_interpolation_barrier(net, num, relative_to):
  module, a, b, x = net
  mj.testing.assert_trees_close(permute.lerp_params(a, b, jnp.float32(0)), a)
  mj.testing.assert_trees_close(permute.lerp_params(a, b, jnp.float32(1)), b,
                                rtol=1e-6, atol=1e-6)
  # A metric linear in the parameters has no barrier against its chord.
  linear = lambda p: sum(jnp.sum(v) for v in jax.tree.leaves(p))
  try:
    r = permute.interpolation_barrier(linear, a, b, num=num,
                                      relative_to=relative_to)
  except CLEAN as e:
    _clean(e)
    assert relative_to == 'bogus'
    return
  assert relative_to != 'bogus'
  assert r.curve.shape == (num,) and r.lambdas.shape == (num,)
  if relative_to == 'chord':
    assert abs(float(r.barrier)) < 1e-3 * (1 + float(jnp.max(jnp.abs(
        r.curve))))
  loss = lambda p: jnp.mean(module.apply({'params': p}, x) ** 2)
  r = permute.interpolation_barrier(loss, a, b, num=num)
  assert np.isfinite(float(r.barrier))


def _hidden_features(p, x):
  out, h = {}, x
  layers = sorted((k for k in p if k.startswith('Dense_')),
                  key=lambda k: int(k.split('_')[1]))
  for i, name in enumerate(layers[:-1]):
    h = jax.nn.relu(h @ p[name]['kernel'] + p[name]['bias'][None])
    out[f'P_{i}'] = h
  return out


@FAST
@hypothesis.given(mlps(), st.lists(st.integers(1, 4), max_size=3))
def test_activation_statistics(net, sizes):
  module, a, b, x = net
  rng = np.random.default_rng(len(sizes))
  batches = [jnp.asarray(rng.normal(size=(n, x.shape[1])), jnp.float32)
             for n in sizes]
  got = permute.activation_statistics(_hidden_features, a, b, batches)
  if not batches:
    assert got == {}
    return
  xs = jnp.concatenate(batches)
  fa, fb = _hidden_features(a, xs), _hidden_features(b, xs)
  assert sorted(got) == sorted(fa)
  for g, (m,) in got.items():
    ya, yb = np.asarray(fa[g], np.float64), np.asarray(fb[g], np.float64)
    assert m.n == len(xs)
    for have, want in ((m.sa, ya.sum(0)), (m.sb, yb.sum(0)),
                       (m.saa, (ya * ya).sum(0)), (m.sbb, (yb * yb).sum(0)),
                       (m.sab, ya.T @ yb)):
      np.testing.assert_allclose(have, want, rtol=1e-4, atol=1e-4)


@MORE
@hypothesis.given(st.lists(st.floats(-5, 5), min_size=1, max_size=16),
                  st.sampled_from((1e-3, 0.1, 1.0, NAN, 0.0, -1.0)),
                  st.sampled_from((0, 1, 20)), st.booleans())
def test_sinkhorn(values, tau, n_iter, poison):
  n = int(np.sqrt(len(values)))
  if n == 0:
    return
  cost = jnp.asarray(np.asarray(values[:n * n]).reshape(n, n), jnp.float32)
  if poison:
    cost = cost.at[0, 0].set(NAN)
  try:
    p = permute.sinkhorn(cost, tau=tau, n_iter=n_iter)
  except CLEAN as e:
    _clean(e)
    assert poison or not tau > 0 or n_iter < 1, e
    return
  assert not poison and tau > 0 and n_iter >= 1
  p = np.asarray(p)
  assert np.isfinite(p).all() and (p >= 0).all()
  np.testing.assert_allclose(p.sum(0), 1, atol=1e-3)  # the last step: columns
  np.testing.assert_allclose(p.sum(1), 1, atol=0.5)


@MORE
@hypothesis.given(st.lists(st.tuples(st.integers(0, 6), st.integers(1, 6)),
                           min_size=2, max_size=4),
                  st.floats(0.0, 3.0), st.sampled_from(('params', 'flops',
                                                        'bogus')),
                  st.sampled_from((None, 1, 2)))
def test_choose_ratios_and_merged_size(dims, size, measure, step):
  dims = [(max(dims[0][0], 1), dims[0][1])] + [
      (dims[i - 1][1], d[1]) for i, d in enumerate(dims) if i]
  rng = np.random.default_rng(len(dims))
  sims = [rng.uniform(-1, 1, size=d[1]) for d in dims[:-1]]
  try:
    ratios = permute.choose_ratios(sims, dims, size, step=step, measure=measure)
  except CLEAN as e:
    _clean(e)
    assert measure == 'bogus' or size < 1.0, (e, size)
    return
  assert measure != 'bogus' and size >= 1.0
  assert len(ratios) == len(dims) - 1 and all(0.0 <= r <= 1.0 for r in ratios)
  floor = permute.merged_size(dims, [0.0] * len(ratios), measure=measure)
  got = permute.merged_size(dims, ratios, measure=measure)
  assert got <= max(size, floor) + 1e-9, (got, size, floor)
  assert abs(permute.merged_size(dims, [1.0] * len(ratios), measure=measure)
             - 2.0) < 1e-9  # nothing merged: two models


# --------------------------------------------------------------------------- #
# Coverage: every public name is fuzzed, or says why not and where it is tested.
# --------------------------------------------------------------------------- #
IN_TEST_FUZZ = 'tests/test_fuzz.py'
# --------------------------------------------------------------------------- #
# Search: populations of candidates.
# --------------------------------------------------------------------------- #
@FAST
@hypothesis.given(st.integers(0, 9), st.sampled_from((None, 1, 3, 4)),
                  st.booleans(), st.sampled_from((None, 'ragged', 'scalar')))
def test_evaluate_population_is_a_loop_over_candidates(n, chunk, sharded,
                                                       defect):
  rng = np.random.default_rng(n)
  pop = {'c': jnp.asarray(rng.normal(size=(n, 3)), jnp.float32),
         'd': jnp.asarray(rng.uniform(size=(n,)), jnp.float32)}
  if defect == 'ragged':
    pop['d'] = pop['d'][:max(n - 1, 0)] if n else jnp.zeros(1)
  elif defect == 'scalar':
    pop['d'] = jnp.float32(0.5)
  fn = lambda c: {'s': jnp.sum(c['c'] ** 2) * c['d'], 'v': c['c'] + c['d']}
  mesh = mj.parallel.make_mesh((1, 8)) if sharded else None
  try:
    out = mj.search.evaluate_population(fn, pop, chunk_size=chunk, mesh=mesh)
  except CLEAN as e:
    _clean(e)
    assert defect or n == 0, e
    return
  assert not defect and n > 0
  want = [fn(jax.tree.map(lambda x, i=i: x[i], pop)) for i in range(n)]
  mj.testing.assert_trees_close(
      out, jax.tree.map(lambda *xs: jnp.stack(xs), *want), rtol=1e-6,
      atol=1e-6)


COVERAGE = {
    'mergejax': {
        'MergeTransformation': 'a NamedTuple type (built by every case)',
        'EmptyState': 'a NamedTuple type',
        'chain': test_composition_matches_plain_merges,
        'named_chain': test_composition_matches_plain_merges,
        'identity': test_composition_matches_plain_merges,
        'static_fn': test_composition_matches_plain_merges,
        'masked': test_composition_matches_plain_merges,
        'partition': test_composition_matches_plain_merges,
        'merge': test_merge_and_check_models_reject_bad_trees,
        'check_models': test_merge_and_check_models_reject_bad_trees,
        'check_hparam': test_check_hparam,
        'stack_models': test_stack_models_and_path_helpers,
        'leaf_paths': test_stack_models_and_path_helpers,
        'flatten_to_dict': test_stack_models_and_path_helpers,
        'layer_index': test_layer_index_of_any_path,
        'transforms': IN_TEST_FUZZ, 'methods': IN_TEST_FUZZ,
        'stats': 'namespace', 'permute': 'namespace', 'parallel': 'namespace',
        'search': 'namespace',
        'io': 'namespace', 'cli': 'namespace', 'testing': 'namespace',
    },
    'mergejax.search': {
        'evaluate_population': test_evaluate_population_is_a_loop_over_candidates,
        'population_evaluator': 'compiles once, chunks, shards '
                                '(tests/test_search.py)',
        'evolve': 'finds the optimum, resumes from orbax, records history '
                  '(tests/test_evolve.py)',
        'SearchResult': 'a NamedTuple type (tests/test_evolve.py)',
        'fit_quadratic': 'recovers exact quadratics, traced ridge '
                         '(tests/test_map.py)',
        'predict': 'a plain quadratic form (tests/test_map.py)',
        'QuadraticSurrogate': 'a NamedTuple type (tests/test_map.py)',
        'MapResult': 'a NamedTuple type (tests/test_map.py)',
        'map_search': 'front equals a grid front, adaptive rounds '
                      '(tests/test_map.py)',
        'nested_map': 'separable optima, preferences (tests/test_map.py)',
        'surrogate_front': 'equals a grid front (tests/test_map.py)',
        'pareto_mask': 'the plain definition, ties, NaN (tests/test_map.py)',
        'hypervolume': 'inclusion-exclusion (tests/test_map.py)',
        'm2n2': 'archive rules, determinism, one compile (tests/test_m2n2.py)',
        'M2N2Result': 'a NamedTuple type (tests/test_m2n2.py)',
        'niche_fitness': 'the plain sums (tests/test_m2n2.py)',
        'attraction': 'the plain sums (tests/test_m2n2.py)',
        'crossover': 'SLERP with a split, pytrees (tests/test_m2n2.py)',
        'evo_coefficients': 'denoising and scaling against numpy '
                            '(tests/test_evo_merging.py)',
        'evo_merging': 'finds the relevant models (tests/test_evo_merging.py)',
        'layerwise_space': 'blocks, errors (tests/test_layerwise.py)',
        'LayerwiseSpace': 'a NamedTuple type (tests/test_layerwise.py)',
        'layerwise_candidate': 'shapes, errors (tests/test_layerwise.py)',
        'layerwise_merge': 'a plain per-block merge, vmapped '
                           '(tests/test_layerwise.py)',
    },
    'mergejax.stats': {
        'fisher_diagonal': test_fisher_diagonal,
        'FISHER_KINDS': test_fisher_diagonal,
        'input_grams': test_input_grams_of_linen_dense_inputs,
        'linen_dense_inputs': test_input_grams_of_linen_dense_inputs,
        'nnx_functional': 'an nnx module as a function, equal to linen '
                          '(tests/test_nnx_data_informed.py)',
        'nnx_linear_inputs': 'equal to linen_dense_inputs on the same tree '
                             '(tests/test_nnx_data_informed.py)',
    },
    'mergejax.io': {
        'atomic_output_dir': test_atomic_output_dir_refuses_dangerous_paths,
        'CheckpointReader': test_checkpoint_roundtrip,
        'DEFAULT_SHARD_SIZE': 'a constant',
        'flax_to_hf': test_hf_flax_layouts_roundtrip,
        'hf_to_flax': test_hf_flax_layouts_roundtrip,
        'GENERIC_RULES': test_hf_flax_layouts_roundtrip,
        'LLAMA_RULES': test_hf_flax_layouts_roundtrip,
        'NameRule': 'a dataclass of the rules (tests/test_io.py)',
        'load_checkpoint': test_corrupt_checkpoints_are_rejected_naming_the_file,
        'save_checkpoint': test_checkpoint_roundtrip,
        'verify_checkpoint': test_corrupt_checkpoints_are_rejected_naming_the_file,
        'load_orbax': test_orbax_roundtrip, 'save_orbax': test_orbax_roundtrip,
        'parse_dtype': test_parse_dtype,
        'remove_stale_tmp_dirs': test_remove_stale_tmp_dirs,
        'ShardedWriter': 'the writer behind save_checkpoint and stream_merge '
                         '(tests/test_io.py)',
        'TensorSpec': 'a dataclass of ShardedWriter (tests/test_io.py)',
        'extract_lora': 'ranks, errors and PEFT files, parity with '
                        'mergekit-extract-lora (tests/test_lora_io.py)',
        'LoraCheckpointReader': 'equal to the dense fine-tune and to PEFT '
                                '(tests/test_lora_io.py)',
        'LoraExtraction': 'a NamedTuple of results',
        'open_checkpoint': 'model+lora references through a merge '
                           '(tests/test_lora_io.py)',
        'read_lora': 'alpha, rslora, fan_in_fan_out (tests/test_lora_io.py)',
    },
    'mergejax.parallel': {
        'DEFAULT_RULES': test_param_specs_and_fsdp_spec,
        'FSDP_AXIS': 'a constant', 'MODEL_AXIS': 'a constant',
        'fsdp_spec': test_param_specs_and_fsdp_spec,
        'make_mesh': test_make_mesh,
        'param_specs': test_param_specs_and_fsdp_spec,
        'put_sharded': test_param_specs_and_fsdp_spec,
        'stacked_spec': test_param_specs_and_fsdp_spec,
        'prepare_sharded_merge': test_sharded_merge_equals_merge,
        'sharded_merge': test_sharded_merge_equals_merge,
        'stack_sharded': test_sharded_merge_equals_merge,
        'stream_merge': test_stream_merge_equals_merge,
        'StreamStats': test_stream_merge_equals_merge,
        'free_port': test_single_process_distributed_helpers,
        'gather': test_single_process_distributed_helpers,
        'is_coordinator': test_single_process_distributed_helpers,
        'is_initialized': test_single_process_distributed_helpers,
        'shutdown': test_single_process_distributed_helpers,
        'sync': test_single_process_distributed_helpers,
        'initialize': 'starts multi-process JAX (tests/test_distributed.py)',
        'launch_local': 'spawns processes (tests/test_distributed.py)',
    },
    'mergejax.cli': {
        'build_jobs': test_build_jobs_and_run_merge,
        'run_merge': test_build_jobs_and_run_merge,
        'main': test_cli_merge, 'parse_size': test_parse_size,
        'default_compile_cache': test_default_compile_cache,
    },
    'mergejax.testing': {
        'CompilationLog': test_log_compilations_and_require_peer,
        'log_compilations': test_log_compilations_and_require_peer,
        'assert_trees_close': test_random_models_and_assert_trees_close,
        'random_models': test_random_models_and_assert_trees_close,
        'SMALL_SHAPES': test_log_compilations_and_require_peer,
        'require_peer': test_log_compilations_and_require_peer,
        'PEER_SKIP_REASON': test_log_compilations_and_require_peer,
        'REQUIRE_PEERS_ENV': test_log_compilations_and_require_peer,
    },
    'mergejax.permute': {
        **{n: IN_TEST_FUZZ for n in (
            'weight_matching', 'permute_align', 'sinkhorn_matching',
            'ste_matching', 'activation_matching', 'apply_permutation',
            'soft_apply_permutation', 'merge_many', 'solve_assignment',
            'merge_lock', 'unlock')},
        'check_permutations': test_permutation_algebra_and_checks,
        'compose': test_permutation_algebra_and_checks,
        'identity_permutations': test_permutation_algebra_and_checks,
        'inverse': test_permutation_algebra_and_checks,
        'objective': test_permutation_algebra_and_checks,
        'permutation_matrices': test_permutation_algebra_and_checks,
        'random_permutations': test_permutation_algebra_and_checks,
        'check_spec': test_infer_spec_and_check_spec,
        'infer_spec': test_infer_spec_and_check_spec,
        'cnn_spec': test_spec_builders, 'mlp_spec': test_spec_builders,
        'resnet_spec': test_spec_builders,
        'transformer_spec': test_spec_builders,
        'cnn_network': test_spec_builders, 'mlp_network': test_spec_builders,
        'same_groups': test_spec_builders,
        'describe_difference': test_spec_builders,
        'choose_ratios': test_choose_ratios_and_merged_size,
        'merged_size': test_choose_ratios_and_merged_size,
        'interpolation_barrier': test_lerp_and_interpolation_barrier,
        'lerp_params': test_lerp_and_interpolation_barrier,
        'sinkhorn': test_sinkhorn,
        'models': test_permutation_algebra_and_checks,
        'resnet_network': 'built by pleas on ResNets '
                          '(tests/test_permute_pleas.py)',
        'pleas': 'fits layers on a user model; its input defects have '
                 'regression tests (tests/test_permute_pleas.py)',
        'repair': 'rescales units of a user model over data '
                  '(tests/test_permute_eval.py)',
        'reset_batch_stats': 'reruns BatchNorm over data '
                             '(tests/test_permute_eval.py)',
        'activation_statistics': test_activation_statistics,
        'lock_report': 'reads merge_lock outputs (tests/test_lock.py)',
        'Barrier': 'a NamedTuple of results', 'LayerDims': 'a NamedTuple',
        'LockReport': 'a NamedTuple of results',
        'MergeLockResult': 'a NamedTuple of results',
        'MatchingResult': 'a NamedTuple of results',
        'PermutationSpec': 'the spec type (every permute test builds one)',
        'PermuteAlignState': 'a NamedTuple state',
        'PleasLayer': 'a NamedTuple', 'PleasNetwork': 'a NamedTuple',
        'PleasResult': 'a NamedTuple of results',
        'SinkhornMatchingResult': 'a NamedTuple of results',
    },
}


@pytest.mark.parametrize('namespace', sorted(COVERAGE))
def test_every_public_name_is_covered(namespace):
  import importlib  # pylint: disable=g-import-not-at-top
  public = set(importlib.import_module(namespace).__all__)
  listed = set(COVERAGE[namespace])
  assert not public - listed, (
      f'{namespace} names without a fuzz test or an exemption: '
      f'{sorted(public - listed)}; add a test here (or a reason, naming the '
      'test file that covers it) to COVERAGE.')
  assert not listed - public, f'stale COVERAGE entries: {sorted(listed - public)}'
  for name, how in COVERAGE[namespace].items():
    if callable(how):
      assert how.__name__.startswith('test_') and how.__module__ == __name__
    else:
      assert isinstance(how, str) and how, name
      files = re.findall(r'tests/\w+\.py', how)
      for f in files:
        assert os.path.exists(os.path.join(os.path.dirname(__file__), '..', f)
                              ), f'{name}: {f} does not exist'


@pytest.mark.slow
def test_long_fuzz():
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  env = {**os.environ, EXAMPLES_ENV: '60'}
  out = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-x',
                        '-p', 'no:cacheprovider', __file__, '-k',
                        'not long_fuzz'], env=env, capture_output=True,
                       text=True, timeout=3600)
  assert out.returncode == 0, out.stdout[-4000:]
