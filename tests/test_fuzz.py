"""Property-based fuzzing of the public merge methods and permutation entry points.

Random trees (scalars, zero-size and length-1 leaves, fp32/bf16/fp16, one to
four models, identical or distinct), random in-range hyperparameters and
invalid ones (NaN, out of range) go into every public method of
`mergejax.methods`, the permutation entry points and the CLI config parser.
Every call must either return a result with the base's structure, shapes and
dtype and no NaN/Inf (the inputs are finite), or raise a clean `ValueError`
/ `TypeError` naming the problem: never a crash inside NumPy or XLA, a silent
NaN, or an accepted invalid hyperparameter, eagerly or traced under jit.

`test_every_public_name_is_fuzzed` and `test_every_building_block_is_fuzzed`
fail when a public method or building block has neither a fuzz case here nor
an exemption with its reason; `tests/test_fuzz_runtime.py` covers the other
namespaces (core, stats, io, parallel, cli, testing, the rest of permute).
The suite is derandomised (reproducible in CI); ``-m slow`` runs many more
examples.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Any, Callable

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mergejax as mj
from mergejax import permute

SHAPES = ((), (1,), (0, 4), (3,), (4, 5), (1, 6), (5, 1), (2, 3, 4))
MATRIX_SHAPES = ((4, 5), (1, 6), (5, 1), (6, 6), (0, 3), (3,), ())
DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
CLEAN = (ValueError, TypeError)
FAST = hypothesis.settings(max_examples=4, deadline=None, derandomize=True,
                           database=None,
                           suppress_health_check=list(hypothesis.HealthCheck))
LONG = hypothesis.settings(FAST, max_examples=60)


@dataclasses.dataclass(frozen=True)
class Case:
  """How to call one public method.

  Attributes:
    make: ``(hparams, k) -> MergeTransformation``.
    valid: per hyperparameter, values that must be accepted.
    invalid: per hyperparameter, values that must raise (eagerly).
    traced: hyperparameters that may be traced under jit (checked with NaN).
    k: the numbers of fine-tuned models it takes.
    base: whether it takes a base model.
    shapes: leaf shapes to draw from.
  """
  make: Callable[[dict, int], Any]
  valid: dict = dataclasses.field(default_factory=dict)
  invalid: dict = dataclasses.field(default_factory=dict)
  traced: tuple = ()
  k: tuple = (1, 2, 3, 4)
  base: bool = True
  shapes: tuple = SHAPES


def _m(name, **fixed):
  return lambda h, k: getattr(mj.methods, name)(**fixed, **h)


NAN = float('nan')
LAM = dict(lambda_=[0.3, 1.0, 2.0])
BAD_LAM = dict(lambda_=[NAN, float('inf')])
DENSITY = dict(density=[0.1, 0.5, 1.0])
BAD_DENSITY = dict(density=[NAN, -0.5, 1.5])

CASES: dict[str, Case] = {
    'average': Case(_m('average'), base=False),
    'linear': Case(lambda h, k: mj.methods.linear(h.get('weight', [1.0] * k)),
                   invalid=dict(weight=['zeros', 'nan']), base=False),
    'task_arithmetic': Case(_m('task_arithmetic'), LAM, BAD_LAM, ('lambda_',)),
    'passthrough': Case(_m('passthrough'), dict(scale=[0.5, 1.0, 2.0]),
                        dict(scale=[NAN]), ('scale',), k=(1,), base=False),
    'arcee_fusion': Case(_m('arcee_fusion'), k=(1,)),
    'karcher': Case(_m('karcher'), dict(max_iter=[1, 10]), base=False),
    'model_stock': Case(_m('model_stock'), dict(filter_wise=[False, True]),
                        k=(2, 3)),
    'multislerp': Case(_m('multislerp'), invalid=dict(eps=[NAN])),
    'nearswap': Case(lambda h, k: mj.methods.nearswap(h.get('t', 0.5)),
                     dict(t=[0.01, 0.5]), dict(t=[NAN, -1.0]), ('t',), k=(1,)),
    'nuslerp': Case(lambda h, k: mj.methods.nuslerp(h.get('weight', [1.0, 0.5])),
                    invalid=dict(weight=['nan']), k=(2,), base=False),
    'slerp': Case(lambda h, k: mj.methods.slerp(h.get('t', 0.5)),
                  dict(t=[0.0, 0.3, 1.0]), dict(t=[NAN]), ('t',), k=(1,)),
    'breadcrumbs': Case(_m('breadcrumbs'), {**DENSITY, 'gamma': [0.0, 0.1]},
                        {**BAD_DENSITY, 'gamma': [NAN]}, ('density', 'gamma')),
    'breadcrumbs_ties': Case(_m('breadcrumbs_ties'), DENSITY, BAD_DENSITY,
                             ('density',)),
    'dare_linear': Case(_m('dare_linear'), DENSITY, BAD_DENSITY, ('density',)),
    'dare_ties': Case(_m('dare_ties'), DENSITY, BAD_DENSITY, ('density',)),
    'della': Case(_m('della', axis=None), {**DENSITY, 'epsilon': [0.0, 0.05]},
                  {**BAD_DENSITY, 'epsilon': [NAN]}, ('density',)),
    'della_linear': Case(_m('della_linear', axis=None), DENSITY, BAD_DENSITY,
                         ('density',)),
    'magmax': Case(_m('magmax'), LAM, BAD_LAM, ('lambda_',)),
    'ram': Case(_m('ram'), invalid=dict(epsilon=[NAN])),
    'ramplus_tl': Case(_m('ramplus_tl'), dict(r=[0.1, 0.5]), dict(r=[NAN])),
    'sce': Case(_m('sce'), dict(select_topk=[0.1, 1.0, 1.5]),  # >= 1 keeps all
                dict(select_topk=[NAN, -0.5]), ('select_topk',)),
    'ties': Case(_m('ties'), {**DENSITY, 'scope': ['tensor', 'global']},
                 {**BAD_DENSITY, **BAD_LAM}, ('density', 'lambda_')),
    'consensus': Case(_m('consensus'), dict(k=[1, 2]), dict(lambda_=[NAN]),
                      k=(2, 3)),
    'emr': Case(_m('emr')),
    'iso_c': Case(_m('iso_c'), dict(alpha=[0.5, 1.0]), dict(alpha=[NAN]),
                  shapes=MATRIX_SHAPES),
    'iso_cts': Case(_m('iso_cts'), invalid=dict(alpha=[NAN]), k=(2, 3),
                    shapes=MATRIX_SHAPES),
    'knots': Case(_m('knots'), invalid=dict(lambda_=[NAN]), shapes=MATRIX_SHAPES),
    'lines': Case(lambda h, k: mj.methods.lines(mj.methods.task_arithmetic(), **h),
                  dict(beta=[0.0, 0.5]), dict(beta=[NAN])),
    'pcb': Case(_m('pcb'), dict(pcb_ratio=[0.1, 0.5]), dict(pcb_ratio=[NAN, 1.5]),
                ('pcb_ratio',), k=(2, 3)),
    'reversible': Case(lambda h, k: mj.methods.reversible(h.get('budget', 2)),
                       dict(budget=[1, 3]), dict(budget=[0, -1])),
    'rtsvm': Case(_m('rtsvm'), invalid=dict(alpha=[NAN]), shapes=MATRIX_SHAPES),
    'tall_masks': Case(_m('tall_masks'), dict(tall_lambda=[0.4, 1.0]),
                       dict(tall_lambda=[NAN])),
    'tsv': Case(_m('tsv'), invalid=dict(alpha=[NAN]), shapes=MATRIX_SHAPES),
    'widen': Case(_m('widen'), invalid=dict(t=[NAN]), shapes=MATRIX_SHAPES),
    'twin': Case(_m('twin'), dict(density=[0.1, 0.5]), dict(density=[NAN, 1.5]),
                 shapes=MATRIX_SHAPES),
    'opcm': Case(_m('opcm'), dict(alpha=[0.1, 0.5]), dict(alpha=[NAN]),
                 ('alpha',), shapes=MATRIX_SHAPES),
    'wudi': Case(_m('wudi', steps=3), dict(solver=['adam', 'closed_form']),
                 dict(learning_rate=[NAN, -1.0], lambda_=[NAN]),
                 ('learning_rate', 'lambda_'), shapes=MATRIX_SHAPES),
    'doge_ta': Case(_m('doge_ta', steps=3),
                    dict(projection=['gradient', 'update'],
                         other=['zero', 'mean'], density=[0.1, 1.0]),
                    dict(lamda=[NAN, -1.0], learning_rate=[NAN],
                         density=[NAN, 0.0, 1.5]),
                    ('lamda', 'learning_rate', 'density'),
                    shapes=MATRIX_SHAPES),
    'mwa': Case(lambda h, k: mj.methods.mwa(np.arange(1.0, k + 1.0),
                                            kind='step', **h),
                dict(penalty=[0.0, 2.0]), dict(penalty=[NAN])),
}

# Public names of mergejax.methods and mergejax.permute that are not entry
# points taking arbitrary trees, with where they are exercised instead.
EXEMPT = {
    'AdaMergingResult': 'a NamedTuple of results',
    'reconstruct': 'reads the state `reversible` returns: fuzzed with it',
    'twin_mix': 'reads the state `twin` returns: fuzzed with it',
    'twin_apply': 'runs a user model on twin_mix weights (tests/test_twin.py)',
    'twin_dense': 'one Dense layer of twin_apply (tests/test_twin.py)',
    'twin_route': 'a router forward pass (tests/test_twin.py)',
    'twin_train_router': 'trains a router on features (tests/test_twin.py)',
    'regmean_plusplus': 'runs a user model layer by layer '
                        '(tests/test_data_informed.py)',
    'fit_adamerging': 'trains coefficients through a user loss '
                      '(tests/test_data_informed.py)',
    'fit_concrete': 'trains a mask through a user loss '
                    '(tests/test_concrete_dam.py)',
    'fit_dam': 'trains a mask and perturbations through a user model '
               '(tests/test_concrete_dam.py)',
    'ConcreteResult': 'a NamedTuple of results',
    'concrete_adamerging': 'shared_mask then coefficient_sum, both fuzzed as '
                           'building blocks (tests/test_concrete_dam.py)',
    'fit_concrete_adamerging': 'trains a mask and coefficients through a '
                               'user loss (tests/test_concrete_dam.py)',
    'ConcreteAdaMergingResult': 'a NamedTuple of results',
    'fit_surgery': 'fits adapters on user features (tests/test_surgery.py)',
    'surgery_apply': 'one adapter on features (tests/test_surgery.py)',
    'SurgeryResult': 'a NamedTuple of results',
    'fit_expert_merging': 'fits coefficients through user outputs '
                          '(tests/test_expert_merging.py)',
    'ExpertMergingResult': 'a NamedTuple of results',
    'importance_chunks': 'allots chunk counts from fitted coefficients '
                         '(tests/test_expert_merging.py)',
    'DamResult': 'a NamedTuple of results',
    'wemoe_init': 'builds routers for dense layers of a user model '
                  '(tests/test_wemoe.py)',
    'wemoe_apply': 'runs a user Flax model (tests/test_wemoe.py)',
    'wemoe_gates': 'a router forward pass (tests/test_wemoe.py)',
    'wemoe_dense': 'one routed Dense layer (tests/test_wemoe.py)',
    'fit_wemoe': 'trains routers through a user loss (tests/test_wemoe.py)',
    'WEMoEState': 'a NamedTuple state', 'WEMoEResult': 'a NamedTuple of results',
    'WEMoERouter': 'a NamedTuple of router weights',
    'PrunedTaskVectors': 'a NamedTuple of kept entries',
    'mwa_weights': 'the weights of mwa, fuzzed with it (tests/test_mwa.py)',
    'mwa_tracker': 'a running form of mwa (tests/test_mwa.py)',
    'mwa_optax': 'an optax hook around mwa_tracker (tests/test_mwa.py)',
    'MWAState': 'a NamedTuple state', 'MWATracker': 'a NamedTuple of functions',
    'MWATrackerState': 'a NamedTuple state',
    'MWAOptaxState': 'a NamedTuple state',
    't3_apply': 'runs a user model at test time (tests/test_t3.py)',
    't3_coefficients': 'coefficients from logits (tests/test_t3.py)',
    'js_divergence': 'a divergence of logits (tests/test_t3.py)',
    'T3Output': 'a NamedTuple of results',
    'fit_fw_merging': 'optimises through a user loss (tests/test_fw.py)',
    'FWResult': 'a NamedTuple of results',
    'CandidatePool': 'a NamedTuple of a size and a loader',
}
DATA_CASES = ('fisher_merging', 'ota', 'regmean', 'adamerging',
              'prediction_entropy', 'lora_svd', 'lora_lego', 'concrete',
              'concrete_mask', 'rcp_merging')
PERMUTE_CASES = ('weight_matching', 'permute_align', 'sinkhorn_matching',
                 'ste_matching', 'activation_matching', 'apply_permutation',
                 'soft_apply_permutation', 'merge_many', 'solve_assignment',
                 'merge_lock', 'unlock')


# --------------------------------------------------------------------------- #
# Strategies.
# --------------------------------------------------------------------------- #
@st.composite
def model_sets(draw, ks=(1, 2, 3, 4), shapes=SHAPES):
  """``(base, [models])``: finite random trees of one architecture."""
  n = draw(st.integers(1, 3))
  leaf_shapes = [draw(st.sampled_from(shapes)) for _ in range(n)]
  dtype = draw(st.sampled_from(DTYPES))
  k = draw(st.sampled_from(ks))
  spread = draw(st.sampled_from((0.0, 1e-3, 1.0)))
  rng = np.random.default_rng(draw(st.integers(0, 2 ** 16)))
  base = {f'layers_{i}': {'kernel' if len(s) > 1 else 'bias':
                          rng.normal(size=s)} for i, s in enumerate(leaf_shapes)}
  models = [jax.tree.map(lambda x: x + spread * rng.normal(size=np.shape(x)),
                         base) for _ in range(k)]
  cast = lambda t: jax.tree.map(lambda x: jnp.asarray(x, dtype), t)
  return cast(base), [cast(m) for m in models]


def _check_result(out, base):
  assert jax.tree.structure(out) == jax.tree.structure(base)
  for o, b in zip(jax.tree.leaves(out), jax.tree.leaves(base)):
    assert o.shape == b.shape, (o.shape, b.shape)
    assert o.dtype == b.dtype, (o.dtype, b.dtype)
    assert bool(jnp.all(jnp.isfinite(o))), 'NaN/Inf from finite inputs'


def _weights(spec, k):
  if spec == 'zeros':
    return [0.0] * k
  if spec == 'nan':
    return [NAN] + [1.0] * (k - 1)
  return spec


def _call(case, h, base, models):
  tx = case.make(h, len(models))
  return mj.merge(tx, base if case.base else None, models,
                  key=jax.random.key(0))


def _fuzz_one(name, case, data, call):
  """Draws models and hyperparameters for ``case``; checks ``call``'s outcome."""
  base, models = data.draw(model_sets(case.k, case.shapes))
  h = {p: data.draw(st.sampled_from(v)) for p, v in case.valid.items()
       if data.draw(st.booleans())}
  bad = None
  if case.invalid and data.draw(st.booleans()):
    bad = data.draw(st.sampled_from(sorted(case.invalid)))
    h[bad] = _weights(data.draw(st.sampled_from(case.invalid[bad])), len(models))
  try:
    out = call(h, base, models)
  except CLEAN as e:
    assert str(e), 'an error without a message'
    return
  assert bad is None, f'{name}: invalid {bad}={h[bad]!r} was accepted'
  _check_result(out, base)


