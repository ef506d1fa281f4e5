"""FW-Merging against FusionBench's algorithm written out plainly in NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mergejax as mj
from mergejax import testing

SHAPES = {'a': (3,), 'b': (2, 2)}


def _problem(n=5, objectives=2):
  keys = iter(jax.random.split(jax.random.key(0), 64))
  rand = lambda: {k: np.asarray(jax.random.normal(next(keys), s), np.float32)
                  for k, s in SHAPES.items()}
  base = rand()
  pool = [jax.tree.map(lambda b, d: b + d, base, rand()) for _ in range(n)]
  targets = [rand() for _ in range(objectives)]
  return base, pool, targets


def _loss(p, target):
  return sum(jnp.sum((p[k] - target[k]) ** 2) for k in SHAPES)


def _np_grad(theta, targets):
  return {k: sum(2 * (theta[k] - t[k]) for t in targets) / len(targets)
          for k in SHAPES}


def _np_scores(grad, cand, lmo):
  out = {}
  for k in SHAPES:
    g, c = grad[k].ravel().astype(np.float64), cand[k].ravel()
    dot = g @ c
    out[k] = dot if lmo == 'linear' else dot / (np.linalg.norm(g)
                                                * np.linalg.norm(c))
  return out


def _np_hard(base, pool, targets, *, steps, step_size, sf, granularity, lmo,
             init):
  theta = ({k: base[k] + sf * sum(p[k] - base[k] for p in pool) for k in SHAPES}
           if init == 'task_arithmetic' else dict(base))
  cands = pool + [dict(theta)]
  picks = []
  for it in range(steps):
    g = _np_grad(theta, targets)
    s = [_np_scores(g, c, lmo) for c in cands]
    if granularity == 'task':
      i = int(np.argmin([sum(x.values()) for x in s]))
      target = cands[i]
      picks.append(i)
    else:
      idx = {k: int(np.argmin([x[k] for x in s])) for k in SHAPES}
      target = {k: cands[idx[k]][k] for k in SHAPES}
      picks.append(idx)
    gamma = 2 / (it + 2) * step_size
    theta = {k: theta[k] + gamma * sf * (target[k] - theta[k]) for k in SHAPES}
  return theta, picks


@pytest.mark.parametrize('granularity', ['task', 'layer'])
@pytest.mark.parametrize('lmo', ['cosine', 'linear'])
@pytest.mark.parametrize('init', ['task_arithmetic', 'base'])
def test_hard_matches_the_plain_algorithm(granularity, lmo, init):
  base, pool, targets = _problem()
  want, want_picks = _np_hard(base, pool, targets, steps=6, step_size=0.5,
                              sf=0.8, granularity=granularity, lmo=lmo,
                              init=init)
  got = mj.methods.fit_fw_merging(_loss, base, pool, targets, steps=6,
                                  step_size=0.5, scaling_factor=0.8,
                                  granularity=granularity, lmo=lmo, init=init)
  assert got.picks == want_picks
  testing.assert_trees_close(got.params, want, rtol=1e-5, atol=1e-6)
  assert not got.streamed


def test_streaming_equals_stacked_and_jit_equals_eager():
  base, pool, targets = _problem()
  kw = dict(steps=5, step_size=0.3, granularity='layer')
  stacked = mj.methods.fit_fw_merging(_loss, base, pool, targets, **kw)
  over = mj.methods.fit_fw_merging(_loss, base, pool, targets,
                                   memory_budget=1, **kw)
  loader = mj.methods.CandidatePool(len(pool), lambda i: pool[i])
  streamed = mj.methods.fit_fw_merging(_loss, base, loader, targets, **kw)
  assert over.streamed and streamed.streamed
  for r in (over, streamed):
    assert r.picks == stacked.picks
    testing.assert_trees_close(r.params, stacked.params, rtol=1e-6)
  with jax.disable_jit():
    eager = mj.methods.fit_fw_merging(_loss, base, pool, targets, **kw)
  assert eager.picks == stacked.picks
  testing.assert_trees_close(eager.params, stacked.params, rtol=1e-5,
                             atol=1e-6)


def test_one_compile_across_a_step_size_sweep():
  base, pool, targets = _problem()
  outs = []
  mj.methods.fit_fw_merging(_loss, base, pool, targets, steps=3)  # warm up
  with testing.log_compilations() as log:
    for s in (0.1, 0.5, 1.0):
      outs.append(mj.methods.fit_fw_merging(_loss, base, pool, targets,
                                            steps=3, step_size=s,
                                            scaling_factor=0.5))
  for name in ('_scan_pool', '_value_and_grad', '_toward', '_offer_jit'):
    assert log.count(name) == 0, (name, log)
  assert not np.allclose(outs[0].params['a'], outs[-1].params['a'])


def _np_soft(base, pool, targets, ada_targets, *, steps, granularity, lmo,
             ada_steps, lr, ada_init, ada_coeff):
  theta = {k: np.asarray(v, np.float32) for k, v in base.items()}
  picks = []
  for it in range(steps):
    excluded = {k: set() for k in SHAPES}
    chosen, step_picks = [], []
    for t in targets:
      g = _np_grad(theta, [t])
      s = [_np_scores(g, c, lmo) for c in pool]
      if granularity == 'task':
        tot = [sum(x.values()) if i not in excluded['a'] else np.inf
               for i, x in enumerate(s)]
        i = int(np.argmin(tot))
        for k in SHAPES:
          excluded[k].add(i)
        chosen.append(pool[i])
        step_picks.append(i)
      else:
        idx = {k: int(np.argmin([x[k] if i not in excluded[k] else np.inf
                                 for i, x in enumerate(s)])) for k in SHAPES}
        for k in SHAPES:
          excluded[k].add(idx[k])
        chosen.append({k: pool[idx[k]][k] for k in SHAPES})
        step_picks.append(idx)
    # Layer-wise AdaMerging around theta, written plainly.
    c = {k: jnp.full(len(chosen), ada_init if it == 0 else ada_coeff)
         for k in SHAPES}

    def merged(c, chosen=chosen, theta=theta):
      return {k: theta[k] + sum(c[k][i] * (m[k] - theta[k])
                                for i, m in enumerate(chosen)) for k in SHAPES}
    opt = optax.adam(lr)
    state = opt.init(c)
    for _ in range(ada_steps):
      grads = jax.grad(lambda c: sum(_loss(merged(c), t)
                                     for t in ada_targets))(c)
      with jax.numpy_dtype_promotion('standard'):
        upd, state = opt.update(grads, state, c)
        c = optax.apply_updates(c, upd)
    theta = {k: np.asarray(v) for k, v in merged(c).items()}
    picks.append(step_picks)
  return theta, picks


@pytest.mark.parametrize('granularity', ['task', 'layer'])
def test_soft_matches_the_plain_algorithm(granularity):
  base, pool, targets = _problem(n=5, objectives=3)
  ada_targets = [jax.tree.map(lambda x: 0.5 * x, t) for t in targets[:2]]
  kw = dict(steps=2, granularity=granularity, lmo='cosine', ada_steps=20,
            lr=0.05, ada_init=0.3, ada_coeff=1e-8)
  want, want_picks = _np_soft(base, pool, targets, ada_targets, **kw)
  got = mj.methods.fit_fw_merging(
      _loss, base, pool, targets, variant='soft', steps=2,
      granularity=granularity, ada_loss_fn=_loss, ada_batches=ada_targets,
      ada_steps=20, ada_learning_rate=0.05)
  assert got.picks == want_picks
  for p in got.picks:  # no candidate twice within an iteration
    idx = p if granularity == 'task' else [q['a'] for q in p]
    assert len(set(idx)) == len(idx)
  testing.assert_trees_close(got.params, want, rtol=1e-4, atol=1e-5)


def test_relevant_candidates_beat_noise():
  """With the objective at one pool member, FW moves toward it, not noise."""
  base, pool, _ = _problem(n=6)
  target = pool[2]
  r = mj.methods.fit_fw_merging(_loss, base, pool, [target], lmo='linear',
                                init='base', steps=20, step_size=1.0,
                                scaling_factor=1.0)
  assert r.picks[0] == 2 and r.picks.count(2) > len(r.picks) // 2
  assert float(_loss(r.params, target)) < 0.05 * float(_loss(base, target))
  assert r.losses[-1] < r.losses[0]


def test_bf16_models_come_back_in_bf16():
  base, pool, targets = _problem()
  half = lambda t: jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), t)
  r = mj.methods.fit_fw_merging(_loss, half(base), [half(p) for p in pool],
                                targets, steps=2)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(r.params))


@pytest.mark.parametrize('kwargs, match', [
    (dict(variant='medium'), 'variant must be'),
    (dict(granularity='row'), 'granularity must be'),
    (dict(lmo='max'), 'lmo must be'),
    (dict(init='zeros'), 'init must be'),
    (dict(steps=0), 'steps'),
    (dict(step_size=-1.0), 'step_size must lie in'),
    (dict(variant='soft'), 'needs ada_loss_fn'),
])
def test_bad_settings_raise(kwargs, match):
  base, pool, targets = _problem()
  with pytest.raises(ValueError, match=match):
    mj.methods.fit_fw_merging(_loss, base, pool, targets, **kwargs)


def test_bad_pools_raise():
  base, pool, targets = _problem()
  with pytest.raises(ValueError, match='empty'):
    mj.methods.fit_fw_merging(_loss, base, [], targets)
  bad = pool[:2] + [{**pool[2], 'b': pool[2]['b'][:1]}]
  with pytest.raises(ValueError, match="'b'|b"):
    mj.methods.fit_fw_merging(_loss, base, bad, targets)
  with pytest.raises(ValueError, match='3 objectives and 2 candidates'):
    mj.methods.fit_fw_merging(_loss, base, pool[:2], targets + targets[:1],
                              variant='soft', ada_loss_fn=_loss,
                              ada_batches=targets)
