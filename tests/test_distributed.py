"""Two processes on localhost (jax.distributed + gloo) == one process.

Run as a script, this file is the worker: it joins the runtime through
`mergejax.parallel.initialize` (coordinator from the environment, set by
`launch_local`), runs sharded merges on a 2 x 2 (models x fsdp) mesh spanning
both processes (2 CPU devices each), gathers the results and saves them.
"""

import os
import sys

import numpy as np

# Methods run across processes, when they exist at test time: a plain
# reduction, a top-k threshold (histograms all-reduced across hosts), random
# masks (the same bits whatever the layout) and an iterative mean.
METHODS = (('task_arithmetic', dict(weight=[1., 2., 3., 4.], lambda_=0.5)),
           ('ties', dict(density=0.3)),
           ('dare_ties', dict(density=0.5)),
           ('karcher', {}))


def _zoo(k=4):
  shapes = {'embed': (32, 8), 'layers/0/w': (8, 12), 'layers/0/norm': (8,),
            'odd': (3, 5)}
  from mergejax import testing  # pylint: disable=g-import-not-at-top
  return testing.random_models(shapes, k, nested=False, as_numpy=True)


def _available(mj):
  return [(n, kw) for n, kw in METHODS if hasattr(mj.methods, n)]


def _worker(out_dir):
  from mergejax import parallel  # pylint: disable=g-import-not-at-top
  parallel.initialize(local_device_count=2)
  import jax  # pylint: disable=g-import-not-at-top
  import mergejax as mj  # pylint: disable=g-import-not-at-top
  assert jax.process_count() == 2 and jax.device_count() == 4
  mesh = mj.parallel.make_mesh((2, 2))
  base, models = _zoo()
  for name, kw in _available(mj):
    out = mj.parallel.sharded_merge(getattr(mj.methods, name)(**kw), base, models,
                           key=jax.random.key(0), mesh=mesh)
    assert not out['embed'].is_fully_addressable  # really spans both hosts
    host = parallel.gather(out)
    np.savez(os.path.join(out_dir, f'{name}_{jax.process_index()}.npz'),
             **{k.replace('/', '|'): v for k, v in host.items()})
  parallel.sync('done')
  parallel.shutdown()


def test_two_process_merge_equals_single_process(tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  import mergejax as mj  # pylint: disable=g-import-not-at-top
  results = mj.parallel.launch_local([__file__, str(tmp_path)], 2,
                                        timeout=300)
  for i, r in enumerate(results):
    assert r.returncode == 0, f'process {i} failed:\n{r.stderr[-3000:]}'
  base, models = _zoo()
  methods = _available(mj)
  assert methods and methods[0][0] == 'task_arithmetic'
  for name, kw in methods:
    ref = mj.merge(getattr(mj.methods, name)(**kw), base, models,
                   key=jax.random.key(0))
    for pid in range(2):
      got = np.load(tmp_path / f'{name}_{pid}.npz')
      for p, r in ref.items():
        np.testing.assert_allclose(got[p.replace('/', '|')], np.asarray(r),
                                   rtol=2e-5, atol=2e-5,
                                   err_msg=f'{name} {p} process {pid}')


def test_initialize_single_process_is_a_noop(monkeypatch):
  import mergejax as mj  # pylint: disable=g-import-not-at-top
  for v in ('MERGEJAX_COORDINATOR', 'MERGEJAX_NUM_PROCESSES',
            'MERGEJAX_PROCESS_ID'):
    monkeypatch.delenv(v, raising=False)
  mj.parallel.initialize(cpu_collectives=None)
  assert not mj.parallel.is_initialized()
  assert mj.parallel.is_coordinator()
  import pytest  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match='outside'):
    mj.parallel.initialize('localhost:1', num_processes=2, process_id=2,
                              cpu_collectives=None)


if __name__ == '__main__':
  _worker(sys.argv[1])