def _run_case(name, data):
  case = CASES[name]
  _fuzz_one(name, case, data, functools.partial(_call, case))


def _fuzz(name, settings):
  def run(data):
    _run_case(name, data)
  run.__name__ = f'fuzz_{name}'
  hypothesis.given(data=st.data())(settings(run))()


@pytest.mark.parametrize('name', sorted(CASES))
def test_methods_return_clean_results_or_clean_errors(name):
  _fuzz(name, FAST)


@pytest.mark.slow
@pytest.mark.parametrize('name', sorted(CASES))
def test_methods_long_fuzz(name):
  _fuzz(name, LONG)


@pytest.mark.parametrize('name', sorted(n for n in CASES if CASES[n].traced))
def test_traced_invalid_hyperparameters_raise_under_jit(name):
  case = CASES[name]
  base = {'w': jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)}
  models = [jax.tree.map(lambda x, i=i: x + 0.1 * (i + 1), base)
            for i in range(max(case.k))]
  for p in case.traced:
    fn = jax.jit(lambda v, p=p: _call(case, {p: v}, base, models))
    # The range check runs with the computation: its ValueError text arrives
    # in a JaxRuntimeError.
    with pytest.raises(Exception, match='traced value'):
      jax.block_until_ready(fn(jnp.float32(NAN)))


