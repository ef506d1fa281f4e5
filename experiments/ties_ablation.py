"""TIES ablations on the default digits zoo.

Launch with ``python -m experiments.main --config=configs/ties_ablation.py
--workdir=/tmp/exp_work`` (see ``configs/ties_ablation.py``). Writes
``results.json`` and ``results.png`` into ``<workdir>/ties_ablation``; the zoo
is the default experiment's, cached in ``<workdir>/zoo``.

Structural variants (each one compiled merge, vmapped over the densities):

* ``task_arithmetic``: ``task_vectors, weighted_sum, scale, apply_updates``.
* ``trim_only/<scope>``: ``task_vectors, trim(density, scope), weighted_sum,
  scale, apply_updates`` (no sign election).
* ``ties/<scope>/<reduce>``: ``mergejax.methods.ties(density, scope=...,
  reduce=...)``; at density 1 this is sign election only.

Lambda is swept without re-merging: every variant ends in ``scale(lambda),
apply_updates``, so the merge at lambda ``l`` is exactly ``theta_0 + l (m_1 -
theta_0)`` with ``m_1`` the merge at lambda 1 (checked in the tests). Each
(density, lambda) grid is evaluated on the validation split; lambda (and, for
the "best" rows, the density) is chosen there and test accuracy is reported.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import mergejax as mj
from experiments import zoo
from experiments.tools import plotting

from experiments import default as default_exp


def setup(config, workdir: str) -> dict[str, Any]:
  """The default experiment's zoo (trained or cached) and its evaluator."""
  os.makedirs(workdir, exist_ok=True)
  _, tasks, model, z, zoo_info = default_exp.build_zoo(config, workdir)
  names = [t.name for t in tasks]
  sub = config.merge.params
  heads = z.finetuned['head']
  ev = zoo.TaskEvaluator(model, tasks, heads)
  ft_acc = np.diag(ev.accuracies(z.finetuned[sub], 'test'))
  base_bb = z.base[sub]
  ft_bbs = [jax.tree.map(lambda x, i=i: x[i], z.finetuned[sub])
            for i in range(len(names))]
  return dict(tasks=tasks, names=names, model=model, zoo=z, zoo_info=zoo_info,
              heads=heads, ev=ev, ft_acc=ft_acc, base=base_bb, fts=ft_bbs,
              zoo_hash=default_exp.zoo_hash(config))


def variant_tx(kind: str, density, *, scope: str = 'tensor',
               reduce: str = 'mean') -> mj.MergeTransformation:
  """The merge of one structural variant at lambda 1."""
  if kind == 'task_arithmetic':
    return mj.methods.task_arithmetic(lambda_=1.0)
  if kind == 'trim_only':
    return mj.chain(mj.transforms.task_vectors(), mj.transforms.trim(density, scope=scope),
                    mj.transforms.weighted_sum(), mj.transforms.scale(1.0), mj.transforms.apply_to_base())
  if kind == 'ties':
    return mj.methods.ties(density=density, scope=scope, reduce=reduce,
                           lambda_=1.0)
  raise ValueError(f'Unknown variant kind {kind!r}: use task_arithmetic, '
                   'trim_only or ties.')


def variants(config) -> dict[str, tuple[str, dict]]:
  """``{label: (kind, static kwargs)}`` in table order."""
  out = {'task_arithmetic': ('task_arithmetic', {})}
  for scope in config.scopes:
    out[f'trim_only/{scope}'] = ('trim_only', dict(scope=scope))
  for scope in config.scopes:
    for reduce in config.reduces:
      out[f'ties/{scope}/{reduce}'] = ('ties', dict(scope=scope, reduce=reduce))
  return out


def merge_densities(kind: str, static: dict, base, fts, densities, key):
  """Merges at every density in one vmapped, compiled call: ``[D, ...]``."""
  if kind == 'task_arithmetic':  # no density: one merge
    return jax.tree.map(lambda x: x[None],
                        mj.merge(variant_tx(kind, 1.0), base, fts, key=key))
  return jax.vmap(lambda d: mj.merge(variant_tx(kind, d, **static), base, fts,
                                     key=key))(
                                         jnp.asarray(densities, jnp.float32))


