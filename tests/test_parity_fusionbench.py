"""Parity against FusionBench 0.2.33 (optional peer) on random tensors.

Orientation: FusionBench works on PyTorch state dicts, where a linear weight is
``(out, in)``; the Flax tree here stores kernels ``(in, out)``. ``_to_flax``
transposes every 2-D entry explicitly (``'x.weight' (out, in)`` ->
``{'x': {'kernel': (in, out)}}``), and ``_to_torch`` maps results back, so the
orientation-sensitive methods (Iso-CTS) are checked with the mapping applied.
"""

import importlib
import importlib.util
import sys
import types

import jax.numpy as jnp
import numpy as np
import pytest

import mergejax as mj
from mergejax.testing import require_peer

M = mj.methods
pytestmark = pytest.mark.peer



SHAPES = {'enc.weight': (5, 7), 'enc.bias': (5,), 'mlp.weight': (9, 5),
          'mlp.bias': (9,), 'head.weight': (4, 9), 'norm.weight': (9,)}


def _state_dicts(torch, k=3, seed=0):
  g = torch.Generator().manual_seed(seed)
  base = {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}
  fts = [{n: v + 0.1 * torch.randn(v.shape, generator=g) for n, v in base.items()}
         for _ in range(k)]
  return base, fts


def _to_flax(sd):
  """PyTorch state dict -> Flax-style tree; 2-D weights are transposed."""
  out = {}
  for name, v in sd.items():
    mod, kind = name.rsplit('.', 1)
    x = np.asarray(v.detach().numpy(), np.float32)
    if kind == 'weight' and x.ndim == 2:
      out.setdefault(mod, {})['kernel'] = jnp.asarray(x.T)
    else:
      out.setdefault(mod, {})['bias' if kind == 'bias' else 'scale'] = jnp.asarray(x)
  return out


def _to_torch(tree):
  out = {}
  for mod, leaves in tree.items():
    for kind, x in leaves.items():
      x = np.asarray(x, np.float64)
      if kind == 'kernel':
        out[f'{mod}.weight'] = x.T
      elif kind == 'bias':
        out[f'{mod}.bias'] = x
      else:
        out[f'{mod}.weight'] = x
  return out


def _assert_sd_close(got_tree, want_sd, tol=1e-4):
  got = _to_torch(got_tree)
  assert set(got) == set(want_sd)
  for n, w in want_sd.items():
    np.testing.assert_allclose(got[n], np.asarray(w, np.float64), rtol=tol, atol=tol,
                               err_msg=n)


def _setup(k=3):
  torch = require_peer('torch')
  require_peer('fusion_bench')
  base, fts = _state_dicts(torch, k)
  tvs = [{n: ft[n] - base[n] for n in base} for ft in fts]
  return torch, base, fts, tvs, _to_flax(base), [_to_flax(f) for f in fts]


def _add(base, tv, scale=1.0):
  return {n: base[n] + scale * tv[n] for n in base}


def test_tsvm_parity():
  _, base, _, tvs, jb, jm = _setup()
  from fusion_bench.method.task_singular_vector.utils import TSVM_utils
  tv = TSVM_utils.compute_and_sum_svd_mem_reduction(tvs, accelerator='cpu')
  _assert_sd_close(mj.merge(M.tsv(alpha=0.8), jb, jm), _add(base, tv, 0.8))


def test_iso_c_and_iso_cts_parity():
  _, base, _, tvs, jb, jm = _setup()
  from fusion_bench.method.isotropic_merging import iso_utils
  tv = iso_utils.iso_c(tvs, accelerator='cpu')
  _assert_sd_close(mj.merge(M.iso_c(alpha=1.5), jb, jm), _add(base, tv, 1.5))
  tv = iso_utils.iso_cts(tvs, common_space_fraction=0.8, accelerator='cpu')
  # Flax kernels are (in, out): the default layout ('auto') reads `kernel`
  # leaves that way, which maps FusionBench's output side.
  _assert_sd_close(mj.merge(M.iso_cts(alpha=1.5), jb, jm), _add(base, tv, 1.5))


def test_ties_global_parity():
  torch, base, _, tvs, jb, jm = _setup()
  from fusion_bench.method.ties_merging import ties_merging_utils as tu
  flat = torch.vstack([tu.state_dict_to_vector(t) for t in tvs])
  merged = tu.ties_merging(flat, reset_thresh=20, merge_func='sum')
  tv = tu.vector_to_state_dict(merged, tvs[0])
  tx = M.ties(density=0.2, scope='global', count='fusionbench', exact=False,
              zero='majority', reduce='sum', lambda_=0.3)
  _assert_sd_close(mj.merge(tx, jb, jm), _add(base, tv, 0.3))