# --------------------------------------------------------------------------- #
# Methods that take statistics or factors rather than bare trees.
# --------------------------------------------------------------------------- #
def _statistics_like(models, kind, seed):
  """Per-model statistics trees (Fishers, second moments) of one ``kind``."""
  rng = np.random.default_rng(seed)
  make = {'ok': lambda x: jnp.abs(jnp.asarray(rng.normal(size=x.shape))),
          'zeros': jnp.zeros_like,
          'nan': lambda x: jnp.full(x.shape, NAN),
          'negative': lambda x: -jnp.ones(x.shape)}[kind]
  return [jax.tree.map(lambda x: make(x).astype(jnp.float32), m)
          for m in models]


@FAST
@hypothesis.given(model_sets(ks=(1, 2, 3)), st.sampled_from(
    ('ok', 'zeros', 'nan', 'negative')),
                  st.sampled_from((None, 0.0, 0.3, 1.0, NAN)), st.booleans(),
                  st.sampled_from(('none', 'global')))
def test_ota(data, nu, density, compress, normalize):
  base, models = data
  nus = _statistics_like(models, nu, seed=1)
  empty = all(x.size == 0 for x in jax.tree.leaves(models[0]))
  try:
    out = mj.merge(mj.methods.ota(nus, graft_density=density, compress=compress,
                                  normalize=normalize), base, models)
  except CLEAN:
    assert nu in ('nan', 'negative') or empty or (
        density is not None and density != density) or any(
            0 in x.shape for x in jax.tree.leaves(base)), (nu, density)
    return
  assert nu in ('ok', 'zeros') and not (density is not None and
                                        density != density), (nu, density)
  _check_result(out, base)