def scale_grid(base, merged, lambdas):
  """``theta_0 + l (m - theta_0)`` for every merge and lambda: ``[D * L, ...]``.

  Equal to re-merging with ``scale(l)``, since scale and apply_updates are the
  last steps.
  """
  lam = jnp.asarray(lambdas, jnp.float32)

  def one(b, m):
    out = b[None, None] + lam.reshape((1, -1) + (1,) * b.ndim) * (
        m[:, None] - b[None, None])
    return out.reshape((-1,) + b.shape)

  return jax.tree.map(one, base, merged)


def evaluate_grid(ev, bbs, n_d: int, n_l: int, ft_acc):
  """Validation / test accuracies of a ``[D * L]`` grid, shaped ``[D, L, K]``."""
  val = ev.accuracies(bbs, 'val').reshape(n_d, n_l, -1)
  test = ev.accuracies(bbs, 'test').reshape(n_d, n_l, -1)
  norm = test / np.maximum(ft_acc, 1e-12)
  return val, test, norm


def _plot(path: str, curves: dict, bars: list[tuple[str, float]], ref: dict):
  plt = plotting._plt()  # pylint: disable=protected-access
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13.0, 4.5))
  cols = plotting.colors(list(curves))
  for label, (ds, ys) in curves.items():
    ax1.plot(ds, ys, marker='o', ms=4, label=label, color=cols[label])
  # The bars get their own colors (the palette has 12; both panels need more).
  bar_cols = plotting.colors([b for b, _ in bars])
  ax1.axhline(ref['task_arithmetic'], color='black', ls='--',
              label='task arithmetic')
  ax1.set_xscale('log')
  ax1.set_xlabel('trim density (fraction of task vector kept)')
  ax1.set_ylabel('avg normalized accuracy (test)')
  ax1.set_title('Density sweep (lambda chosen on validation)')
  ax1.legend(fontsize=8)
  xs = np.arange(len(bars))
  ax2.bar(xs, [v for _, v in bars], color=[bar_cols[b] for b, _ in bars])
  ax2.set_xticks(xs, [b for b, _ in bars], rotation=45, ha='right', fontsize=8)
  lo = min(v for _, v in bars)
  ax2.set_ylim(max(0.0, lo - 0.1), 1.0)
  ax2.set_ylabel('avg normalized accuracy (test)')
  ax2.set_title('TIES ablation (density and lambda chosen on validation)')
  for x, (_, v) in zip(xs, bars):
    ax2.text(x, v + 0.003, f'{v:.3f}', ha='center', fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _sel(val, test, norm, i, j):
  return dict(val_avg_accuracy=float(val[i, j].mean()),
              avg_accuracy=float(test[i, j].mean()),
              avg_normalized=float(norm[i, j].mean()))


def main(config, workdir: str) -> dict[str, Any]:
  """Runs the ablation; returns (and writes) the results dictionary."""
  t_start = time.perf_counter()
  s = setup(config, workdir)
  outdir = os.path.join(workdir, 'ties_ablation')
  os.makedirs(outdir, exist_ok=True)
  ev, ft_acc, base, fts = s['ev'], s['ft_acc'], s['base'], s['fts']
  densities = [float(d) for d in config.densities]
  lambdas = [float(l) for l in config.merge.lambdas]
  key = jax.random.fold_in(jax.random.key(config.seed), 6)
  n_l = len(lambdas)

  results_v = {}
  for label, (kind, static) in variants(config).items():
    t0 = time.perf_counter()
    ds = [1.0] if kind == 'task_arithmetic' else densities
    merged = merge_densities(kind, static, base, fts, ds, key)
    t_merge = time.perf_counter() - t0
    val, test, norm = evaluate_grid(ev, scale_grid(base, merged, lambdas),
                                    len(ds), n_l, ft_acc)
    vavg = val.mean(axis=-1)  # [D, L]
    per_density = []
    for i, d in enumerate(ds):
      j = int(np.argmax(vavg[i]))  # first best: the smallest lambda on ties
      per_density.append(dict(density=d, lambda_=lambdas[j],
                              **_sel(val, test, norm, i, j)))
    i, j = np.unravel_index(int(np.argmax(vavg)), vavg.shape)
    best = dict(density=ds[i], lambda_=lambdas[j], **_sel(val, test, norm, i, j))
    best['accuracy'] = dict(zip(s['names'], map(float, test[i, j])))
    results_v[label] = dict(kind=kind, **static, per_density=per_density,
                            best=best, seconds=dict(
                                merge=t_merge,
                                total=time.perf_counter() - t0))
    print(f'  {label:<18} best: density {best["density"]:g} lambda '
          f'{best["lambda_"]:g} -> norm {best["avg_normalized"]:.3f}  '
          f'(merge {t_merge:.1f}s, {len(ds)} densities x {n_l} lambdas)',
          flush=True)

  def at(label, d):
    return next(r for r in results_v[label]['per_density']
                if abs(r['density'] - d) < 1e-9)

  # Ablation rows: (row, variant, setting) with density and lambda chosen on
  # validation unless the row fixes the density.
  s0 = config.scopes[0]
  r0 = config.reduces[0]
  rows = [('task arithmetic', results_v['task_arithmetic']['best'])]
  for scope in config.scopes:
    rows.append((f'trim only ({scope})', results_v[f'trim_only/{scope}']['best']))
  ties_labels = [f'ties/{sc}/{rd}' for sc in config.scopes
                 for rd in config.reduces]
  if 1.0 in densities:
    for rd in config.reduces:
      rows.append((f'sign only ({rd})', at(f'ties/{s0}/{rd}', 1.0)))
  pd = float(config.paper_density)
  if pd in densities:
    rows.append((f'TIES d={pd:g} ({s0}, {r0})', at(f'ties/{s0}/{r0}', pd)))
  for lab in ties_labels:
    _, sc, rd = lab.split('/')
    rows.append((f'TIES ({sc}, {rd})', results_v[lab]['best']))
  ablation = [dict(row=name, **{k: v for k, v in r.items() if k != 'accuracy'})
              for name, r in rows]

  # Tables.
  head = f'{"setting":<30}{"density":>8}{"lambda":>8}{"val":>8}{"test":>8}{"norm":>8}'
  lines = [head, '-' * len(head)]
  for r in ablation:
    lines.append(f'{r["row"]:<30}{r["density"]:>8g}{r["lambda_"]:>8g}'
                 f'{r["val_avg_accuracy"]:>8.3f}{r["avg_accuracy"]:>8.3f}'
                 f'{r["avg_normalized"]:>8.3f}')
  table = '\n'.join(lines)
  curve_labels = [l for l in results_v if l != 'task_arithmetic']
  head2 = f'{"variant":<22}' + ''.join(f'{d:>7g}' for d in densities)
  lines2 = [head2, '-' * len(head2)]
  for lab in curve_labels:
    lines2.append(f'{lab:<22}' + ''.join(
        f'{r["avg_normalized"]:>7.3f}' for r in results_v[lab]['per_density']))
  density_table = '\n'.join(lines2)

  total = time.perf_counter() - t_start
  results = dict(
      experiment='ties_ablation', workdir=os.path.abspath(workdir),
      config=default_exp._jsonable(config.to_dict()),  # pylint: disable=protected-access
      tasks=s['names'], finetuned_accuracy=dict(zip(s['names'],
                                                    map(float, ft_acc))),
      zoo=dict(hash=s['zoo_hash'], **s['zoo_info']),
      densities=densities, lambdas=lambdas, variants=results_v,
      ablation=ablation, table=table, density_table=density_table,
      seconds=dict(total=total, zoo=s['zoo_info']['seconds']),
      jax=dict(version=jax.__version__, backend=jax.default_backend()))
  print('\nTIES ablation: test accuracy averaged over tasks; norm = mean of acc '
        '/ fine-tuned acc; density and lambda chosen on validation\n' + table)
  print('\nDensity sweep: avg normalized test accuracy (lambda chosen on '
        'validation per density)\n' + density_table, flush=True)
  with open(os.path.join(outdir, 'results.json'), 'w') as f:
    json.dump(results, f, indent=1, default=str)
  curves = {lab: ([r['density'] for r in results_v[lab]['per_density']],
                  [r['avg_normalized'] for r in results_v[lab]['per_density']])
            for lab in curve_labels}
  _plot(os.path.join(outdir, 'results.png'), curves,
        [(r['row'], r['avg_normalized']) for r in ablation],
        dict(task_arithmetic=results_v['task_arithmetic']['best'][
            'avg_normalized']))
  print(f'wrote {outdir}/results.json and results.png in {total:.1f}s total')
  return results
