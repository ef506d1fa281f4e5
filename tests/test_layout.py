"""The package's layering and public API (see docs/design.md).

Layers, bottom up: core (``mergejax/_src``) -> building blocks
(``transforms``) -> named methods (``methods``) -> alignment, execution and IO
(``permute``, ``io``, ``parallel``) -> search (``search``) -> front ends
(``cli``, the top-level namespace). A module may import its own layer and the layers its row allows.
"""

import ast
import difflib
import importlib
import inspect
import json
import pathlib
import re
import warnings

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / 'mergejax'

# Which subpackages each subpackage may import ('core' is mergejax/_src).
ALLOWED = {
    'core': {'core'},
    'transforms': {'core'},
    'methods': {'core', 'transforms', 'stats'},
    'permute': {'core', 'transforms'},
    'stats': {'core'},
    'io': {'core'},
    'parallel': {'core', 'transforms', 'io'},
    'search': {'core', 'transforms', 'methods', 'stats', 'parallel', 'io'},
    'testing': {'core'},
    'cli': {'core', 'transforms', 'methods', 'io', 'parallel', 'permute',
            'stats', 'top'},
    'top': {'core', 'transforms', 'methods', 'io', 'parallel', 'permute',
            'stats', 'search', 'cli', 'testing'},
    'shims': {'parallel'},
}

# Inside `methods`, modules share `_common` (the task-arithmetic frame and
# task rebuilds); the Twin router extends the Twin merge and DAM the Concrete
# mask (FusionBench's Safe Concrete): one family each.
SAME_FAMILY = {('mergejax.methods._twin_router', 'mergejax.methods._twin'),
               ('mergejax.methods._dam', 'mergejax.methods._concrete'),
               # Expert Merging learns AdaMerging's layer-wise coefficients;
               # Concrete AdaMerging runs AdaMerging on the masked vectors.
               ('mergejax.methods._expert_merging',
                'mergejax.methods._adamerging'),
               ('mergejax.methods._concrete', 'mergejax.methods._adamerging')}


def _layer(module: str) -> str:
  parts = module.split('.')
  if len(parts) == 1:
    return 'top'
  if parts[1] == '_src':
    return 'core'
  if parts[1] in ('sharding', 'distributed'):
    return 'shims'
  return parts[1]


def _module_name(path: pathlib.Path) -> str:
  rel = path.relative_to(ROOT).with_suffix('')
  parts = list(rel.parts)
  if parts[-1] == '__init__':
    parts.pop()
  return '.'.join(parts)