@FAST
@hypothesis.given(model_sets(ks=(1, 2, 3)), st.sampled_from(
    ('ok', 'zeros', 'nan', 'negative')))
def test_fisher_merging(data, fisher):
  _, models = data
  fishers = _statistics_like(models, fisher, seed=0)
  try:
    out = mj.merge(mj.methods.fisher_merging(fishers), None, models)
  except CLEAN:
    return
  assert fisher in ('ok', 'zeros') or all(
      x.size == 0 for x in jax.tree.leaves(models[0])), fisher
  _check_result(out, models[0])


@FAST
@hypothesis.given(model_sets(ks=(2, 3)), st.sampled_from(
    ('ok', 'zeros', 'nan', 'negative')))
def test_rcp_merging(data, fisher):
  _, models = data
  prior = _statistics_like(models[:1], 'ok', seed=2)[0]
  fishers = _statistics_like(models[1:] or models[:1], fisher, seed=0)
  try:
    out = mj.merge(mj.methods.rcp_merging(prior, fishers), models[0],
                   models[1:] or models[:1])
  except CLEAN:
    return
  assert fisher in ('ok', 'zeros') or all(
      x.size == 0 for x in jax.tree.leaves(models[0])), fisher
  _check_result(out, models[0])


@FAST
@hypothesis.given(model_sets(ks=(1, 2, 3), shapes=MATRIX_SHAPES),
                  st.sampled_from(('ok', 'zeros', 'nan')))
def test_regmean(data, gram):
  _, models = data
  rng = np.random.default_rng(1)

  def g(x):
    if x.ndim != 2:
      return None
    a = rng.normal(size=(x.shape[0] + 2, x.shape[0]))
    m = {'ok': a.T @ a, 'zeros': np.zeros((x.shape[0],) * 2),
         'nan': np.full((x.shape[0],) * 2, NAN)}[gram]
    return jnp.asarray(m, jnp.float32)

  grams = [{f'{k}/kernel': g(v['kernel']) for k, v in m.items()
            if 'kernel' in v and v['kernel'].ndim == 2} for m in models]
  empty = any(x.size == 0 for x in jax.tree.leaves(models[0]))
  try:
    out = mj.merge(mj.methods.regmean(grams), None, models)
  except CLEAN:
    assert gram != 'ok' or empty, 'valid Grams were refused'
    return
  assert gram != 'nan' or not grams[0], 'NaN Grams were accepted'
  _check_result(out, models[0])


@FAST
@hypothesis.given(model_sets(ks=(1, 2, 3)), st.sampled_from(
    ('task', 'nan', 'wrong_length')))
def test_adamerging(data, coef):
  base, models = data
  k = len(models)
  c = {'task': jnp.full((k,), 0.3), 'nan': jnp.full((k,), NAN),
       'wrong_length': jnp.full((k + 1,), 0.3)}[coef]
  try:
    out = mj.merge(mj.methods.adamerging(c), base, models)
  except CLEAN:
    return
  assert coef == 'task', coef
  _check_result(out, base)


@FAST
@hypothesis.given(model_sets(), st.sampled_from(
    ('ones', 'random', 'nan', 'wrong_shape', 'missing_leaf')))
def test_concrete(data, mask):
  base, models = data
  rng = np.random.default_rng(0)
  m = {'ones': jax.tree.map(jnp.ones_like, base),
       'random': jax.tree.map(lambda x: jnp.asarray(
           rng.uniform(size=x.shape), jnp.float32), base),
       'nan': jax.tree.map(lambda x: jnp.full(x.shape, NAN), base),
       'wrong_shape': jax.tree.map(lambda x: jnp.ones(x.shape + (2,)), base),
       'missing_leaf': dict(list(base.items())[1:])}[mask]
  try:
    out = mj.merge(mj.methods.concrete(m, 0.5), base, models)
  except CLEAN:
    empty = any(x.size == 0 for x in jax.tree.leaves(base))
    assert mask not in ('ones', 'random') or empty, f'a valid {mask} mask was refused'
    return
  assert mask in ('ones', 'random'), f'a {mask} mask was accepted'
  _check_result(out, base)


@FAST
@hypothesis.given(model_sets(ks=(1,)), st.sampled_from((-30.0, 0.0, 30.0, NAN)),
                  st.booleans(), st.sampled_from((0.5, 0.0, NAN)))
