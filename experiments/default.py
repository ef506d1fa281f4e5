"""The default experiment: merge a digits zoo with every `mergejax.methods` method.

Launch with ``python -m experiments.main --config=configs/default.py
--workdir=workdir`` (see ``configs/default.py`` for the design and the
per-method protocols). Writes ``results.json`` and ``results.png`` into the
work directory and caches the trained zoo there (orbax, keyed by a hash of the
zoo config), so a second run skips training.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import os
import time
import traceback
import zlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import mergejax as mj
from experiments import zoo
from experiments.tools import results as results_lib

# Bump when the zoo's training code changes in a way the config does not show,
# so that stale caches are not reused.
ZOO_VERSION = 2  # 2: the fine-tunes' Adam second moments are kept
PROTOCOLS = ('models', 'no_base', 'sum_endpoint', 'fold', 'per_task',
             'routed', 'lora', 'data', 'surgery', 'not_applicable')


def zoo_hash(config) -> str:
  """A short hash of everything that determines the trained zoo."""
  spec = dict(zoo=config.zoo.to_dict(), seed=config.seed, version=ZOO_VERSION)
  blob = json.dumps(spec, sort_keys=True, default=list)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_zoo(config, workdir: str):
  """Data, tasks, model and the trained (or cached) zoo."""
  zc = config.zoo
  k_data, k_tasks, k_base, k_ft = jax.random.split(
      jax.random.key(config.seed), 4)
  digits = zoo.load_digits(k_data, **zc.data.to_dict())
  tasks = zoo.make_tasks(digits, list(zc.tasks), k_tasks)
  model = zoo.Classifier(width=zc.width, depth=zc.depth)
  show = None if config.progress else False

  def train():
    base = zoo.train_base(model, digits, k_base, show=show, **zc.base.to_dict())
    fts, nu = zoo.finetune(model, base, tasks, k_ft, show=show,
                           return_second_moments=True,
                           **zc.finetune.to_dict())
    return dict(base=base, finetuned=fts, second_moments=nu)

  k = len(tasks)
  abstract_one = jax.eval_shape(lambda: zoo.init_params(model,
                                                        jax.random.key(0)))
  abstract = dict(
      base=abstract_one,
      finetuned=jax.tree.map(
          lambda a: jax.ShapeDtypeStruct((k,) + a.shape, a.dtype),
          abstract_one),
      second_moments=jax.tree.map(
          lambda a: jax.ShapeDtypeStruct((k,) + a.shape, jnp.float32),
          abstract_one['backbone']))
  path = os.path.join(workdir, 'zoo', zoo_hash(config))
  t0 = time.perf_counter()
  tree, cached = zoo.load_or_train(path, train, abstract)
  seconds = time.perf_counter() - t0
  print(f'zoo: {k} tasks {[t.name for t in tasks]}, width {zc.width}; '
        f'{"restored from cache" if cached else "trained"} in {seconds:.1f}s '
        f'({path})', flush=True)
  return (digits, tasks, model, zoo.Zoo(tree['base'], tree['finetuned'],
                                        tree['second_moments']),
          dict(path=path, cached=cached, seconds=seconds))


def lora_zoo(base, fts: list, rank: int | None) -> list:
  """The LoRA zoo derived from the dense fine-tunes: one adapter per task.

  Each fine-tune's task vector ``tau_i = theta_i - theta_0`` keeps its best
  rank-``rank`` factorisation on every matrix leaf (`mergejax.transforms.lora_from_delta`:
  truncated SVD, ``a = U sqrt(S)``, ``b = sqrt(S) V^T`` in Flax (in, out)
  layout); other leaves (biases) stay dense task vectors. ``rank=None`` keeps
  each matrix's full rank (the adapters then reproduce the task vectors).
  """
  derive = jax.jit(lambda b, ft: mj.transforms.lora_from_delta(
      jax.tree.map(jnp.subtract, ft, b), rank))
  return [derive(base, ft) for ft in fts]


def _is_lora_method(factory) -> bool:
  """Whether a factory merges `mergejax.transforms.LoRA` factor pairs (`merge_lora`)."""
  # The LoRA-factor methods (lora_svd, lora_lego) share one module.
  return getattr(factory, '__module__', None) == mj.methods.lora_svd.__module__


def _accepted(factory, names) -> set[str]:
  params = inspect.signature(factory).parameters
  if any(p.kind == p.VAR_KEYWORD for p in params.values()):
    return set(names)
  return {n for n in names if n in params}


def _stack(trees):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def data_statistics(entry, model, sub: str, base, fts: list, heads,
                    tasks, second_moments=None) -> dict:
  """The ``data`` protocol's statistics, as keyword arguments of the method.

  Each fine-tune's statistics come from the first ``entry.data.examples``
  training inputs of its own task, in batches of ``entry.data.batch_size``:
  ``stats='fisher'`` gives ``fishers`` (`mergejax.stats.fisher_diagonal` of
  the classifier with the task's own head, kind ``entry.data.fisher_kind``;
  the backbone part), ``stats='gram'`` gives ``grams``
  (`mergejax.stats.input_grams` of the backbone's Dense layers), and
  ``stats='sequential'`` what `mergejax.methods.regmean_plusplus` computes
  its Grams from (the Dense-input function, the models, each one's batches),
  ``stats='unlabeled'`` AdaMerging's ``coefficients``, fitted
  (`mergejax.methods.fit_adamerging`) to minimise the prediction entropy of
  every task's head on the first ``examples`` *validation* inputs of its task,
  labels unused, ``stats='adam'`` each fine-tune's Adam second moments
  (``second_moments``, saved by the zoo's fine-tuning), ``stats='concrete'``
  the Concrete task-arithmetic
  ``mask`` (`mergejax.methods.fit_concrete`) fitted the same way at the
  entry's ``lambda_``, ``stats='concrete_adamerging'`` the mask and
  coefficients of `mergejax.methods.fit_concrete_adamerging`, and
  ``stats='expert'`` Expert Merging's layer-wise
  coefficients (`mergejax.methods.fit_expert_merging`), fitted on the same
  inputs to align the backbone's Dense outputs and each task's logits with
  the fine-tune's; with ``chunk_budget`` (Expert Merging++) a second fit
  with the chunk-wise coefficients `mergejax.methods.importance_chunks`
  allots from the first.
  """
  if sub != 'backbone':
    raise ValueError(f"the data protocol merges backbones; config.merge.params "
                     f"is {sub!r}.")
  d = entry.data
  if d.stats == 'adam':  # saved with the fine-tunes; no data is read
    if second_moments is None:
      raise ValueError("stats='adam' needs the zoo's second moments.")
    return dict(second_moments=[jax.tree.map(lambda v, i=i: v[i],
                                             second_moments)
                                for i in range(len(fts))])
  if d.stats == 'unlabeled':
    return dict(coefficients=_fit_adamerging(d, model, base, fts, heads,
                                             tasks))
  if d.stats == 'concrete':
    return dict(mask=_fit_concrete(d, entry.kwargs.lambda_, model, base, fts,
                                   heads, tasks))
  if d.stats == 'concrete_adamerging':
    loss, batches = _unlabeled_entropy(d, model, heads, tasks)
    res = mj.methods.fit_concrete_adamerging(
        loss, base, fts, batches, key=jax.random.key(d.seed), steps=d.steps,
        adamerging_steps=d.adamerging_steps)
    return dict(mask=res.mask, coefficients=res.coefficients)
  if d.stats == 'expert':
    return dict(coefficients=_fit_expert_merging(d, model, base, fts, heads,
                                                 tasks))
  logits_fn = _classifier_logits(model)
  inputs_fn = _backbone_inputs(model)
  out, per_model = [], []
  for i, (bb, task) in enumerate(zip(fts, tasks)):
    x = jnp.asarray(task.train.x[:d.examples], jnp.float32)
    y = jnp.asarray(task.train.y[:d.examples], jnp.int32)
    batches = [(x[j:j + d.batch_size], y[j:j + d.batch_size])
               for j in range(0, x.shape[0], d.batch_size)]
    if d.stats == 'fisher':
      head = jax.tree.map(lambda h, i=i: h[i], heads)
      f = mj.stats.fisher_diagonal(logits_fn, {'backbone': bb, 'head': head},
                                   batches, kind=d.fisher_kind,
                                   key=jax.random.key(i))
      out.append(f['backbone'])
    elif d.stats == 'gram':
      out.append(mj.stats.input_grams(inputs_fn, bb, batches))
    elif d.stats == 'sequential':
      per_model.append([b[0] for b in batches])
    else:
      raise ValueError(f"data.stats must be 'fisher', 'gram' or 'sequential', "
                       f'got {d.stats!r}.')
  if d.stats == 'sequential':
    return dict(inputs_fn=inputs_fn, models=list(fts), batches=per_model)
  return {'fishers' if d.stats == 'fisher' else 'grams': out}


def _unlabeled_entropy(d, model, heads, tasks):
  """The entropy loss of every task's head, and its unlabeled val batches."""
  xs = jnp.stack([jnp.asarray(t.val.x[:d.examples], jnp.float32)
                  for t in tasks])  # [K, n, 64]: each task through its head

  def loss(bb, xb):
    logits = jax.vmap(lambda h, x: model.apply(
        {'params': {'backbone': bb, 'head': h}}, x))(heads, xb)
    return mj.methods.prediction_entropy(logits)

  batches = [xs[:, j:j + d.batch_size]
             for j in range(0, xs.shape[1] - d.batch_size + 1, d.batch_size)]
  return loss, batches


def _fit_concrete(d, lambda_, model, base, fts, heads, tasks):
  loss, batches = _unlabeled_entropy(d, model, heads, tasks)
  res = mj.methods.fit_concrete(loss, base, fts, batches,
                                key=jax.random.key(d.seed), lambda_=lambda_,
                                steps=d.steps, learning_rate=d.learning_rate)
  return res.mask()


def _fit_expert_merging(d, model, base, fts, heads, tasks):
  xs = jnp.stack([jnp.asarray(t.val.x[:d.examples], jnp.float32)
                  for t in tasks])
  batches = [xs[:, j:j + d.batch_size]
             for j in range(0, xs.shape[1] - d.batch_size + 1, d.batch_size)]
  outputs = _backbone_outputs(model, heads)
  res = mj.methods.fit_expert_merging(outputs, base, fts, batches,
                                      steps=d.steps,
                                      learning_rate=d.learning_rate)
  if d.get('chunk_budget'):  # Expert Merging++: chunks from the first fit
    chunks = mj.methods.importance_chunks(res.coefficients, base, fts,
                                          budget=d.chunk_budget,
                                          max_chunks=d.max_chunks)
    res = mj.methods.fit_expert_merging(outputs, base, fts, batches,
                                        steps=d.steps,
                                        learning_rate=d.learning_rate,
                                        chunks=chunks)
  return res.coefficients


def _backbone_outputs(model, heads):
  """``(params, x, t) -> (Dense outputs, logits with task t's head)``."""
  backbone = zoo.Backbone(model.width, model.depth)
  head = nn.Dense(model.num_classes)

  def outputs(bb, x, t):
    feats, state = backbone.apply({'params': bb}, x,
                                  capture_intermediates=True,
                                  mutable=['intermediates'])
    h = jax.tree.map(lambda a: a[t], heads)
    return state['intermediates'], head.apply({'params': h}, feats)

  return outputs


def _fit_adamerging(d, model, base, fts, heads, tasks):
  loss, batches = _unlabeled_entropy(d, model, heads, tasks)
  res = mj.methods.fit_adamerging(loss, base, fts, batches,
                                  granularity=d.granularity, init=d.init,
                                  steps=d.steps, learning_rate=d.learning_rate)
  return res.coefficients


def _surgery(entry, chosen, model, fts, tasks, ev, key):
  """The ``surgery`` protocol: adapters fitted on an earlier row's merge.

  `mergejax.methods.fit_surgery` pulls the backbone features of the merge
  named by ``entry.inner.name`` (at its selected setting) towards each
  fine-tune's own features on the first ``entry.data.examples`` unlabeled
  validation inputs of each task; every task then reads its features
  through its adapter. Returns ``(val, test, notes)`` as one setting.
  """
  inner, d = entry.inner.name, entry.data
  if inner not in chosen:
    raise ValueError(f'surgery on {inner!r} needs that method to run first '
                     '(earlier in methods_to_run, without errors).')
  bb = chosen[inner]
  xs = jnp.stack([jnp.asarray(t.val.x[:d.examples], jnp.float32)
                  for t in tasks])
  batches = [xs[:, j:j + d.batch_size]
             for j in range(0, xs.shape[1] - d.batch_size + 1, d.batch_size)]
  res = mj.methods.fit_surgery(_backbone_features(model), bb, list(fts),
                               batches, key=key, hidden=d.hidden,
                               steps=d.steps, learning_rate=d.learning_rate)
  val = ev.surgery_accuracies(bb, res.down, res.up, 'val')
  test = ev.surgery_accuracies(bb, res.down, res.up, 'test')
  notes = [f'adapters on {inner} (its selected setting); L1 feature gap '
           f'{res.losses[0]:.3f} -> {res.losses[-1]:.3f}']
  return np.asarray([val.mean()]), test[None], notes


@functools.lru_cache(maxsize=None)
def _backbone_features(model):
  backbone = zoo.Backbone(model.width, model.depth)
  return lambda p, x: backbone.apply({'params': p}, x)


@functools.lru_cache(maxsize=None)
def _classifier_logits(model):
  # One function object per model: the statistics steps compile once.
  return lambda p, x: model.apply({'params': p}, x)


@functools.lru_cache(maxsize=None)
def _backbone_inputs(model):
  return mj.stats.linen_dense_inputs(zoo.Backbone(model.width, model.depth))


def merge_method(name: str, entry, base, fts: list, key: jax.Array, *,
                 adapters: list | None = None, data: dict | None = None,
                 population: dict[str, list[float]] | None = None):
  """Merges with one method entry.

  With a sweep, the merge runs as one ``jax.vmap``-ped call over the swept
  hyperparameter (one compilation); otherwise once. ``population`` replaces
  the sweep with candidates of several hyperparameters at once (equal-length
  value lists, candidate ``i`` takes the ``i``-th value of each), vmapped
  together the same way (the tuning protocol). The factory is
  ``mergejax.methods.<entry.factory>`` if the entry names one, else
  ``mergejax.methods.<name>``. The ``lora`` protocol merges the LoRA zoo
  ``adapters`` (derived with `lora_zoo` at ``entry.lora_rank`` when None): a
  LoRA factor merge (``lora_svd``, ``lora_lego``) runs on the factor pairs via
  `mergejax.transforms.merge_lora` and its merged adapter is added to the base; any other
  method merges the rank-r fine-tunes ``theta_0 + a_i b_i``.

  Returns:
    ``(backbones, sweep, notes)``: ``backbones`` has a leading axis S (the
    grid, or 1), and for the ``per_task`` protocol a second axis K (task i's
    rebuilt model); ``sweep`` is ``(name, values)`` or None.
  """
  factory = getattr(mj.methods, entry.get('factory', name))
  notes = []
  kwargs = entry.kwargs.to_dict()
  sweep = entry.sweep.to_dict() if population is None else dict(population)
  if len(sweep) > 1 and population is None:
    raise ValueError(f'{name}: sweep one hyperparameter at a time, got '
                     f'{sorted(sweep)}.')
  if 'inner' in entry:
    inner = entry.inner
    kwargs[inner.arg] = getattr(mj.methods, inner.name)(**inner.kwargs.to_dict())
  for n in sweep:  # a swept or tuned value replaces the configured one
    kwargs.pop(n, None)
  ok = _accepted(factory, list(kwargs) + list(sweep) + ['weight'])
  for n in [n for n in kwargs if n not in ok]:
    notes.append(f'{name}() takes no {n!r}; dropped')
    kwargs.pop(n)
  for n in [n for n in sweep if n not in ok]:
    notes.append(f'{name}() takes no {n!r}; not swept')
    sweep.pop(n)

  protocol = entry.protocol
  if protocol not in PROTOCOLS:
    raise ValueError(f'{name}: protocol {protocol!r} is not one of '
                     f'{PROTOCOLS}.')
  if protocol == 'fold':
    if sweep:
      raise ValueError(f'{name}: the fold protocol has no sweep.')
    m = fts[0]
    for i, ft in enumerate(fts[1:], start=2):
      kw = dict(kwargs, weight=[float(i - 1), 1.0]) if 'weight' in ok else kwargs
      m = mj.merge(factory(**kw), base, [m, ft], key=jax.random.fold_in(key, i))
    return _stack([m]), None, notes
  if protocol in ('models', 'per_task'):
    b, models = base, fts
  elif protocol == 'no_base':
    b, models = None, fts
  elif protocol == 'data':  # full-weight merges ignore the base
    b, models = base, fts
    kwargs.update(data or {})
  elif protocol == 'lora':
    b = base
    if adapters is None:
      adapters = lora_zoo(base, fts, entry.lora_rank)
    if not _is_lora_method(factory):
      models = [jax.tree.map(jnp.add, base, mj.transforms.lora_delta(ad))
                for ad in adapters]
  else:  # sum_endpoint
    b = base
    models = [jax.tree.map(lambda x0, *xs: x0 + sum(x - x0 for x in xs),
                           base, *fts)]

  def one(**hp):
    tx = factory(**kwargs, **hp)
    if protocol == 'lora' and _is_lora_method(factory):
      merged = mj.transforms.lora_delta(mj.transforms.merge_lora(tx, adapters, key=key))
      return jax.tree.map(lambda x0, d: (x0 + d).astype(x0.dtype), b, merged)
    if protocol != 'per_task':
      return mj.merge(tx, b, models, key=key)
    _, state = mj.merge(tx, b, models, key=key, return_state=True)
    return _stack([mj.methods.reconstruct(state, b, i)
                   for i in range(len(models))])

  if not sweep:
    return _stack([one()]), None, notes
  grid = {n: [float(v) for v in vs] for n, vs in sweep.items()}
  sizes = {len(vs) for vs in grid.values()}
  if len(sizes) != 1:
    raise ValueError(f'{name}: population value lists differ in length: '
                     f'{ {n: len(v) for n, v in grid.items()} }.')
  try:
    out = jax.vmap(lambda hp: one(**hp))(
        {n: jnp.asarray(vs, jnp.float32) for n, vs in grid.items()})
  except (jax.errors.ConcretizationTypeError,
          jax.errors.TracerBoolConversionError) as e:
    # A factory that branches in Python on a numeric hyperparameter breaks
    # the contract; still report it, one merge per value.
    notes.append(f'{", ".join(grid)} not traceable in {name} '
                 f'({type(e).__name__}); swept with a Python loop')
    out = _stack([one(**{n: vs[i] for n, vs in grid.items()})
                  for i in range(sizes.pop())])
  if population is not None:
    return out, (tuple(grid), grid), notes
  (pname, values), = grid.items()
  return out, (pname, values), notes


def _evaluate(protocol, bbs, ev):
  """``(val [S], test [S, K])``: mean validation and per-task test accuracy
  of S merges (for ``per_task``, task i read through its own rebuilt model)."""
  if protocol == 'per_task':
    s_ = jax.tree.leaves(bbs)[0].shape[0]
    per = [jax.tree.map(lambda x, i=i: x[i], bbs) for i in range(s_)]
    val = np.stack([ev.own_task_accuracies(p, 'val') for p in per])
    test = np.stack([ev.own_task_accuracies(p, 'test') for p in per])
    return val.mean(axis=1), test
  return ev.accuracies(bbs, 'val').mean(axis=1), ev.accuracies(bbs, 'test')


# Protocols whose merges the tuning protocol can re-run over a population.
TUNABLE = ('models', 'no_base', 'sum_endpoint', 'lora', 'per_task')


def tuning_candidates(name: str, entry, default: dict[str, float],
                      budget: int, key: jax.Array) -> dict[str, list[float]]:
  """The tuning protocol's candidates for one method entry.

  ``budget`` candidates over every hyperparameter in ``entry.tune``
  (``{name: (low, high, 'linear' | 'log')}``): the first is the method's
  default setting (``default``: its configured keyword arguments and the
  value its sweep chose), the others are drawn uniformly (or log-uniformly)
  in the ranges with ``key``. Every method gets the same budget, whatever
  the number of its hyperparameters.
  """
  space = entry.tune.to_dict()
  missing = [n for n in space if n not in default]
  if missing:
    raise ValueError(f'{name}: no default value for tuned {missing}; set '
                     'them in the entry\'s kwargs or sweep.')
  out = {}
  for i, (pname, (low, high, scale)) in enumerate(sorted(space.items())):
    if scale not in ('linear', 'log') or not high > low:
      raise ValueError(f'{name}.tune.{pname}: expected (low, high, '
                       f"'linear' | 'log') with low < high, got "
                       f'{(low, high, scale)!r}.')
    u = np.asarray(jax.random.uniform(jax.random.fold_in(key, i),
                                      (budget - 1,)), np.float64)
    draws = (np.exp(np.log(low) + u * (np.log(high) - np.log(low)))
             if scale == 'log' else low + u * (high - low))
    out[pname] = [float(default[pname])] + [round(float(v), 6) for v in draws]
  return out


def _tune(name, entry, rec, default_val, budget, seed, base, fts, key, ads,
          ev, ft_acc, names, *, strict=False):
  """The tuned record of one method: its best of `tuning_candidates` on the
  validation split, reported on test (an error is recorded, not raised)."""
  t0 = time.perf_counter()
  factory = getattr(mj.methods, entry.get('factory', name))
  default = {n: p.default for n, p in inspect.signature(factory)
             .parameters.items() if isinstance(p.default, (int, float))
             and not isinstance(p.default, bool)}
  default.update({n: v for n, v in rec['kwargs'].items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool)})
  default.update(rec.get('selected', {}))
  try:
    cands = tuning_candidates(name, entry, default, budget, jax.random.fold_in(
        jax.random.key(seed), zlib.crc32(name.encode())))
    bbs, _, _ = merge_method(name, entry, base, fts, key, adapters=ads,
                             population=cands)
    val, test = _evaluate(entry.protocol, bbs, ev)
  except Exception as e:  # pylint: disable=broad-except
    if strict:
      raise
    print(f'  ERROR tuning {name}: {type(e).__name__}: {str(e)[:300]}',
          flush=True)
    return dict(status='error', error=f'{type(e).__name__}: {e}')
  best = int(np.argmax(val))  # the default setting (candidate 0) on ties
  out = dict(status='ok', budget=budget, **_row(test[best], ft_acc, names),
             selected={n: v[best] for n, v in cands.items()},
             val_avg_accuracy=float(val[best]),
             default_val_avg_accuracy=default_val,
             seconds=time.perf_counter() - t0)
  print(f'  {name + " (tuned)":<18} avg acc {out["avg_accuracy"]:.3f}  '
        f'normalized {out["avg_normalized"]:.3f}  '
        + ', '.join(f'{k}={v:.3g}' for k, v in out['selected'].items())
        + f'  ({budget} candidates, {out["seconds"]:.1f}s)', flush=True)
  return out


def _routed(name, entry, base, fts, tasks, heads, config, key):
  """The ``routed`` protocol: a twin merge evaluated with a trained router."""
  from experiments import twin_routed  # pylint: disable=g-import-not-at-top
  factory = getattr(mj.methods, entry.get('factory', name))
  shared, state = mj.merge(factory(**entry.kwargs.to_dict()), base, fts,
                           key=key, return_state=True)
  r = entry.router.to_dict() if 'router' in entry else {}
  out = twin_routed.evaluate(shared, state, tasks, heads,
                             depth=config.zoo.depth,
                             key=jax.random.fold_in(key, 1), **r)
  notes = [f"router trained on {r.get('per_task', 32)} inputs per task; "
           f"router task accuracy on test {out['router_accuracy']['test']:.3f}"]
  extra = dict(router=dict(settings=r, accuracy=out['router_accuracy']),
               oracle_test=out['oracle_test'])
  return out['val'], out['test'], notes, extra


def _row(acc, ft_acc, names):
  acc = np.asarray(acc, np.float64)
  return dict(accuracy={n: float(a) for n, a in zip(names, acc)},
              avg_accuracy=float(acc.mean()),
              avg_normalized=float(zoo.normalized(acc, ft_acc).mean()))


def _setting(rec) -> str:
  """Fixed settings (e.g. ``lora_rank``), then the validation-chosen value."""
  items = {**rec.get('setting', {}), **rec.get('selected', {})}
  return ', '.join(f'{k}={v:g}' for k, v in items.items())


def _fmt_table(rows: list[tuple[str, str, dict]], names) -> str:
  short = [n[:7] for n in names]
  lw = max([22] + [len(label) + 2 for label, _, _ in rows])
  sw = max([16] + [len(s) + 2 for _, s, r in rows if r is not None])
  head = (f'{"model":<{lw}}{"setting":<{sw}}'
          + ''.join(f'{s:>8}' for s in short) + f'{"avg":>8}{"norm":>8}')
  lines = [head, '-' * len(head)]
  for label, setting, r in rows:
    if r is None:
      lines.append(f'{label:<{lw}}{setting}')
      continue
    accs = ''.join(f'{r["accuracy"][n]:>8.3f}' for n in names)
    lines.append(f'{label:<{lw}}{setting:<{sw}}{accs}'
                 f'{r["avg_accuracy"]:>8.3f}{r["avg_normalized"]:>8.3f}')
  return '\n'.join(lines)


def _plot(path: str, methods: dict, baselines: dict):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  ok = [(n, r['avg_normalized']) for n, r in methods.items()
        if r['status'] == 'ok']
  fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(ok) + 2.0), 4.0))
  xs = np.arange(len(ok))
  ax.bar(xs, [v for _, v in ok], color='tab:blue')
  ax.set_xticks(xs, [n for n, _ in ok], rotation=60, ha='right')
  for label, key, style in (('base model', 'base', 'tab:red'),
                            ('base backbone + task heads',
                             'base_backbone_task_heads', 'tab:orange')):
    ax.axhline(baselines[key]['avg_normalized'], color=style, ls='--',
               label=label)
  ax.axhline(0.8, color='gray', ls=':', label='80% of fine-tuned')
  ax.axhline(1.0, color='black', lw=0.8, label='fine-tuned')
  ax.set_ylabel('avg normalized accuracy (test)')
  ax.set_title('Merging the digits zoo: backbone merged, task heads kept')
  ax.set_ylim(0, 1.1)
  ax.legend(loc='upper left', bbox_to_anchor=(1.0, 1.0), fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _jsonable(x):
  if isinstance(x, (tuple, list)):
    return [_jsonable(v) for v in x]
  if isinstance(x, dict):
    return {k: _jsonable(v) for k, v in x.items()}
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  return x


def blas_threads(threads: int | None):
  """Limits the host BLAS/LAPACK threads (``threadpoolctl``; None: no limit).

  XLA's CPU SVD, QR and eigh call the LAPACK of scipy's OpenBLAS, whose worker
  threads spin between calls. On a shared 2-core machine with other jobs
  running this made a 512x512 SVD ~45x slower (8 SVDs: 21.9 s with the
  default 2 threads, 0.5 s with 1), and with it every SVD-based merge.
  """
  if threads is None:
    return contextlib.nullcontext()
  try:
    import threadpoolctl  # pylint: disable=g-import-not-at-top
  except ImportError:  # optional (scikit-learn depends on it)
    return contextlib.nullcontext()
  return threadpoolctl.threadpool_limits(limits=int(threads), user_api='blas')


def main(config, workdir: str) -> dict[str, Any]:
  """Runs the experiment; returns (and writes) the results dictionary."""
  with blas_threads(config.get('blas_threads', None)):
    return _main(config, workdir)


def _main(config, workdir: str) -> dict[str, Any]:
  t_start = time.perf_counter()
  provenance = results_lib.provenance()  # the load before this run adds to it
  os.makedirs(workdir, exist_ok=True)
  digits, tasks, model, z, zoo_info = build_zoo(config, workdir)
  del digits
  names = [t.name for t in tasks]

  sub = config.merge.params
  heads = z.finetuned['head']
  ev = zoo.TaskEvaluator(model, tasks, heads)
  base_bb = z.base[sub]
  ft_bbs = [jax.tree.map(lambda x, i=i: x[i], z.finetuned[sub])
            for i in range(len(names))]

  # Baselines.
  ft_matrix = ev.accuracies(z.finetuned[sub], 'test')  # [K models, K tasks]
  ft_acc = np.diag(ft_matrix)
  base_heads = jax.tree.map(lambda h: jnp.broadcast_to(h, (len(names),) +
                                                       h.shape), z.base['head'])
  one_base = jax.tree.map(lambda x: x[None], base_bb)
  baselines = {
      'base': _row(ev.accuracies(one_base, 'test', heads=base_heads)[0],
                   ft_acc, names),
      'base_backbone_task_heads': _row(ev.accuracies(one_base, 'test')[0],
                                       ft_acc, names),
      'finetuned': _row(ft_acc, ft_acc, names),
  }
  for i, n in enumerate(names):
    baselines[f'finetune/{n}'] = _row(ft_matrix[i], ft_acc, names)

  # Merges.
  order = [m.strip() for m in config.methods_to_run.split(',') if m.strip()]
  order = order or sorted(config.methods)
  unknown = [m for m in order if m not in config.methods]
  if unknown:
    raise ValueError(f'methods_to_run names {unknown}, which have no entry in '
                     f'config.methods; valid: {sorted(config.methods)}.')
  merge_key = jax.random.fold_in(jax.random.key(config.seed), 1)
  methods = {}
  loras = {}  # LoRA zoos by rank, derived once for all 'lora' entries

  def get_lora_zoo(rank):
    if rank not in loras:
      t0 = time.perf_counter()
      ads = jax.block_until_ready(lora_zoo(base_bb, ft_bbs, rank))
      seconds = time.perf_counter() - t0
      # What the truncation costs: the relative Frobenius error of each task
      # vector's matrices, and the rank-r fine-tunes on their own tasks.
      rel = {}
      for ad, ft in zip(ads, ft_bbs):
        tau = jax.tree.map(jnp.subtract, ft, base_bb)
        for p, t, d in zip(mj.leaf_paths(tau), jax.tree.leaves(tau),
                           jax.tree.leaves(mj.transforms.lora_delta(ad))):
          if t.ndim == 2:  # the factorised leaves
            rel.setdefault(p, []).append(
                float(jnp.linalg.norm(t - d) / jnp.linalg.norm(t)))
      rel = {p: float(np.mean(v)) for p, v in rel.items()}
      lora_fts = _stack([jax.tree.map(jnp.add, base_bb, mj.transforms.lora_delta(ad))
                         for ad in ads])
      own = ev.own_task_accuracies(lora_fts, 'test')
      loras[rank] = (ads, dict(rank=rank, seconds=seconds,
                               relative_error=rel,
                               finetuned=_row(own, ft_acc, names)))
      print(f'  LoRA zoo: rank-{rank} truncated SVD of every task vector '
            f'matrix in {seconds:.1f}s; the rank-{rank} fine-tunes reach '
            f'{own.mean():.3f} on their own tasks (dense {ft_acc.mean():.3f});'
            ' mean relative error of the task vectors: '
            + ', '.join(f'{p} {e:.3f}' for p, e in rel.items()), flush=True)
    return loras[rank][0]

  chosen = {}  # each merge's backbone at its selected setting
  for name in order:
    entry = config.methods[name]
    fname = entry.get('factory', name)
    rec = dict(protocol=entry.protocol, kwargs=entry.kwargs.to_dict())
    if fname != name:
      rec['factory'] = fname
    if entry.protocol == 'lora':
      rec['setting'] = dict(lora_rank=entry.lora_rank)
    if not hasattr(mj.methods, fname) or entry.protocol == 'not_applicable':
      why = ('not applicable to this zoo' if hasattr(mj.methods, fname) else
             f'mergejax.methods has no {fname!r} yet')
      rec.update(status='skipped', note=why)
      print(f'  skip {name}: {why}', flush=True)
      methods[name] = rec
      continue
    t0 = time.perf_counter()
    oracle = None
    try:
      key = jax.random.fold_in(merge_key, zlib.crc32(name.encode()))
      if entry.protocol not in ('routed', 'surgery'):
        ads = (get_lora_zoo(entry.lora_rank) if entry.protocol == 'lora'
               else None)
        data = (data_statistics(entry, model, sub, base_bb, ft_bbs, heads,
                                tasks, z.second_moments)
                if entry.protocol == 'data' else None)
        bbs, sweep, notes = merge_method(name, entry, base_bb, ft_bbs, key,
                                         adapters=ads, data=data)
      if entry.protocol == 'surgery':  # adapters on an earlier row's merge
        val, test, notes = _surgery(entry, chosen, model, ft_bbs, tasks, ev,
                                    key)
        sweep = None
      elif entry.protocol == 'routed':  # Twin-Merging with a trained router
        val, test, notes, extra = _routed(name, entry, base_bb, ft_bbs, tasks,
                                          heads, config, key)
        rec['router'] = extra['router']
        oracle = dict(protocol='per_task', status='ok',
                      note='oracle router (one-hot weights)',
                      **_row(extra['oracle_test'], ft_acc, names))
        val, test = np.asarray([val.mean()]), test[None]
        sweep = None
      else:
        val, test = _evaluate(entry.protocol, bbs, ev)
      best = int(np.argmax(val))  # first best: the smallest value on ties
      rec.update(status='ok', **_row(test[best], ft_acc, names))
      if entry.protocol not in ('per_task', 'routed', 'surgery'):
        chosen[name] = jax.tree.map(lambda x, b=best: x[b], bbs)
      if sweep is not None:
        pname, values = sweep
        rec['selected'] = {pname: values[best]}
        rec['sweep'] = dict(param=pname, values=values,
                            val_avg_accuracy=val.tolist(),
                            test_avg_accuracy=test.mean(axis=1).tolist())
      if notes:
        rec['note'] = '; '.join(notes)
      budget = config.tuning.budget
      if budget and 'tune' in entry and entry.protocol in TUNABLE:
        rec['tuned'] = _tune(name, entry, rec, float(val[best]), budget,
                             config.tuning.seed, base_bb, ft_bbs, key, ads,
                             ev, ft_acc, names, strict=config.strict)
    except Exception as e:  # pylint: disable=broad-except
      if config.strict:
        raise
      rec.update(status='error', error=f'{type(e).__name__}: {e}',
                 traceback=traceback.format_exc(limit=6))
      print(f'  ERROR {name}: {type(e).__name__}: {str(e)[:300]}', flush=True)
    rec['seconds'] = time.perf_counter() - t0
    if rec['status'] == 'ok':
      sel = _setting(rec)
      print(f'  {name:<18} avg acc {rec["avg_accuracy"]:.3f}  normalized '
            f'{rec["avg_normalized"]:.3f}  {sel}  ({rec["seconds"]:.1f}s)'
            + (f'  [{rec["note"]}]' if 'note' in rec else ''), flush=True)
    methods[name] = rec
    if oracle is not None:
      methods[f'{name}_oracle'] = oracle

  # Summary, table, files.
  ok = {n: r for n, r in methods.items() if r['status'] == 'ok'}
  base_avg = baselines['base']['avg_accuracy']
  ft_avg = baselines['finetuned']['avg_accuracy']
  best = max(ok, key=lambda n: ok[n]['avg_accuracy']) if ok else None
  summary = dict(
      base_avg_accuracy=base_avg,
      base_backbone_task_heads_avg_accuracy=baselines[
          'base_backbone_task_heads']['avg_accuracy'],
      finetuned_avg_accuracy=ft_avg,
      best_method=best,
      best_avg_accuracy=ok[best]['avg_accuracy'] if best else None,
      best_over_finetuned=(ok[best]['avg_accuracy'] / ft_avg) if best else None,
      all_merges_beat_base=all(r['avg_accuracy'] > base_avg
                               for r in ok.values()),
      merges_below_base=sorted(n for n, r in ok.items()
                               if r['avg_accuracy'] <= base_avg),
      methods_ok=sorted(ok),
      # The tuning protocol's results (every hyperparameter chosen on
      # validation within the same budget per method).
      tuned_avg_accuracy={n: r['tuned']['avg_accuracy'] for n, r in ok.items()
                          if r.get('tuned', {}).get('status') == 'ok'},
      skipped=[n for n, r in methods.items() if r['status'] == 'skipped'],
      errors=[n for n, r in methods.items() if r['status'] == 'error'],
  )
  rows = [('base model', 'own head', baselines['base']),
          ('base backbone', 'task heads', baselines['base_backbone_task_heads'])]
  rows += [(f'fine-tune {n}', 'task heads', baselines[f'finetune/{n}'])
           for n in names]
  rows += [('fine-tuned (own task)', '', baselines['finetuned'])]
  for rank, (_, info) in loras.items():
    baselines[f'finetuned_lora{rank}'] = info['finetuned']
    rows.append((f'fine-tuned rank {rank}', 'own task', info['finetuned']))
  for n, r in methods.items():
    if r['status'] == 'ok':
      rows.append((n, _setting(r) or '-', r))
      t = r.get('tuned')
      if t and t['status'] == 'ok':
        rows.append((f'{n} (tuned)', ', '.join(
            f'{k}={v:.3g}' for k, v in t['selected'].items()), t))
    else:
      rows.append((n, f'({r["status"]})', None))
  table = _fmt_table(rows, names)
  total = time.perf_counter() - t_start
  results = dict(
      experiment='default', workdir=os.path.abspath(workdir),
      config=_jsonable(config.to_dict()), tasks=names,
      zoo=dict(hash=zoo_hash(config), **zoo_info,
               backbone_params=int(sum(x.size for x in
                                       jax.tree.leaves(base_bb)))),
      lora_zoo={str(rank): {k: v for k, v in info.items() if k != 'finetuned'}
                for rank, (_, info) in loras.items()},
      baselines=baselines, methods=methods, summary=summary, table=table,
      seconds=dict(total=total, zoo=zoo_info['seconds'],
                   merges=sum(r.get('seconds', 0.0) for r in methods.values())),
      jax=dict(version=jax.__version__, backend=jax.default_backend()),
      provenance=provenance)
  print('\nTest accuracy per task (merged backbone + each task\'s fine-tuned '
        'head); norm = mean of acc / fine-tuned acc\n' + table, flush=True)
  print(f'\nbase avg {base_avg:.3f} | fine-tuned avg {ft_avg:.3f} | best merge '
        f'{best} {summary["best_avg_accuracy"] or float("nan"):.3f} '
        f'({(summary["best_over_finetuned"] or float("nan")):.1%} of '
        f'fine-tuned) | every merge beats base: '
        f'{summary["all_merges_beat_base"]}')
  if summary['skipped']:
    print(f'skipped (not in mergejax.methods yet, or not applicable): '
          f'{summary["skipped"]}')
  if summary['errors']:
    print(f'errors (see results.json): {summary["errors"]}')
  tmp = os.path.join(workdir, 'results.json.tmp')
  with open(tmp, 'w') as f:
    json.dump(results, f, indent=1, default=str)
  os.replace(tmp, os.path.join(workdir, 'results.json'))
  _plot(os.path.join(workdir, 'results.png'), methods, baselines)
  results_lib.write_page(results, os.path.join(workdir, 'results.md'),
                         title='Default experiment: merging a digits model zoo')
  print(f'wrote {os.path.join(workdir, "results.json")}, results.md and '
        f'results.png in {total:.1f}s total')
  return results