def test_magmax_parity():
  _, base, _, tvs, jb, jm = _setup()
  from fusion_bench.method.magmax import magmax
  tv = magmax._magmax_select(tvs)  # pylint: disable=protected-access
  _assert_sd_close(mj.merge(M.magmax(), jb, jm), _add(base, tv, 0.5))


def test_tall_mask_parity_fusion_bench_formula():
  torch, base, _, tvs, jb, jm = _setup()
  from fusion_bench.method.tall_mask import task_arithmetic as tall
  mtl = {n: sum(t[n] for t in tvs) for n in base}
  _, st = mj.merge(M.tall_masks(0.6, formula='fusion_bench'), jb, jm, return_state=True)
  for i, t in enumerate(tvs):
    # FusionBench's own call: (multi_task_vector, task vector, pretrained weights).
    mask = tall.generate_task_masks(mtl, t, base, tall_mask_lambda=0.6)
    want = {n: base[n] + mask[n] * mtl[n] for n in base}
    _assert_sd_close(M.reconstruct(st, jb, i), want)
  del torch


def test_emr_parity():
  _, base, _, tvs, jb, jm = _setup()
  from fusion_bench.method.emr_merging import utils as emr_utils
  uni, masks, rescalers = emr_utils.emr_merge(tvs)
  _, st = mj.merge(M.emr(), jb, jm, return_state=True)
  np.testing.assert_allclose(st['emr'].rescalers, rescalers.numpy(), rtol=1e-5)
  for i in range(len(tvs)):
    want = {n: base[n] + uni[n] * masks[n][i] * rescalers[i] for n in base}
    _assert_sd_close(M.reconstruct(st, jb, i), want)


def _load_fb_opcm():
  """Imports FusionBench's general OPCM without its CLIP-only package init.

  ``fusion_bench.method.opcm.__init__`` imports a CLIP module that
  transformers 5 no longer has, so a bare package stands in for it.
  """
  name = 'fusion_bench.method.opcm'
  if name + '.opcm_general' in sys.modules:
    return sys.modules[name + '.opcm_general']
  import fusion_bench.method  # pylint: disable=g-import-not-at-top
  pkg_dir = fusion_bench.method.__path__[0] + '/opcm'
  if name not in sys.modules:
    pkg = types.ModuleType(name)
    pkg.__path__ = [pkg_dir]
    sys.modules[name] = pkg
  spec = importlib.util.spec_from_file_location(name + '.opcm_general',
                                                pkg_dir + '/opcm_general.py')
  mod = importlib.util.module_from_spec(spec)
  sys.modules[name + '.opcm_general'] = mod
  spec.loader.exec_module(mod)
  return mod


def test_opcm_parity():
  torch, base, fts, _, jb, jm = _setup(k=4)
  mod = _load_fb_opcm()
  fake = types.SimpleNamespace(fabric=types.SimpleNamespace(device='cpu'),
                               previous_lambda_t=1.0, lambda_t=1.0)
  alpha = 0.5
  norm = lambda sd: torch.linalg.norm(torch.cat([(sd[n] - base[n]).reshape(-1)
                                                 for n in base]))
  merged = {n: v.clone() for n, v in fts[0].items()}
  norms = [norm(merged)]
  for ft in fts[1:]:  # FusionBench OPCM.run, with its per-layer merge functions
    norms.append(norm(ft))
    avg = np.mean([float(x) for x in norms])
    fake.lambda_t = 1.0
    new = {}
    for n in base:
      if n.endswith('.weight') and base[n].ndim == 2:
        _, new[n] = mod.OPCM.merge_linear_weights(fake, merged[n], base[n], ft[n],
                                                   n, alpha)
      else:
        new[n] = mod.OPCM.merge_other_parameters(fake, merged[n], base[n], ft[n], n)
    tvn = float(norm(new))
    lam = tvn / avg
    merged = {n: base[n] + (new[n] - base[n]) * (avg / tvn) for n in base}
    fake.previous_lambda_t = lam
  _assert_sd_close(mj.merge(M.opcm(alpha), jb, jm), merged)