def test_concrete_mask(data, logit, keyed, temperature):
  base, _ = data
  s = jax.tree.map(lambda x: jnp.full(x.shape, logit), base)
  key = jax.random.key(0) if keyed else None
  empty = all(x.size == 0 for x in jax.tree.leaves(base))
  except_nan = math.isnan(logit) and not empty
  try:
    m = mj.methods.concrete_mask(s, key, temperature=temperature)
  except CLEAN:
    assert except_nan or not temperature > 0, 'valid logits were refused'
    return
  assert temperature > 0 and not except_nan, 'bad input accepted'
  for leaf, b in zip(jax.tree.leaves(m), jax.tree.leaves(base)):
    assert leaf.shape == b.shape and bool(jnp.all(jnp.isfinite(leaf)))
    assert bool(jnp.all(leaf >= 0))


@FAST
@hypothesis.given(st.sampled_from(((0, 4), (3, 1), (2, 5))),
                  st.sampled_from((0.0, 1.0, 80.0)))
def test_prediction_entropy(shape, scale):
  logits = scale * jax.random.normal(jax.random.key(0), shape)
  if 0 in shape:
    with pytest.raises(ValueError, match='at least one example'):
      mj.methods.prediction_entropy(logits)
    return
  h = mj.methods.prediction_entropy(logits)
  assert bool(jnp.all(jnp.isfinite(h))) and bool(jnp.all(h >= -1e-6))


@FAST
@hypothesis.given(st.integers(1, 3), st.integers(0, 3), st.sampled_from(
    ('svd', 'lego')), st.sampled_from((None, 1, 2)))
def test_lora_methods(k, rank_in, which, rank):
  rng = np.random.default_rng(k + 7 * rank_in)
  r = max(rank_in, 1)
  f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  ads = [{'q': mj.transforms.LoRA(f(5, r), f(r, 4)), 'bias': f(4)}
         for _ in range(k)]
  tx = (mj.methods.lora_svd(rank=rank) if which == 'svd'
        else mj.methods.lora_lego(rank=rank))
  try:
    out = mj.merge(tx, None, ads)
  except CLEAN:
    return
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(out))


@FAST
@hypothesis.given(model_sets(ks=(1, 2, 3), shapes=MATRIX_SHAPES),
                  st.integers(1, 3))
def test_state_readers_reconstruct_and_twin_mix(data, budget):
  base, models = data
  k = len(models)
  try:
    _, state = mj.merge(mj.methods.reversible(min(budget, k)), base, models,
                        return_state=True)
  except CLEAN:  # e.g. a zero-size leaf: a clean refusal
    return
  for i in range(k):
    _check_result(mj.methods.reconstruct(state, base, i), base)
  for bad in (k, -1, 0.5):
    with pytest.raises(ValueError, match='task index'):
      mj.methods.reconstruct(state, base, bad)
  _, tw = mj.merge(mj.methods.twin(density=0.5), base, models, return_state=True)
  mixed = mj.methods.twin_mix(tw, jnp.full((k,), 1.0 / k))  # float32, documented
  _check_result(mixed, jax.tree.map(lambda b: b.astype(jnp.float32), base))


# --------------------------------------------------------------------------- #
# Permutation entry points: random MLPs and specs that do or do not fit.
# --------------------------------------------------------------------------- #
@st.composite
def mlp_pairs(draw):
  widths = tuple(draw(st.lists(st.integers(1, 6), min_size=1, max_size=3)))
  d_in, d_out = draw(st.integers(1, 4)), draw(st.integers(1, 3))
  m = permute.models.MLP(widths, num_outputs=d_out)
  x = jnp.ones((1, d_in))
  a = m.init(jax.random.key(draw(st.integers(0, 99))), x)['params']
  b = m.init(jax.random.key(draw(st.integers(100, 199))), x)['params']
  spec_depth = draw(st.sampled_from((len(widths), len(widths),
                                     len(widths) + 1, max(len(widths) - 1, 0))))
  return a, b, widths, spec_depth


def _hidden(p, x, depth):
  # Features of every group of mlp_spec(depth) (a spec that does not fit the
  # params asks for a layer that is missing: a clean KeyError-free error).
  out, h = {}, x
  for l in range(depth):
    if f'Dense_{l}' not in p:
      raise ValueError(f'no layer Dense_{l}')
    h = jax.nn.relu(h @ p[f'Dense_{l}']['kernel'] + p[f'Dense_{l}']['bias'][None])
    out[f'P_{l}'] = h
  return out


@FAST
@hypothesis.given(mlp_pairs(), st.sampled_from(PERMUTE_CASES))
def test_permutation_entry_points(pair, name):
  a, b, widths, depth = pair
  d_in = a['Dense_0']['kernel'].shape[0]
  spec = permute.mlp_spec(depth)
  # activation_matching takes features, not a spec: any depth the features
  # function can compute is a valid request.
  fits = depth == len(widths) or (name == 'activation_matching' and
                                  depth < len(widths))
  key = jax.random.key(0)
  calls = {
      'weight_matching': lambda: permute.weight_matching(spec, a, b),
      'permute_align': lambda: mj.merge(mj.chain(
          permute.permute_align(spec, reference='first'), mj.transforms.mean()),
                                        None, [a, b]),
      'sinkhorn_matching': lambda: permute.sinkhorn_matching(
          spec, a, b, lambda p: jnp.float32(0.0), [None], steps=2),
      'ste_matching': lambda: permute.ste_matching(
          spec, a, b, lambda p: jnp.float32(0.0), [None], steps=1),
      'activation_matching': lambda: permute.activation_matching(
          lambda p, x: _hidden(p, x, len(widths)), a, b, [jnp.ones((3, d_in))]),
      'apply_permutation': lambda: permute.apply_permutation(
          spec, permute.random_permutations(spec, b, key), b),
      'soft_apply_permutation': lambda: permute.soft_apply_permutation(
          spec, permute.permutation_matrices(
              permute.random_permutations(spec, b, key)), b),
      'merge_many': lambda: permute.merge_many(spec, [a, b], max_iter=2),
      'solve_assignment': lambda: permute.solve_assignment(
          jnp.ones((widths[0], widths[0] + (0 if fits else 1)))),
      'merge_lock': lambda: permute.merge_lock(key, a, spec, scaled=spec.groups),
      'unlock': lambda: permute.unlock(b, a, spec),
  }
  try:
    out = calls[name]()
  except CLEAN as e:
    assert not fits or name == 'solve_assignment' and widths[0] > 0, (name, e)
    return
  assert fits, f'{name} accepted a spec for {depth} hidden layers on {widths}'
  assert all(bool(jnp.all(jnp.isfinite(jnp.asarray(x, jnp.float32))))
             for x in jax.tree.leaves(out) if jnp.issubdtype(
                 jnp.asarray(x).dtype, jnp.floating))


