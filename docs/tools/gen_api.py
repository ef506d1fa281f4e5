"""Writes docs/api/*.md from each public namespace's ``__all__``.

Run from the repository root after changing a public API:

  python docs/tools/gen_api.py

`tests/test_docs.py` fails when a page is out of date.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

# (page, namespace, title, one-line description).
PAGES = (
    ('core', 'mergejax', 'Core',
     'The contract (`MergeTransformation`), its combinators and `merge`.'),
    ('transforms', 'mergejax.transforms', 'Building blocks',
     'Primitives that named methods compose: task vectors, top-k selection, '
     'sparsifiers, sign consensus, interpolation, subspaces, masks, LoRA.'),
    ('methods', 'mergejax.methods', 'Methods',
     'Named merge methods (one page each under '
     '[Methods](../methods/index.md)).'),
    ('stats', 'mergejax.stats', 'Statistics',
     'Fisher information and input Gram matrices for data-informed merges.'),
    ('permute', 'mergejax.permute', 'Permutations',
     'Permutation alignment: specs, weight and activation matching, PLeaS, '
     'REPAIR, barriers.'),
    ('parallel', 'mergejax.parallel', 'Parallel execution',
     'Device meshes, multi-host runs and streamed checkpoints.'),
    ('search', 'mergejax.search', 'Search',
     'Populations of merge candidates scored in one compiled call; '
     'evolutionary search over merge hyperparameters; MAP surrogates and '
     'Pareto fronts; M2N2 archives evolved by merging.'),
    ('io', 'mergejax.io', 'Checkpoint IO',
     'Hugging Face safetensors (sharded, lazy, atomic), orbax and layouts.'),
    ('cli', 'mergejax.cli', 'Command line',
     'The `mergejax` command and its mergekit-YAML front end.'),
    ('testing', 'mergejax.testing', 'Testing helpers',
     'Small model zoos, tree closeness and compile counting for tests.'),
    ('experiments', 'experiments.tools', 'Experiment tools',
     'Sweeps, plots and progress lines of the repository checkout (not '
     'installed with the package).'),
)

_EXPERIMENT_MODULES = ('experiments.tools.sweep', 'experiments.tools.plotting')


def _names(namespace: str) -> list[str]:
  if namespace == 'experiments.tools':
    out = []
    for m in _EXPERIMENT_MODULES:
      mod = importlib.import_module(m)
      seen = set()  # an alias (zip_sweep = zip_) is documented once
      for n in mod.__all__:
        if id(getattr(mod, n)) not in seen:
          seen.add(id(getattr(mod, n)))
          out.append(f'{m}.{n}')
    return out
  mod = importlib.import_module(namespace)
  return [f'{namespace}.{n}' for n in sorted(mod.__all__, key=str.lower)
          if not inspect.ismodule(getattr(mod, n))]


def render(page: str) -> str:
  _, namespace, title, text = next(p for p in PAGES if p[0] == page)
  body = [f'# {title}: `{namespace}`', '', text, '']
  for name in _names(namespace):
    body += [f'::: {name}', '']
  return '\n'.join(body)


def main() -> None:
  sys.path.insert(0, ROOT)
  for page, *_ in PAGES:
    path = os.path.join(ROOT, 'docs', 'api', f'{page}.md')
    with open(path, 'w') as f:
      f.write(render(page))
    print('wrote', os.path.relpath(path, ROOT))


if __name__ == '__main__':
  main()