def _imports(path: pathlib.Path) -> list[str]:
  """Every module ``path`` imports (``from a import b`` gives ``a`` and ``a.b``)."""
  out = []
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      out += [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module:
      # `from pkg import mod` imports the module; `from mod import name` mod.
      subs = [f'{node.module}.{a.name}' for a in node.names]
      subs = [m for m in subs if _is_module(m)]
      out += subs or [node.module]
  return out


def _package_edges():
  edges = []
  for path in sorted(PACKAGE.rglob('*.py')):
    src = _module_name(path)
    for dst in _imports(path):
      if dst.startswith('mergejax.') or dst == 'mergejax':
        edges.append((src, dst))
  return edges


def _is_module(name: str) -> bool:
  rel = pathlib.Path(*name.split('.'))
  return ((ROOT / rel).with_suffix('.py').exists()
          or (ROOT / rel / '__init__.py').exists())


def test_no_import_goes_against_the_layering():
  bad = []
  for src, dst in _package_edges():
    a, b = _layer(src), _layer(dst)
    if a == b == 'methods':
      if not (src == 'mergejax.methods' or dst == 'mergejax.methods._common'
              or (src, dst) in SAME_FAMILY):
        bad.append(f'{src} -> {dst} (a method composes building blocks, '
                   'not another method)')
    elif a != b and b not in ALLOWED[a]:
      bad.append(f'{src} ({a}) -> {dst} ({b})')
  assert not bad, 'imports against the layering:\n' + '\n'.join(bad)


DESIGN = ROOT / 'docs' / 'design.md'
_GRAPH = re.compile(r'<!-- import-graph:start -->.*<!-- import-graph:end -->',
                    re.S)


def import_graph() -> str:
  """The layer-level import graph as a Markdown table (modules per arrow)."""
  counts = {}
  for src, dst in _package_edges():
    a, b = _layer(src), _layer(dst)
    if a != b and 'shims' not in (a, b):
      counts[(a, b)] = counts.get((a, b), 0) + 1
  order = ['top', 'cli', 'search', 'permute', 'parallel', 'io', 'testing',
           'methods', 'stats', 'transforms', 'core']
  rows = ['| from | imports (modules per arrow) |', '|---|---|']
  for a in order:
    outs = [f'{b} ({counts[(a, b)]})' for b in order if (a, b) in counts]
    if outs:
      rows.append(f'| {a} | {", ".join(outs)} |')
  return ('<!-- import-graph:start -->\n' + '\n'.join(rows) +
          '\n<!-- import-graph:end -->')


def test_design_doc_shows_the_current_import_graph():
  want = import_graph()
  got = _GRAPH.search(DESIGN.read_text())
  assert got and got.group(0) == want, (
      'docs/design.md\'s import graph is out of date; regenerate it with '
      '`python tests/test_layout.py`.\n' + want)


def test_building_blocks_never_import_methods():
  # The rule the layering test enforces, checked on its own so that a
  # violation reads plainly.
  offenders = [(s, d) for s, d in _package_edges()
               if _layer(s) == 'transforms' and _layer(d) == 'methods']
  assert not offenders


_PRIVATE_SRC = re.compile(r'\bmergejax\._src\b|\bmj\._src\b|from mergejax '
                          r'import _src\b')
# Outside the package, only the test suite and the white-box benchmarks of
# internal kernels (experiments/benchmarks) may import private modules of the
# subpackages (``mergejax.transforms._select``); nothing imports ``_src``.
_PRIVATE_ANY = re.compile(
    r'(from|import) mergejax(\.\w+)*\._\w+|from mergejax(\.\w+)* import _\w+')


def _outside_files():
  for pattern in ('tests/**/*.py', 'experiments/**/*.py', 'configs/**/*.py',
                  'colab/*.ipynb', 'docs/**/*.md', 'README.md'):
    yield from ROOT.glob(pattern)


def _code(path: pathlib.Path) -> str:
  if path.suffix == '.ipynb':
    cells = json.loads(path.read_text())['cells']
    return '\n'.join(''.join(c['source']) for c in cells
                     if c['cell_type'] == 'code')
  return path.read_text()


def test_nothing_outside_the_package_imports_src():
  this = pathlib.Path(__file__).resolve()
  bad = [str(p.relative_to(ROOT)) for p in _outside_files()
         if p.resolve() != this and _PRIVATE_SRC.search(_code(p))]
  assert not bad, f'these files reach into mergejax._src: {bad}'


def test_experiments_configs_and_notebooks_use_only_public_modules():
  bad = []
  for p in _outside_files():
    rel = p.relative_to(ROOT)
    if rel.parts[0] == 'tests' or rel.parts[:2] == ('experiments',
                                                     'benchmarks'):
      continue
    for m in _PRIVATE_ANY.finditer(_code(p)):
      bad.append(f'{rel}: {m.group(0)}')
  assert not bad, 'private imports:\n' + '\n'.join(bad)


# ---------------------------------------------------------------- public API

PUBLIC = ('mergejax', 'mergejax.transforms', 'mergejax.methods',
          'mergejax.stats',
          'mergejax.permute', 'mergejax.parallel', 'mergejax.io',
          'mergejax.cli', 'mergejax.testing')


def _public(namespace: str):
  mod = importlib.import_module(namespace)
  return {n: getattr(mod, n) for n in mod.__all__}


@pytest.mark.parametrize('namespace', PUBLIC)
def test_every_public_namespace_declares_all_and_exports_exist(namespace):
  mod = importlib.import_module(namespace)
  assert isinstance(mod.__all__, (list, tuple)) and mod.__all__
  assert len(set(mod.__all__)) == len(mod.__all__), 'duplicate in __all__'
  missing = [n for n in mod.__all__ if not hasattr(mod, n)]
  assert not missing


def test_every_public_module_declares_all():
  """Every importable module outside ``_``-private ones says what it exports."""
  import pkgutil  # pylint: disable=g-import-not-at-top
  import mergejax  # pylint: disable=g-import-not-at-top
  missing = []
  for info in pkgutil.walk_packages(mergejax.__path__, 'mergejax.'):
    if any(part.startswith('_') for part in info.name.split('.')):
      continue
    if not hasattr(importlib.import_module(info.name), '__all__'):
      missing.append(info.name)
  assert not missing, f'modules without __all__: {missing}'


def test_no_name_means_two_things():
  """A name exported by two namespaces must be the very same object."""
  seen = {}
  clashes = []
  for ns in PUBLIC:
    for name, obj in _public(ns).items():
      if inspect.ismodule(obj):
        continue
      if name in seen and seen[name][1] is not obj:
        clashes.append(f'{name}: {seen[name][0]} vs {ns}')
      seen.setdefault(name, (ns, obj))
  assert not clashes, 'one name, two meanings:\n' + '\n'.join(clashes)


_PAPER_METHODS = {
    # Named methods from a paper: their docstring cites it.
    name for name in importlib.import_module('mergejax.methods').__all__
    if name not in ('average', 'linear', 'reconstruct', 'nearswap',
                    'arcee_fusion', 'prediction_entropy', 'AdaMergingResult')}


API_LISTING = ROOT / 'docs' / 'api' / 'public.txt'


def api_listing() -> tuple[list[str], list[str]]:
  """``(lines, problems)``: one line per public name, ``[ref]`` if it cites."""
  lines, problems = [], []
  for ns in PUBLIC:
    for name, obj in sorted(_public(ns).items()):
      if inspect.ismodule(obj):
        lines.append(f'{ns}.{name}  (module)')
        continue
      doc = inspect.getdoc(obj) or ''
      ref = doc.split('References:')[1] if 'References:' in doc else ''
      cites = 'http' in ref
      lines.append(f'{ns}.{name}' + ('  [ref]' if cites else ''))
      if callable(obj) and not doc:
        problems.append(f'{ns}.{name}: no docstring')
      if ns == 'mergejax.methods' and name in _PAPER_METHODS and not cites:
        problems.append(f'{ns}.{name}: no References: section with a link')
  return lines, problems


def test_public_api_listing_and_references():
  """The public API matches docs/api/public.txt; paper methods cite papers.

  After an intended API change, regenerate the listing with
  ``python tests/test_layout.py``.
  """
  lines, problems = api_listing()
  assert not problems, '\n'.join(problems)
  want = API_LISTING.read_text().splitlines() if API_LISTING.exists() else []
  assert lines == want, (
      'the public API changed; review and regenerate docs/api/public.txt '
      'with `python tests/test_layout.py`.\n' + '\n'.join(
          difflib.unified_diff(want, lines, 'public.txt', 'now', lineterm='')))


def test_deprecated_top_level_names_warn_and_resolve():
  import mergejax as mj  # pylint: disable=g-import-not-at-top
  with pytest.warns(DeprecationWarning, match='transforms.della_prune'):
    assert mj.della is mj.transforms.della_prune
  with pytest.warns(DeprecationWarning, match='apply_to_base'):
    assert mj.apply_updates is mj.transforms.apply_to_base
  with pytest.warns(DeprecationWarning):
    assert mj.sharded_merge is mj.parallel.sharded_merge
  with pytest.raises(AttributeError, match='experiments.tools.sweep'):
    mj.run_sweep  # pylint: disable=pointless-statement
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    for name in mj.__all__:
      getattr(mj, name)  # current names never warn


if __name__ == '__main__':
  API_LISTING.write_text('\n'.join(api_listing()[0]) + '\n')
  DESIGN.write_text(_GRAPH.sub(lambda _: import_graph(), DESIGN.read_text()))
  print(f'wrote {API_LISTING} and the import graph in {DESIGN}')