# --------------------------------------------------------------------------- #
# The CLI's mergekit-config parser.
# --------------------------------------------------------------------------- #
_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 3),
                    st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=4), st.lists(st.floats(-2, 2), max_size=3),
                    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


@FAST
@hypothesis.given(st.fixed_dictionaries({
    'merge_method': st.sampled_from(('linear', 'ties', 'task_arithmetic',
                                     'slerp', 'dare_ties', 'nope', None)),
    'models': st.one_of(_VALUES, st.lists(st.fixed_dictionaries({
        'model': st.sampled_from(('a', 'b', '')),
        'parameters': st.dictionaries(st.sampled_from(
            ('weight', 'density', 'lambda', 't', 'foo')), _VALUES, max_size=3)}),
                                          max_size=3)),
    'parameters': st.dictionaries(st.sampled_from(
        ('weight', 'density', 'normalize', 't', 'epsilon')), _VALUES,
                                  max_size=3),
    'base_model': st.sampled_from((None, 'a', 3)),
    'dtype': st.sampled_from((None, 'bfloat16', 'float8', 7)),
}))
def test_cli_config_parser(raw):
  from mergejax.cli import _mergekit_config as mc  # pylint: disable=g-import-not-at-top
  raw = {k: v for k, v in raw.items() if v is not None}
  try:
    with warnings.catch_warnings():
      warnings.simplefilter('ignore')  # unused parameters only warn
      cfg = mc.load_config(raw)
  except (*CLEAN, FileNotFoundError) as e:  # the CLI reports both cleanly
    assert str(e)
    return
  assert cfg.merge_method in mc.METHODS


# --------------------------------------------------------------------------- #
# Coverage.
# --------------------------------------------------------------------------- #
def test_every_public_name_is_fuzzed():
  covered = set(CASES) | set(EXEMPT) | set(DATA_CASES)
  missing = sorted(set(mj.methods.__all__) - covered)
  assert not missing, (f'mergejax.methods {missing} have no fuzz case: add one '
                       'to CASES (or, for non-entry points, EXEMPT with why).')
  entry_points = {n for n in permute.__all__ if callable(getattr(permute, n))
                  and n[0].islower() and n.endswith(('matching', 'align',
                                                     'permutation', 'many',
                                                     'assignment', 'lock'))}
  assert entry_points <= set(PERMUTE_CASES), sorted(entry_points -
                                                     set(PERMUTE_CASES))


# --------------------------------------------------------------------------- #
# Building blocks: each factory inside the chain that makes it a whole merge.
# --------------------------------------------------------------------------- #
T = mj.transforms


def _grams_like(models):
  """Identity input Grams for every matrix leaf (RegMean is then the average)."""
  return [{name: {'kernel': jnp.eye(layer['kernel'].shape[0])}
           for name, layer in m.items() if 'kernel' in layer and
           layer['kernel'].ndim == 2} for m in models]


def _fishers_like(models):
  return [jax.tree.map(lambda x: jnp.ones(x.shape, jnp.float32), m)
          for m in models]


def _t(name, *args, **fixed):
  return lambda h, k: getattr(T, name)(*args, **fixed, **h)


def _coefficients(h, k):
  return T.coefficient_sum(jnp.full((k,), 0.5))


# The templates a building block can sit in, tried in order on a benign input
# (a per-model step, a reducer of task vectors, a reducer of the models, a
# step after the reduction).
TEMPLATES = {
    'per_model': lambda x: mj.chain(T.task_vectors(), x, T.weighted_sum(),
                                    T.apply_to_base()),
    'reduce_tvs': lambda x: mj.chain(T.task_vectors(), x, T.apply_to_base()),
    'reduce_models': lambda x: x,
    'after_reduce': lambda x: mj.chain(T.task_vectors(), T.weighted_sum(), x,
                                       T.apply_to_base()),
    'before_disjoint': lambda x: mj.chain(T.task_vectors(), x, T.disjoint_merge(),
                                          T.apply_to_base()),
}

