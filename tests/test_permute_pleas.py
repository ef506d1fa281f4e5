"""Tests of PLeaS: size model, greedy ratios, block construction and least squares."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mergejax import permute
from mergejax.permute import _pleas as pleas_lib
from mergejax.permute import _pleas_lstsq as lstsq
from mergejax.permute import _pleas_networks as networks
from mergejax.permute import models as M

KEY = jax.random.key(0)


def _models():
  m = M.MLP((12, 10), num_outputs=3)
  x = jnp.ones((1, 5))
  return m.init(jax.random.key(1), x)['params'], m.init(jax.random.key(2), x)['params']


def _apply(res, x):
  return M.MLP(res.widths, num_outputs=6).apply({'params': res.params}, x)


def test_merged_size_endpoints():
  dims = [(5, 12), (12, 10), (10, 3)]
  assert permute.merged_size(dims, [1.0, 1.0]) == 2.0
  one = 5 * 12 + 12 + 12 * 10 + 10 + 10 * 3 + 3
  np.testing.assert_allclose(permute.merged_size(dims, [0.0, 0.0]), (one + 10 * 3 + 3) / one)


def test_choose_ratios_respects_budget_and_prefers_dissimilar_units():
  dims = [(5, 12), (12, 10), (10, 3)]
  sims = [np.full(12, 0.9), np.full(10, 0.1)]  # second group badly matched
  r = permute.choose_ratios(sims, dims, 1.3)
  assert permute.merged_size(dims, r) <= 1.3 + 1e-9
  assert r[1] > r[0]
  assert permute.choose_ratios(sims, dims, 2.0) == (1.0, 1.0)


def test_merge_costs_match_numpy_reference():
  a, b = _models()
  x = np.asarray(jax.random.normal(KEY, (40, 5)), np.float64)
  net = permute.mlp_network(2)
  features = lambda v, x: networks.capture(net)(v, x)[2]
  costs = pleas_lib._merge_costs(features, {'params': a}, {'params': b},
                                 [jnp.asarray(x[:25]), jnp.asarray(x[25:])], net)

  def hidden(p):
    hs, h = [], x
    for l in range(2):
      h = np.maximum(h @ np.asarray(p[f'Dense_{l}']['kernel']) +
                     np.asarray(p[f'Dense_{l}']['bias']), 0)
      hs.append(h)
    return hs

  for k, (ha, hb) in enumerate(zip(hidden(a), hidden(b))):
    use = sum(np.sum(np.asarray(p[f'Dense_{k + 1}']['kernel'], np.float64) ** 2, 1)
              for p in (a, b))
    np.testing.assert_allclose(costs[k], np.mean((ha - hb) ** 2, 0) * use / 4,
                               rtol=1e-5)


@pytest.mark.parametrize('criterion', ['sensitivity', 'correlation'])
def test_criterion_decides_which_units_stay_separate(criterion):
  # B = A with hidden unit 3 of layer 0 scaled by 4 (incoming weights and
  # bias): perfectly correlated with A's unit, but 3x larger. Merging it
  # changes the next layer most, so the sensitivity criterion keeps it
  # separate first; the correlation criterion (all units correlate 1) does not.
  a, _ = _models()
  b = jax.tree.map(lambda v: v, a)
  b['Dense_0'] = {'kernel': a['Dense_0']['kernel'].at[:, 3].multiply(4.0),
                  'bias': a['Dense_0']['bias'].at[3].multiply(4.0)}
  x = jax.random.normal(KEY, (128, 5))
  res = permute.pleas(a, b, [x], num_hidden=2, ratios=(1 / 12, 0.0), size=2.0,
                      least_squares=False, criterion=criterion)
  # Unit 3 separate <=> merged block = the other 11 units, and the separate
  # copies of A and B differ by the factor 4.
  k = np.asarray(res.params['Dense_0']['kernel'])
  sep_a, sep_b = k[:, 11], k[:, 12]
  is_unit3 = np.allclose(sep_b, 4 * sep_a, atol=1e-6) and not np.allclose(sep_a, 0)
  assert is_unit3 == (criterion == 'sensitivity')


def test_full_size_is_exact_ensemble_and_ls_reproduces_it():
  a, b = _models()
  x = jax.random.normal(KEY, (64, 5))
  ya = M.MLP((12, 10), num_outputs=3).apply({'params': a}, x)
  yb = M.MLP((12, 10), num_outputs=3).apply({'params': b}, x)
  for ls in (False, True):
    res = permute.pleas(a, b, [x], num_hidden=2, size=2.0, least_squares=ls, ridge=1e-9)
    assert res.widths == (24, 20)
    out = _apply(res, x)
    np.testing.assert_allclose(out[:, :3], ya, atol=1e-3)
    np.testing.assert_allclose(out[:, 3:], yb, atol=1e-3)


def test_identical_models_merge_exactly_at_size_one():
  a, _ = _models()
  b = permute.apply_permutation(permute.mlp_spec(2),
                                permute.random_permutations(permute.mlp_spec(2), a, KEY), a)
  x = jax.random.normal(KEY, (128, 5))
  res = permute.pleas(a, b, [x], num_hidden=2, size=1.0, least_squares=False)
  assert res.ratios == (0.0, 0.0)
  ya = M.MLP((12, 10), num_outputs=3).apply({'params': a}, x)
  np.testing.assert_allclose(_apply(res, x)[:, :3], ya, atol=1e-5)


def test_least_squares_beats_averaging_on_its_objective():
  a, b = _models()
  x = jax.random.normal(KEY, (256, 5))
  ya = M.MLP((12, 10), num_outputs=3).apply({'params': a}, x)
  yb = M.MLP((12, 10), num_outputs=3).apply({'params': b}, x)
  target = jnp.concatenate([ya, yb], 1)
  errs = {}
  for ls in (False, True):
    res = permute.pleas(a, b, [x], num_hidden=2, size=1.2, least_squares=ls)
    errs[ls] = float(jnp.mean((_apply(res, x) - target) ** 2))
  assert errs[True] < errs[False]


def _ridge_objective(head, feats, target, ridge):
  x = jnp.concatenate([feats, jnp.ones((feats.shape[0], 1))], 1)
  w = jnp.concatenate([head['kernel'], head['bias'][None]], 0)
  g = x.T @ x
  lam = ridge * jnp.mean(jnp.diag(g))
  return float(jnp.sum((x @ w - target) ** 2) + lam * jnp.sum(w ** 2))


def test_merged_inputs_fit_each_layer_to_what_it_reads():
  # inputs='merged' solves layer by layer on the merged network's own features:
  # on those features its head is the ridge optimum, so the head fitted on the
  # original models' features ('original', PLeaS' reference) or the averaged
  # head cannot do better there. (Both heads use the same block layout.)
  a, b = _models()
  x = jax.random.normal(KEY, (256, 5))
  ridge = 1e-3
  ya = M.MLP((12, 10), num_outputs=3).apply({'params': a}, x)
  yb = M.MLP((12, 10), num_outputs=3).apply({'params': b}, x)
  target = jnp.concatenate([ya, yb], 1)
  kw = dict(num_hidden=2, size=1.5, ratios=(0.25, 0.5), ridge=ridge)
  merged = permute.pleas(a, b, [x[:128], x[128:]], inputs='merged', **kw)
  orig = permute.pleas(a, b, [x], inputs='original', **kw)
  avg = permute.pleas(a, b, [x], least_squares=False, **kw)
  assert merged.widths == orig.widths == avg.widths
  p = merged.params
  feats = jax.nn.relu(jax.nn.relu(x @ p['Dense_0']['kernel'] + p['Dense_0']['bias'][None])
                      @ p['Dense_1']['kernel'] + p['Dense_1']['bias'][None])
  best = _ridge_objective(p['Dense_2'], feats, target, ridge)
  for other in (orig, avg):
    assert best <= _ridge_objective(other.params['Dense_2'], feats, target, ridge) + 1e-6
  # Layer 0 reads the shared input in both modes: identical solutions.
  np.testing.assert_allclose(merged.params['Dense_0']['kernel'],
                             orig.params['Dense_0']['kernel'], rtol=1e-4, atol=1e-5)
  # End to end, the merged-input fit is closer to the endpoints here.
  err = lambda r: float(jnp.mean((_apply(r, x) - target) ** 2))
  assert err(merged) < err(orig)


def test_pleas_rejects_unknown_criterion():
  a, b = _models()
  with pytest.raises(ValueError, match="criterion must be 'sensitivity'"):
    permute.pleas(a, b, [jnp.ones((4, 5))], num_hidden=2, size=1.5, criterion='l2')


def test_pleas_rejects_unknown_inputs():
  a, b = _models()
  with pytest.raises(ValueError, match='inputs'):
    permute.pleas(a, b, [jnp.ones((4, 5))], num_hidden=2, size=1.5, inputs='mixed')


def test_ridge_chosen_on_held_out_rows():
  a, b = _models()
  x = jax.random.normal(KEY, (200, 5))
  kw = dict(num_hidden=2, size=1.4)
  one = permute.pleas(a, b, [x], ridge=1e-3, **kw)
  same = permute.pleas(a, b, [x], ridge=(1e-3,), **kw)
  assert one.ridges == same.ridges == (1e-3,) * 3
  for l in range(3):
    np.testing.assert_array_equal(one.params[f'Dense_{l}']['kernel'],
                                  same.params[f'Dense_{l}']['kernel'])
  # An absurd candidate (it zeroes every weight) is never chosen.
  grid = permute.pleas(a, b, [x[:100], x[100:]], ridge=(1e6, 1e-3, 1e-6), **kw)
  assert len(grid.ridges) == 3 and 1e6 not in grid.ridges
  assert permute.pleas(a, b, [x], least_squares=False, **kw).ridges is None


def test_ridge_towards_averaged_weights():
  # A huge ridge towards the permute-then-average weights returns them.
  a, b = _models()
  x = jax.random.normal(KEY, (128, 5))
  kw = dict(num_hidden=2, size=1.4)
  avg = permute.pleas(a, b, [x], least_squares=False, **kw)
  pulled = permute.pleas(a, b, [x], ridge=1e9, ridge_to='average', **kw)
  for l in range(3):
    np.testing.assert_allclose(pulled.params[f'Dense_{l}']['kernel'],
                               avg.params[f'Dense_{l}']['kernel'], atol=1e-5)
  with pytest.raises(ValueError, match='ridge_to'):
    permute.pleas(a, b, [x], ridge_to='ones', **kw)


def test_task_tagged_batches_fit_each_head_on_its_task():
  # Batch 1 (task B) has huge inputs; untagged, they dominate A's head fit.
  a, b = _models()
  xa = jax.random.normal(KEY, (128, 5))
  xb = 30.0 * jax.random.normal(jax.random.key(9), (128, 5))
  kw = dict(num_hidden=2, size=1.2, ridge=1e-6)
  ya = M.MLP((12, 10), num_outputs=3).apply({'params': a}, xa)
  err = {}
  for tags in (None, [0, 1]):
    r = permute.pleas(a, b, [xa, xb], batch_tasks=tags, **kw)
    err[tags is None] = float(jnp.mean((_apply(r, xa)[:, :3] - ya) ** 2))
  assert err[False] < 0.5 * err[True]
  with pytest.raises(ValueError, match='batch_tasks'):
    permute.pleas(a, b, [xa, xb], batch_tasks=[0], **kw)


# --------------------------------------------------------------------------- #
# CNN chains (models.CNN) and the gradient fit.
# --------------------------------------------------------------------------- #
XC = jax.random.normal(jax.random.key(3), (48, 6, 6, 2))
CNN_KW = dict(features=(4, 6), dense=(5,), num_outputs=3)


@functools.lru_cache(maxsize=None)
def _cnn_pair(norm):
  """Two CNNs (variables for BatchNorm, with non-trivial running statistics)."""
  m = M.CNN(norm=norm, **CNN_KW)
  vs = [m.init(jax.random.key(k), XC) for k in (1, 2)]
  if norm == 'batch':
    train = lambda v, x: m.apply(v, x, train=True, mutable=['batch_stats'])
    # Running statistics of the data the merge sees (PLeaS recomputes them).
    vs = [permute.reset_batch_stats(train, v, [XC[:24], XC[24:]]) for v in vs]
    return vs, [m.apply(v, XC) for v in vs]
  return [v['params'] for v in vs], [m.apply(v, XC) for v in vs]


def test_patches_are_channel_major_like_a_direct_conv():
  k = jax.random.normal(KEY, (3, 3, 2, 5))
  y = jax.lax.conv_general_dilated(XC, k, (1, 1), 'SAME',
                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  flat = lstsq.rows_first(k).reshape(2 * 9, 5)  # [C_in, kh, kw, C_out]
  np.testing.assert_allclose(lstsq.patches(XC, 3, 3) @ flat, y.reshape(-1, 5),
                             atol=1e-5)


def test_conv_least_squares_recovers_a_known_conv():
  # im2col least squares with the input channels expanded to patch indices:
  # fitting a conv to its own outputs returns its kernel and bias.
  k = jax.random.normal(KEY, (3, 3, 2, 5))
  b = jnp.arange(5.0)
  y = jax.lax.conv_general_dilated(XC, k, (1, 1), 'SAME', dimension_numbers=(
      'NHWC', 'HWIO', 'NHWC')) + b[None, None, None]
  xp = np.asarray(lstsq.patches(XC, 3, 3), np.float64)
  xp = np.concatenate([xp, np.ones((xp.shape[0], 1))], 1)
  yp = np.asarray(y, np.float64).reshape(-1, 5)
  in_blocks = lstsq.index_blocks([], -1, d_in=2, taps=9)
  assert sorted(np.concatenate(list(in_blocks.values()))) == list(range(18))
  w = lstsq.solve_blocks({None: (xp.T @ xp, xp.T @ yp)},
                              [(np.arange(5), ('m', 'a', 'b'))], in_blocks, 1e-12)
  np.testing.assert_allclose(w[:-1].reshape(2, 3, 3, 5).transpose(1, 2, 0, 3), k,
                             atol=1e-4)
  np.testing.assert_allclose(w[-1], b, atol=1e-4)


def test_capture_runs_the_model_function():
  # Layer inputs and outputs come from the Flax model itself (interceptor):
  # the head's output is the model's output, the first Dense reads the pooled
  # conv features, and a tensor read by two layers counts once as a feature.
  (a, _), (ya, _) = _cnn_pair('group')
  net = permute.cnn_network(2, 2, norm='group')
  ins, outs, feats = networks.capture(net)({'params': a}, XC)
  np.testing.assert_allclose(outs[-1], ya, atol=1e-6)
  assert ins[2].shape == (XC.shape[0], CNN_KW['features'][-1])
  assert [len(feats[g]) for g in net.groups] == [1, 1, 1]
  (ra, _), _ = _resnet_pair('none')
  rnet = permute.resnet_network((1, 1))
  _, _, rfeats = networks.capture(rnet)({'params': ra}, XR)
  # Stage-1 block 0's conv1 and shortcut read one tensor: the stage-0 stream
  # has the stem output and block 0's output, nothing twice.
  assert len(rfeats['P_stage0']) == 2 and len(rfeats['P_stage1']) == 1


@pytest.mark.parametrize('arch', ['mlp', 'cnn', 'resnet'])
def test_network_spec_is_the_hand_written_spec(arch):
  # The spec derived from the layer graph equals the hand-written builder's.
  net, spec, params = {
      'mlp': lambda: (permute.mlp_network(2), permute.mlp_spec(2), _models()[0]),
      'cnn': lambda: (permute.cnn_network(2, 2, norm='group'),
                      permute.cnn_spec(2, 2, norm='group'), _cnn_pair('group')[0][0]),
      'resnet': lambda: (permute.resnet_network((1, 1)),
                         permute.resnet_spec((1, 1), norm='none'),
                         _resnet_pair('none')[0][0]),
  }[arch]()
  assert networks.network_spec(net, params).axes == spec.axes


@pytest.mark.parametrize('norm', ['none', 'batch',
                                  pytest.param('group', marks=pytest.mark.slow)])
def test_cnn_full_size_is_exact_task_aware_ensemble(norm):
  (a, b), (ya, yb) = _cnn_pair(norm)
  kw = dict(norm='group') if norm == 'group' else {}
  res = permute.pleas(a, b, [XC[:24], XC[24:]], size=2.0, ridge=1e-9, **kw)
  assert res.features == (8, 12) and res.dense == (10,) and res.norm == norm
  assert res.ratios == (1.0, 1.0, 1.0) and res.size == 2.0
  assert (res.batch_stats is None) == (norm != 'batch')
  out = res.module(6).apply(res.variables, XC)
  np.testing.assert_allclose(out[:, :3], ya, atol=1e-4)
  np.testing.assert_allclose(out[:, 3:], yb, atol=1e-4)


def test_cnn_batch_stats_are_the_merged_models_data_statistics():
  # Recomputed on the merged model over all rows of the batches: in eval mode
  # it then normalises exactly as train mode does on all the data at once.
  (a, b), _ = _cnn_pair('batch')
  res = permute.pleas(a, b, [XC[:24], XC[24:]], size=1.3, least_squares=False)
  m = res.module(6)
  train_out = m.apply(res.variables, XC, train=True, mutable=['batch_stats'])[0]
  np.testing.assert_allclose(m.apply(res.variables, XC), train_out, atol=1e-4)
  # reset_batch_stats (EMA inversion, float32) agrees up to its own rounding.
  train = lambda v, x: m.apply(v, x, train=True, mutable=['batch_stats'])
  reset = permute.reset_batch_stats(train, res.variables, [XC[:24], XC[24:]])
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-2, atol=1e-3),
               res.batch_stats, reset['batch_stats'])


def test_cnn_keep_separate_bn_stats_is_exact_at_full_size_on_other_data():
  # The endpoints' running statistics come from XC; the merge sees other data.
  # Recomputing them (the reference) changes the model; keeping the separate
  # channels' statistics gives the exact ensemble at 2.0.
  (a, b), (ya, yb) = _cnn_pair('batch')
  other = [2.0 * XC[:24] + 1.0]
  errs = {}
  for mode in ('recompute', 'keep_separate'):
    r = permute.pleas(a, b, other, size=2.0, least_squares=False, bn_stats=mode)
    out = r.module(6).apply(r.variables, XC)
    errs[mode] = float(jnp.max(jnp.abs(out - jnp.concatenate([ya, yb], 1))))
  assert errs['keep_separate'] < 1e-4 < errs['recompute'], errs
  with pytest.raises(ValueError, match='bn_stats'):
    permute.pleas(a, b, other, size=2.0, bn_stats='keep')


def test_cnn_identical_models_merge_exactly():
  (a, _), (ya, _) = _cnn_pair('none')
  spec = permute.cnn_spec(2, 2, norm='none')
  b = permute.apply_permutation(spec, permute.random_permutations(spec, a, KEY), a)
  res = permute.pleas(a, b, [XC], size=1.0, least_squares=False)
  assert res.ratios == (0.0, 0.0, 0.0) and res.features == (4, 6)
  np.testing.assert_allclose(res.module(6).apply(res.variables, XC)[:, :3], ya,
                             atol=1e-5)


def _structural_zeros(res):
  """Every sep_A <-> sep_B entry of every kernel (conv: all taps)."""
  vals = []
  names = [f'Conv_{i}' for i in range(len(res.features))] + [
      f'Dense_{j}' for j in range(len(res.dense) + 1)]
  for l in range(1, len(names)):
    k = np.asarray(res.params[names[l]]['kernel'])
    n_in, r_in = res.widths[l - 1], res.ratios[l - 1]
    s_in = int(round(r_in * n_in / (1 + r_in)))
    a_in, b_in = slice(n_in - 2 * s_in, n_in - s_in), slice(n_in - s_in, n_in)
    if l == len(names) - 1:  # heads: A (first 3 outputs), B (last 3)
      outs = (slice(0, 3), slice(3, 6))
    else:
      n_out, r_out = res.widths[l], res.ratios[l]
      s_out = int(round(r_out * n_out / (1 + r_out)))
      outs = (slice(n_out - 2 * s_out, n_out - s_out), slice(n_out - s_out, n_out))
    vals += [k[..., a_in, outs[1]], k[..., b_in, outs[0]]]
  return np.concatenate([v.reshape(-1) for v in vals])


def test_cnn_pleas_beats_permute_average_and_keeps_structural_zeros():
  (a, b), (ya, yb) = _cnn_pair('none')
  target = jnp.concatenate([ya, yb], 1)
  err, res = {}, {}
  for name, kw in (('pleas', {}), ('original', dict(inputs='original')),
                   ('avg', dict(least_squares=False)),
                   ('none', dict(least_squares=False, align=False))):
    res[name] = r = permute.pleas(a, b, [XC[:24], XC[24:]], size=1.1, **kw)
    assert r.size <= 1.1 + 1e-9
    err[name] = float(jnp.mean((r.module(6).apply(r.variables, XC) - target) ** 2))
  assert res['pleas'].widths == res['avg'].widths
  assert err['pleas'] < 0.5 * err['avg'], err
  assert err['pleas'] <= err['original'] < err['avg'], err  # reference fit, conv path
  zeros = _structural_zeros(res['pleas'])
  assert zeros.size > 0 and np.all(zeros == 0)


def test_cnn_sizes_count_conv_weights_and_flops():
  (a, b), _ = _cnn_pair('group')
  net = permute.cnn_network(2, 2, norm='group')
  infos, _ = networks.describe(net, {'params': a}, XC)
  dims = pleas_lib._layer_dims(net, a, infos)
  assert dims[0] == permute.LayerDims(2, 4, 9, 36, 3)
  one = sum(x.size for x in jax.tree.leaves(a))
  for measure in ('params', 'flops'):
    for size in (1.2, 1.5):
      res = permute.pleas(a, b, [XC], size=size, least_squares=False, norm='group',
                          measure=measure)
      assert res.size <= size + 1e-9 and res.size > size - 0.15
      if measure == 'params':  # the size model counts the real merged tree
        n = sum(x.size for x in jax.tree.leaves(res.params))
        np.testing.assert_allclose(res.size * one, n - _structural_zeros(res).size)
      else:  # FLOPs: the convs weigh by their 36 positions
        np.testing.assert_allclose(
            permute.merged_size(dims, res.ratios, measure='flops'), res.size)


def test_cnn_and_argument_errors_are_clear():
  (a, b), _ = _cnn_pair('none')
  norms = {f'Norm_{i}': {'scale': jnp.ones(n), 'bias': jnp.zeros(n)}
           for i, n in enumerate(CNN_KW['features'])}
  la = {**a, **norms}  # models.CNN(norm='layer') params: Norm_i, no batch_stats
  with pytest.raises(ValueError, match='LayerNorm'):
    permute.pleas(la, la, [XC], size=1.5)
  with pytest.raises(ValueError, match='LayerNorm'):
    permute.pleas(la, la, [XC], size=1.5, norm='layer')
  with pytest.raises(ValueError, match='batch_stats'):
    permute.pleas(la, la, [XC], size=1.5, norm='batch')
  wide = {**b, 'Conv_1': {'kernel': jnp.ones((3, 3, 4, 7)), 'bias': jnp.ones(7)}}
  with pytest.raises(ValueError, match=r"Conv_1/\w+' has shape"):
    permute.pleas(a, wide, [XC], size=1.5)
  with pytest.raises(ValueError, match='only in'):
    permute.pleas(a, {**b, 'Dense_9': b['Dense_1']}, [XC], size=1.5)
  for size in (0.5, 2.5):
    with pytest.raises(ValueError, match='size'):
      permute.pleas(a, b, [XC], size=size)
  with pytest.raises(ValueError, match='num_hidden'):
    permute.pleas(a, b, [XC], size=1.5, num_hidden=2)
  with pytest.raises(ValueError, match='fit'):
    permute.pleas(a, b, [XC], size=1.5, fit='sgd')
  with pytest.raises(ValueError, match='ratios'):
    permute.pleas(a, b, [XC], size=1.5, ratios=(0.5,))
  res = {'conv_init': {'kernel': jnp.ones((3, 3, 2, 4))}, 'head': b['Dense_1']}
  with pytest.raises(ValueError, match='stage'):
    permute.pleas(res, res, [XC], size=1.5)
  with pytest.raises(ValueError, match='NHWC|H, W'):
    permute.pleas(a, b, [XC.reshape(48, -1)], size=1.5)


def test_gradient_fit_approaches_the_closed_form_objective():
  # PLeaS' reference fit (masked Adam, cosine schedule) on the same block
  # objective: with enough steps it reaches the closed-form optimum; the
  # reference's 400 steps at 5e-4 move from the start towards it.
  rng = np.random.default_rng(0)
  groups = [(np.arange(3), np.arange(3, 5)), (np.arange(2), np.arange(2, 4))]
  x = np.concatenate([rng.normal(size=(300, 7)), np.ones((300, 1))], 1)
  y = rng.normal(size=(300, 6)) + x[:, :6]
  stats = {None: (x.T @ x, x.T @ y)}
  blocks = lstsq.out_blocks(groups, 1, False, 0, 0)
  in_blocks = lstsq.index_blocks(groups, 0)
  obj = lambda w: lstsq.objective(w, stats, blocks, in_blocks, 1e-3)
  closed = lstsq.solve_blocks(stats, blocks, in_blocks, 1e-3)
  start = np.zeros_like(closed)
  ref = lstsq.fit_gradient(stats, blocks, in_blocks, 1e-3, None, start, 400, 5e-4)
  long = lstsq.fit_gradient(stats, blocks, in_blocks, 1e-3, None, start, 2000, 1e-2)
  assert obj(closed) < obj(ref) < obj(start)
  np.testing.assert_allclose(obj(long), obj(closed), rtol=1e-6)
  np.testing.assert_allclose(long, closed, atol=1e-4)
  # Inputs: merged 0-2, sep_A 3-4, sep_B 5-6; outputs: merged 0-1, sep_A 2-3,
  # sep_B 4-5. The sep_A <-> sep_B blocks stay exactly zero.
  for w in (ref, long):
    assert np.all(w[5:7, 2:4] == 0) and np.all(w[3:5, 4:6] == 0)
    assert np.any(w[3:5, 2:4] != 0) and np.any(w[5:7, 4:6] != 0)


def test_gradient_fit_end_to_end():
  a, b = _models()
  x = jax.random.normal(KEY, (256, 5))
  ya = M.MLP((12, 10), num_outputs=3).apply({'params': a}, x)
  yb = M.MLP((12, 10), num_outputs=3).apply({'params': b}, x)
  target = jnp.concatenate([ya, yb], 1)
  kw = dict(num_hidden=2, size=1.3, inputs='original')
  err = lambda r: float(jnp.mean((_apply(r, x) - target) ** 2))
  closed = permute.pleas(a, b, [x], **kw)
  grad = permute.pleas(a, b, [x], fit='gradient', fit_steps=600, fit_lr=2e-2, **kw)
  avg = permute.pleas(a, b, [x], least_squares=False, **kw)
  assert grad.widths == closed.widths
  assert err(grad) < err(avg) and err(grad) < 1.5 * err(closed), (err(grad), err(closed))


@pytest.mark.slow
@pytest.mark.parametrize('variant', ['smoke', 'smoke,cnn', 'smoke,resnet'])
def test_digits_experiment_smoke(variant, tmp_path):
  # The digits experiment end to end (about 15 s for the MLP, 30-60 s otherwise).
  import importlib.util  # pylint: disable=g-import-not-at-top
  import pathlib  # pylint: disable=g-import-not-at-top
  from experiments import pleas as pleas_experiment  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(__file__).parents[1] / 'configs' / 'pleas.py'
  spec = importlib.util.spec_from_file_location('_pleas_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(variant)
  config.bn_stats = 'keep_separate'  # exact ensembles at 2.0 for every method
  rows = pleas_experiment.main(config, str(tmp_path))
  assert [r['target_size'] for r in rows] == [1.0, 2.0]
  full = rows[-1]
  assert full['permute_average_mse'] < 1e-6 and full['no_alignment_mse'] < 1e-6
  assert full['pleas_mse'] < 1e-3
  assert rows[0]['pleas_mse'] < rows[0]['permute_average_mse']
  assert (tmp_path / 'pleas.md').exists()


# --------------------------------------------------------------------------- #
# ResNets (models.ResNet): residual-stream groups.
# --------------------------------------------------------------------------- #
XR = jax.random.normal(jax.random.key(4), (32, 8, 8, 2))
RES_KW = dict(stage_sizes=(1, 1), widths=(4, 6), num_outputs=3)


@functools.lru_cache(maxsize=None)
def _resnet_pair(norm):
  m = M.ResNet(norm=norm, **RES_KW)
  vs = [m.init(jax.random.key(k), XR) for k in (1, 2)]
  if norm != 'batch':
    vs = [v['params'] for v in vs]
  return vs, [m.apply(v if norm == 'batch' else {'params': v}, XR) for v in vs]


@pytest.mark.parametrize('norm', [pytest.param('none', marks=pytest.mark.slow), 'batch'])
def test_resnet_full_size_is_exact_task_aware_ensemble(norm):
  (a, b), (ya, yb) = _resnet_pair(norm)
  kw = dict(bn_stats='keep_separate') if norm == 'batch' else {}
  res = permute.pleas(a, b, [XR[:16], XR[16:]], size=2.0, ridge=1e-9, **kw)
  assert res.stage_sizes == (1, 1) and res.features == (8, 12)
  assert res.widths == (8, 12, 8, 12) and res.size == 2.0
  out = res.module(6).apply(res.variables, XR)
  np.testing.assert_allclose(out[:, :3], ya, atol=1e-4)
  np.testing.assert_allclose(out[:, 3:], yb, atol=1e-4)


def test_resnet_pleas_beats_permute_average_with_stream_structure():
  (a, b), (ya, yb) = _resnet_pair('none')
  target = jnp.concatenate([ya, yb], 1)
  err, res = {}, {}
  for name, kw in (('pleas', {}), ('avg', dict(least_squares=False))):
    res[name] = r = permute.pleas(a, b, [XR[:16], XR[16:]], size=1.3, **kw)
    assert r.size <= 1.3 + 1e-9 and r.widths == res['pleas'].widths
    err[name] = float(jnp.mean((r.module(6).apply(r.variables, XR) - target) ** 2))
  assert err['pleas'] < 0.6 * err['avg'], err
  r = res['pleas']
  # Stage ratios are shared by the stream and inner groups of the stage.
  assert r.ratios[0] == r.ratios[2] and r.ratios[1] == r.ratios[3]
  # Block 0 of stage 0 adds into the stage-0 stream (with the stem): its
  # conv2 (inner -> stream) has exact zeros between sep_A and sep_B.
  n, s = r.widths[0], int(round(r.ratios[0] * 4))
  assert s > 0 or r.ratios[1] > 0
  if s:
    k = np.asarray(r.params['stage0_block0']['conv2']['kernel'])
    assert np.all(k[..., n - 2 * s:n - s, n - s:] == 0)
    assert np.all(k[..., n - s:, n - 2 * s:n - s] == 0)
  with pytest.raises(ValueError, match='2 stages'):
    permute.pleas(a, b, [XR], size=1.3, ratios=(0.5,))
  with pytest.raises(ValueError, match='num_hidden'):
    permute.pleas(a, b, [XR], size=1.3, num_hidden=2)
  norms = {'norm_init': {'scale': jnp.ones(4), 'bias': jnp.zeros(4)}}
  with pytest.raises(ValueError, match='LayerNorm'):
    permute.pleas({**a, **norms}, {**b, **norms}, [XR], size=1.3)


@pytest.mark.parametrize('kwargs, match', [
    (dict(ridge=-1.0), 'ridge must be a finite value >= 0'),
    (dict(ridge=float('nan')), 'ridge must be a finite value >= 0'),
    (dict(ridge=[]), 'ridge must be a finite value >= 0'),
    (dict(fit='gradient', fit_steps=0), 'fit_steps >= 1'),
])
def test_bad_ridge_and_fit_steps_are_clear_errors(kwargs, match):
  a, b = _models()
  with pytest.raises(ValueError, match=match):
    permute.pleas(a, b, [jnp.ones((8, 5))], size=1.5, **kwargs)


def test_singular_least_squares_asks_for_a_ridge():
  a, b = _models()
  x = jnp.zeros((8, 5))  # every feature constant: rank-deficient Grams
  with pytest.raises(ValueError, match='singular.*pass a ridge > 0'):
    permute.pleas(a, b, [x], size=1.5, ridge=0.0)


# --------------------------------------------------------------------------- #
# A user's own model: PLeaS through its PleasNetwork and model function.
# --------------------------------------------------------------------------- #
class _ResMLP(nn.Module):
  """Not a bundled model: other names, tanh, a residual add inside one group."""
  width: int
  hidden: int
  num_outputs: int
  norm: bool = False

  @nn.compact
  def __call__(self, x):
    z = nn.Dense(self.width, name='inp')(x)
    if self.norm:
      z = nn.LayerNorm(name='ln')(z)
    h = nn.tanh(z)
    u = nn.tanh(nn.Dense(self.hidden, name='up')(h))
    h = h + nn.Dense(self.width, name='down')(u)  # a residual stream
    return nn.Dense(self.num_outputs, name='out')(h)


def _res_apply(v, x, norm=False):
  # The widths come from the variables: the same function runs the merged model.
  p = v['params']
  return _ResMLP(p['inp']['kernel'].shape[-1], p['up']['kernel'].shape[-1],
                 p['out']['kernel'].shape[-1], norm).apply(v, x)


RES_NET = permute.PleasNetwork(
    _res_apply, (permute.PleasLayer(('inp',), None, 'h'),
                 permute.PleasLayer(('up',), 'h', 'u'),
                 permute.PleasLayer(('down',), 'u', 'h'),
                 permute.PleasLayer(('out',), 'h', None)), ('h', 'u'))
XM = jax.random.normal(jax.random.key(5), (200, 5))


def _res_pair():
  m = _ResMLP(8, 16, 3)
  a, b = (m.init(jax.random.key(k), XM)['params'] for k in (6, 7))
  return a, b, jnp.concatenate([m.apply({'params': a}, XM),
                                m.apply({'params': b}, XM)], 1)


def test_custom_network_full_size_is_the_exact_ensemble():
  a, b, target = _res_pair()
  res = permute.pleas(a, b, [XM[:100], XM[100:]], size=2.0, ridge=1e-9,
                      network=RES_NET)
  assert res.widths == (16, 32) and res.arch == 'custom' and res.size == 2.0
  np.testing.assert_allclose(res.apply(XM), target, atol=1e-4)
  with pytest.raises(ValueError, match='bundled models only'):
    res.module(6)


def test_custom_network_least_squares_beats_averaging():
  a, b, target = _res_pair()
  err = {}
  for name, kw in (('pleas', {}), ('avg', dict(least_squares=False))):
    r = permute.pleas(a, b, [XM], size=1.4, network=RES_NET, **kw)
    assert 1.0 < r.size <= 1.4 + 1e-9
    err[name] = float(jnp.mean((r.apply(XM) - target) ** 2))
  assert err['pleas'] < 0.5 * err['avg'], err


def test_custom_network_errors_are_clear():
  a, b, _ = _res_pair()
  layers = RES_NET.layers
  bad = lambda **kw: RES_NET._replace(**kw)
  with pytest.raises(ValueError, match='order the forward pass calls'):
    permute.pleas(a, b, [XM], size=1.5,
                  network=bad(layers=(layers[1], layers[0]) + layers[2:]))
  with pytest.raises(ValueError, match="no module 'upp'"):
    permute.pleas(a, b, [XM], size=1.5, network=bad(
        layers=(layers[0], permute.PleasLayer(('upp',), 'h', 'u')) + layers[2:]))
  with pytest.raises(ValueError, match='never read'):
    permute.pleas(a, b, [XM], size=1.5, network=bad(layers=layers[:2] + layers[3:]))
  extra = {'scale': {'w': jnp.ones(3)}}
  with pytest.raises(ValueError, match="'scale/w' belongs to no layer"):
    permute.pleas({**a, **extra}, {**b, **extra}, [XM], size=1.5, network=RES_NET)
  with pytest.raises(ValueError, match='task head'):
    permute.pleas(a, b, [XM], size=1.5, network=bad(layers=layers[:3]))
  with pytest.raises(ValueError, match='not in network.groups'):
    permute.pleas(a, b, [XM], size=1.5, network=bad(groups=('h', 'v')))
  with pytest.raises(ValueError, match='reads and writes group'):
    permute.pleas(a, b, [XM], size=1.5, network=bad(
        layers=(layers[0], permute.PleasLayer(('up',), 'h', 'h')) + layers[2:]))
  with pytest.raises(ValueError, match='num_hidden and norm'):
    permute.pleas(a, b, [XM], size=1.5, network=RES_NET, num_hidden=1)
  # A LayerNorm after a layer mixes the blocks: read from the module itself.
  m = _ResMLP(8, 16, 3, norm=True)
  la, lb = (m.init(jax.random.key(k), XM)['params'] for k in (6, 7))
  ln_net = RES_NET._replace(
      apply=functools.partial(_res_apply, norm=True),
      layers=(permute.PleasLayer(('inp',), None, 'h', ('ln',)),) + layers[1:])
  with pytest.raises(ValueError, match="'ln' is a LayerNorm"):
    permute.pleas(la, lb, [XM], size=1.5, network=ln_net)


def test_choose_ratios_rejects_unreachable_sizes_and_bad_steps():
  dims = [(4, 8), (8, 2)]
  sims = [np.linspace(0.0, 1.0, 8)]
  floor = permute.merged_size(dims, [0.0])
  assert floor > 1.0  # the heads stay separate
  assert permute.choose_ratios(sims, dims, floor) == (0.0,)
  assert permute.choose_ratios(sims, dims, 1.0) == (0.0,)  # merged body
  with pytest.raises(ValueError, match='at least 1.0'):
    permute.choose_ratios(sims, dims, 0.99)
  with pytest.raises(ValueError, match='at least 1.0'):
    permute.choose_ratios(sims, dims, float('nan'))
  with pytest.raises(ValueError, match='step must be a positive int'):
    permute.choose_ratios(sims, dims, 1.5, step=-1)