def test_wudi_parity():
  torch, base, _, tvs, jb, jm = _setup()
  from fusion_bench.method.wudi import wudi as fb_wudi
  with torch.enable_grad():
    tv = fb_wudi.wudi_merging(tvs, accelerator='cpu', iter_num=300)
  tv = {n: v.detach() for n, v in tv.items()}
  # FusionBench's function fixes lr 1e-5; every 2-D key is a matrix (the
  # transposed kernels here), everything else is averaged.
  _assert_sd_close(mj.merge(M.wudi(steps=300), jb, jm), _add(base, tv),
                   tol=1e-5)


def _gram(torch, n, g):
  x = torch.randn(3 * n, n, generator=g)
  return x.T @ x / (3 * n)


def test_regmean_per_layer_solve_parity():
  torch, _, fts, _, _, jm = _setup()
  from fusion_bench.method.regmean import regmean as fb  # pylint: disable=g-import-not-at-top
  g = torch.Generator().manual_seed(5)
  linear = [n[:-len('.weight')] for n, s in SHAPES.items()
            if n.endswith('.weight') and len(s) == 2]
  grams = [{m: _gram(torch, SHAPES[f'{m}.weight'][1], g) for m in linear}
           for _ in fts]
  want = fb.merging_with_regmean_weights(
      {n: [ft[n] for ft in fts] for n in SHAPES}, grams,
      reduce_non_diagonal_ratio=0.7)
  ours = M.regmean([{f'{m}/kernel': jnp.asarray(gr[m].numpy())
                     for m in linear} for gr in grams], alpha=0.7)
  _assert_sd_close(mj.merge(ours, None, jm), want, tol=2e-4)


def test_fisher_weighting_parity():
  torch, _, fts, _, _, jm = _setup()
  from fusion_bench.method.fisher_merging import fisher_merging as fb  # pylint: disable=g-import-not-at-top
  g = torch.Generator().manual_seed(6)
  fishers = [{n: torch.rand(s, generator=g) ** 2 for n, s in SHAPES.items()}
             for _ in fts]
  want = fb.merging_with_fisher_weights(
      {n: [ft[n] for ft in fts] for n in SHAPES}, fishers,
      torch.ones(len(fts)), normalize_fisher_weight=True,
      minimal_fisher_weight=1e-6)
  ours = M.fisher_merging([_to_flax(f) for f in fishers], epsilon=1e-6,
                          normalize=True)
  _assert_sd_close(mj.merge(ours, None, jm), want, tol=1e-5)


def test_adamerging_merge_parity():
  # FusionBench's layer-wise AdaMerging wrapper (task vectors from the torch
  # modules, weights clamped to [0, 1]) and its task-wise fuse_weights against
  # `adamerging` with the same coefficients, clamped here.
  torch, base, fts, tvs, jb, jm = _setup()
  from fusion_bench.models.wrappers import layer_wise_fusion  # pylint: disable=g-import-not-at-top
  from fusion_bench.models.wrappers import task_wise_fusion  # pylint: disable=g-import-not-at-top

  class Net(torch.nn.Module):

    def __init__(self, sd):
      super().__init__()
      self.enc = torch.nn.Linear(7, 5)
      self.mlp = torch.nn.Linear(5, 9)
      self.head = torch.nn.Linear(9, 4, bias=False)
      self.norm = torch.nn.Module()
      self.norm.weight = torch.nn.Parameter(torch.zeros(9))
      self.load_state_dict(sd)

  names = [n for n, _ in Net(base).named_parameters()]
  g = torch.Generator().manual_seed(3)
  weights = torch.rand((3, len(names)), generator=g) * 1.4 - 0.2  # some clamp
  wrapped = layer_wise_fusion.LayerWiseMergedModel(
      weights.clone(), Net(base), [Net(f) for f in fts], clamp_weights=True)
  want = {n: v.detach() for n, v in wrapped.merge_weights().items()}
  clamped = np.clip(weights.numpy(), 0.0, 1.0)
  coeffs = _to_flax({n: torch.zeros(SHAPES[n]) for n in names})
  for j, n in enumerate(names):
    mod, kind = n.rsplit('.', 1)
    leaf = 'kernel' if kind == 'weight' and len(SHAPES[n]) == 2 else (
        'bias' if kind == 'bias' else 'scale')
    coeffs[mod][leaf] = jnp.asarray(clamped[:, j])
  _assert_sd_close(mj.merge(M.adamerging(coeffs), jb, jm), want, tol=1e-5)
  task = torch.tensor([0.3, 0.7, 0.2])
  fused = task_wise_fusion.fuse_weights(task, tvs)
  _assert_sd_close(mj.merge(M.adamerging(jnp.asarray(task.numpy())), jb, jm),
                   _add(base, fused), tol=1e-5)