BLOCKS: dict[str, Case] = {
    'task_vectors': Case(lambda h, k: T.task_vectors()),
    'weighted_sum': Case(_t('weighted_sum'), invalid=dict(weights=['nan'])),
    'mean': Case(_t('mean')),
    'scale': Case(lambda h, k: T.scale(h.get('factor', 0.5)),
                  dict(factor=[0.0, 2.0]), dict(factor=[NAN])),
    'apply_to_base': Case(lambda h, k: T.apply_to_base()),
    'coefficient_sum': Case(_coefficients),
    'shared_mask': Case(lambda h, k: None),  # made by _block_tx (params' tree)
    'trim': Case(lambda h, k: T.trim(h.pop('density', 0.5), **h),
                 dict(scope=['tensor', 'global']), BAD_DENSITY),
    'dare': Case(lambda h, k: T.dare(h.pop('density', 0.5), **h),
                 invalid=BAD_DENSITY),
    'breadcrumbs_prune': Case(lambda h, k: T.breadcrumbs_prune(
        h.pop('density', 0.5), **h), invalid=BAD_DENSITY),
    'della_prune': Case(lambda h, k: T.della_prune(
        h.pop('density', 0.5), axis=None, **h), invalid=BAD_DENSITY),
    'elect_sign': Case(_t('elect_sign'), dict(method=['sum', 'count'])),
    'disjoint_merge': Case(_t('disjoint_merge')),
    'sce_select': Case(_t('sce_select'), invalid=dict(select_topk=[NAN])),
    'sce_merge': Case(_t('sce_merge')),
    'ram_merge': Case(_t('ram_merge'), invalid=dict(epsilon=[NAN])),
    'lerp_reduce': Case(lambda h, k: T.lerp_reduce(h.get('t', 0.5)),
                        invalid=dict(t=[NAN]), k=(1,)),
    'slerp_reduce': Case(lambda h, k: T.slerp_reduce(h.get('t', 0.5)),
                         invalid=dict(t=[NAN]), k=(1,)),
    'nuslerp_reduce': Case(lambda h, k: T.nuslerp_reduce([1.0, 0.5]), k=(2,),
                           base=False),
    'multislerp_reduce': Case(_t('multislerp_reduce')),
    'karcher_reduce': Case(_t('karcher_reduce'), base=False),
    'model_stock_reduce': Case(_t('model_stock_reduce'), k=(2, 3)),
    'nearswap_reduce': Case(lambda h, k: T.nearswap_reduce(h.get('t', 0.5)),
                            invalid=dict(t=[NAN]), k=(1,)),
    'arcee_fusion_reduce': Case(_t('arcee_fusion_reduce'), k=(1,)),
    'svd_basis': Case(lambda h, k: mj.chain(T.svd_basis(2, non_matrix='keep'),
                                            T.from_basis()),
                      shapes=MATRIX_SHAPES),
    'from_basis': Case(lambda h, k: mj.chain(T.svd_basis(None, non_matrix='keep'),
                                             T.from_basis()),
                       shapes=MATRIX_SHAPES),
    'project': Case(lambda h, k: T.project(1, non_matrix='keep'),
                    shapes=MATRIX_SHAPES),
    'layer_scale': Case(_t('layer_scale'), invalid=dict(beta=[NAN])),
    'outlier_reweight': Case(_t('outlier_reweight'),
                             invalid=dict(quantile=[NAN, 1.5])),
    'tsv_reduce': Case(_t('tsv_reduce'), shapes=MATRIX_SHAPES),
    'fisher_weighted_sum': Case(lambda h, k: None),  # inputs drawn per case
    'ota_reduce': Case(lambda h, k: None),
    'fisher_graft': Case(lambda h, k: None, invalid=dict(density=[NAN])),
    'regmean_reduce': Case(lambda h, k: None, shapes=MATRIX_SHAPES),
    'wudi_reduce': Case(lambda h, k: T.wudi_reduce(steps=2, **h),
                        dict(solver=['adam', 'closed_form']),
                        dict(learning_rate=[NAN]), shapes=MATRIX_SHAPES),
    'doge_reduce': Case(lambda h, k: T.doge_reduce(steps=2, **h),
                        dict(projection=['gradient', 'update']),
                        dict(learning_rate=[NAN], density=[NAN]),
                        shapes=MATRIX_SHAPES),
    'rcp_select': Case(lambda h, k: None),  # Fishers drawn per case
}
BLOCK_FUNCTIONS = ('kth_largest_magnitude', 'topk_mask', 'topk_masks',
                   'batched_topk_masks', 'della_probs', 'keep_count',
                   'rescale_l1', 'apply_mask', 'sign_agreement',
                   'model_stock_ratio', 'magnitude_mask', 'consensus_mask',
                   'compute_tall_masks', 'lora_delta', 'lora_from_delta',
                   'check_lora', 'merge_lora', 'opcm_init', 'opcm_update',
                   'opcm_params', 'project_new_task',
                   'factored_second_moments')
BLOCK_EXEMPT = {'LoRA': 'a NamedTuple of factors', 'SVDBasis': 'a NamedTuple'}


def _block_tx(name, h, models):
  case = BLOCKS[name]
  if name == 'shared_mask':
    return T.shared_mask(jax.tree.map(lambda x: jnp.full(x.shape, 0.5),
                                      models[0]))
  if name == 'fisher_weighted_sum':
    return T.fisher_weighted_sum(_fishers_like(models))
  if name == 'ota_reduce':
    return T.ota_reduce(_fishers_like(models))
  if name == 'fisher_graft':
    return T.fisher_graft(_fishers_like(models), h.get('density', 0.5))
  if name == 'regmean_reduce':
    return T.regmean_reduce(_grams_like(models))
  if name == 'rcp_select':
    return T.rcp_select(_fishers_like(models)[0], _fishers_like(models))
  return case.make(dict(h), len(models))


@functools.lru_cache(maxsize=None)
def _template(name):
  """The first template in which the block makes a working merge."""
  case = BLOCKS[name]
  base = {'layers_0': {'kernel': jnp.linspace(-1, 1, 20).reshape(4, 5)},
          'layers_1': {'bias': jnp.linspace(0.5, 1.0, 5)}}
  k = max(case.k)
  models = [jax.tree.map(lambda x, i=i: x + 0.1 * (i + 1) * jnp.sin(x * (i + 2)),
                         base) for i in range(k)]
  for t, wrap in TEMPLATES.items():
    try:
      out = mj.merge(wrap(_block_tx(name, {}, models)),
                     base if case.base else None, models, key=jax.random.key(0))
      _check_result(out, base)
      return t
    except Exception:  # pylint: disable=broad-except
      continue
  raise AssertionError(f'transforms.{name}: no template makes it a merge; '
                       'give it a case of its own.')


def _run_block(name, data):
  case = BLOCKS[name]
  wrap = TEMPLATES[_template(name)]
  _fuzz_one(name, case, data, lambda h, base, models: mj.merge(
      wrap(_block_tx(name, h, models)), base if case.base else None, models,
      key=jax.random.key(0)))


@pytest.mark.parametrize('name', sorted(BLOCKS))
def test_building_blocks_in_their_chain(name):
  def run(data):
    _run_block(name, data)
  run.__name__ = f'fuzz_block_{name}'
  hypothesis.given(data=st.data())(FAST(run))()


# Public helpers that the building blocks above call on every fuzzed input.
BLOCK_REACHED = {
    'doge_delta': 'doge_reduce', 'rcp_mask': 'rcp_select',
    'batched_topk_masks': 'trim(scope="global") and the TIES family',
    'della_probs': 'della_prune', 'rescale_l1': 'dare, della_prune',
    'apply_mask': 'dare, della_prune', 'sign_agreement': 'elect_sign',
    'model_stock_ratio': 'model_stock_reduce', 'compute_tall_masks': 'tall_masks',
    'project_new_task': 'opcm_update', 'opcm_params': 'opcm_update below',
    'opcm_init': 'opcm_update below',
    'factored_second_moments': 'test_ota (compress=True)',
}


@FAST
@hypothesis.given(st.sampled_from(((0,), (1,), (7,), (3, 4))),
                  st.integers(-1, 13), st.booleans(), st.integers(0, 99))
def test_selection_functions(shape, k, exact, seed):
  x = jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)
  n = x.size
  try:
    mask = T.topk_mask(x, k, exact=exact)
  except CLEAN:
    assert not 1 <= k <= n or n == 0, (shape, k)
    return
  assert mask.shape == x.shape and mask.dtype == jnp.bool_
  if exact and 0 <= k <= n:
    assert int(mask.sum()) == k
  masks = T.topk_masks([x, 2 * x], min(max(k, 0), 2 * n), exact=exact)
  assert [m.shape for m in masks] == [x.shape] * 2
  if 1 <= k <= n:
    ref = np.sort(np.abs(np.asarray(x)).ravel())[::-1][k - 1]
    np.testing.assert_allclose(T.kth_largest_magnitude(x, k), ref, rtol=1e-6)
  for rho in (0.0, 0.3, 1.0):
    c = int(T.keep_count(jnp.float32(rho), n))
    assert 0 <= c <= n


@hypothesis.settings(FAST, max_examples=3)  # each tree shape compiles the masks
@hypothesis.given(model_sets(ks=(1, 2, 3)), st.sampled_from((0.0, 0.3, 1.0, NAN)),
                  st.integers(0, 5))
def test_mask_functions(data, density, k):
  _, models = data
  tvs = jax.tree.map(lambda *xs: jnp.stack(xs), *models)
  try:
    masks = T.magnitude_mask(tvs, density)
  except CLEAN:
    assert math.isnan(density), density
    return
  assert not math.isnan(density), 'a NaN density was accepted'
  assert jax.tree.structure(masks) == jax.tree.structure(tvs)
  agree = T.consensus_mask(masks, k)  # k > K keeps nothing: a valid request
  assert all(a.dtype == jnp.bool_ for a in jax.tree.leaves(agree))
  with pytest.raises(ValueError, match='k must'):
    T.consensus_mask(masks, NAN)


@FAST
@hypothesis.given(st.integers(1, 3), st.sampled_from(((4, 3), (1, 5), (0, 2))),
                  st.sampled_from((None, 1, 2, 9)))
def test_lora_functions(k, shape, rank):
  rng = np.random.default_rng(k)
  tau = {'w': jnp.asarray(rng.normal(size=shape), jnp.float32),
         'b': jnp.ones((shape[1],), jnp.float32)}
  try:
    ad = T.lora_from_delta(tau, rank)
  except CLEAN:
    return
  T.check_lora([ad] * k)
  dense = T.lora_delta(ad)
  assert dense['w'].shape == shape and bool(jnp.all(jnp.isfinite(dense['w'])))
  if rank is None or rank >= min(shape):
    np.testing.assert_allclose(dense['w'], tau['w'], atol=1e-4)
  try:
    out = T.merge_lora(mj.methods.lora_svd(), [ad] * k)
  except CLEAN:
    assert 0 in shape, shape
    return
  assert bool(jnp.all(jnp.isfinite(T.lora_delta(out)['w'])))
  with pytest.raises(CLEAN):
    T.check_lora([ad, {'w': T.LoRA(jnp.ones((shape[0], 2)), jnp.ones((3, shape[1]))),
                       'b': tau['b']}])


@FAST
@hypothesis.given(model_sets(ks=(1, 2, 3), shapes=MATRIX_SHAPES),
                  st.sampled_from((0.1, 0.5, NAN)))
def test_opcm_functions(data, alpha):
  base, models = data
  try:
    state = T.opcm_init(base, alpha)
    for m in models:
      state = T.opcm_update(state, base, m)
  except CLEAN:
    assert math.isnan(alpha) or any(x.size == 0 for x in jax.tree.leaves(base))
    return
  assert not math.isnan(alpha), 'a NaN alpha was accepted'
  _check_result(T.opcm_params(state, base), base)


def test_every_building_block_is_fuzzed():
  direct = ('kth_largest_magnitude', 'topk_mask', 'topk_masks', 'keep_count',
            'magnitude_mask', 'consensus_mask', 'lora_delta', 'lora_from_delta',
            'check_lora', 'merge_lora', 'opcm_update')
  covered = (set(BLOCKS) | set(direct) | set(BLOCK_REACHED) |
             set(BLOCK_EXEMPT))
  public = {n for n in T.__all__ if not n.endswith('State')}
  missing = sorted(public - covered)
  assert not missing, (f'mergejax.transforms {missing} have no fuzz case: add '
                       'one to BLOCKS or a test of their own.')
  assert set(BLOCK_FUNCTIONS) <= set(direct) | set(BLOCK_REACHED)
