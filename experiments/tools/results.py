"""Results pages: provenance for every measurement and Markdown from its JSON.

Experiments and benchmarks record `provenance()` (commit, date, machine,
software) in the JSON they write; `render` turns such a JSON into a Markdown
page, and ``python -m experiments.tools.results JSON... --out docs/results``
writes the pages the documentation (and the README's numbers) come from.

>>> page = render({'experiment': 'demo', 'provenance': {'commit': 'abc'},
...                'rows': [{'x': 1, 'y': 0.5}]}, title='Demo')
>>> print(page.splitlines()[0])
# Demo
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
from typing import Any, Callable, Mapping, Sequence

__all__ = ('provenance', 'render', 'markdown_table', 'write_page',
           'readme_summary', 'fill_readme', 'index_page', 'main')

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))


def _git(*args: str) -> str:
  try:
    return subprocess.run(['git', *args], cwd=_ROOT, capture_output=True,
                          text=True, timeout=10, check=True).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return ''


def _memory_gib() -> float | None:
  try:
    return round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
                 / 2**30, 1)
  except (ValueError, OSError, AttributeError):
    return None


def provenance() -> dict[str, Any]:
  """Where and when a measurement was taken: commit, date, machine, software."""
  import jax  # pylint: disable=g-import-not-at-top
  devices = jax.devices()
  return dict(
      commit=_git('rev-parse', '--short=12', 'HEAD') or 'unknown',
      dirty=bool(_git('status', '--porcelain', '--untracked-files=no')),
      date=datetime.datetime.now(datetime.timezone.utc).strftime(
          '%Y-%m-%d %H:%M UTC'),
      machine=dict(
          system=f'{platform.system()} {platform.machine()}',
          processor=platform.processor() or platform.machine(),
          cpu_count=os.cpu_count(), memory_gib=_memory_gib(),
          loadavg=[round(x, 2) for x in os.getloadavg()]
          if hasattr(os, 'getloadavg') else None),
      python=platform.python_version(), jax=jax.__version__,
      backend=jax.default_backend(),
      devices=f'{len(devices)} x {devices[0].device_kind}')


def markdown_table(rows: Sequence[Mapping[str, Any]],
                   columns: Sequence[str] | None = None, *,
                   float_format: Callable[[float], str] = '{:.4g}'.format
                   ) -> str:
  """A Markdown table of ``rows`` (floats by ``float_format``, 4 digits)."""
  if not rows:
    return '(no rows)'
  cols = list(columns or dict.fromkeys(k for r in rows for k in r))

  def fmt(v):
    if isinstance(v, float):
      return float_format(v)
    if isinstance(v, (list, dict)):
      return json.dumps(v)
    return str(v)

  lines = ['| ' + ' | '.join(cols) + ' |', '|' + '---|' * len(cols)]
  lines += ['| ' + ' | '.join(fmt(r.get(c, '')) for c in cols) + ' |'
            for r in rows]
  return '\n'.join(lines)


def _provenance_block(p: Mapping[str, Any]) -> str:
  if not p:
    return '*No provenance recorded.*'
  m = p.get('machine', {})
  dirty = ' (with uncommitted changes)' if p.get('dirty') else ''
  return '\n'.join([
      f'* commit: `{p.get("commit", "?")}`{dirty}',
      f'* date: {p.get("date", "?")}',
      f'* machine: {m.get("system", "?")}, {m.get("cpu_count", "?")} CPUs, '
      f'{m.get("memory_gib", "?")} GiB, load average at the start '
      f'{m.get("loadavg", "?")}',
      f'* software: Python {p.get("python", "?")}, JAX {p.get("jax", "?")} '
      f'({p.get("backend", "?")}, {p.get("devices", "?")})',
  ])


# (claim, method, reference): the method's paper reports it above the
# reference; the default page says whether that holds on the zoo.
CLAIMS = (
    ('TIES beats task arithmetic', 'ties', 'task_arithmetic'),
    ('Fisher merging beats plain averaging', 'fisher_merging', 'average'),
    ('RegMean beats task arithmetic', 'regmean', 'task_arithmetic'),
    ('RegMean++ beats RegMean', 'regmean_plusplus', 'regmean'),
    ('layer-wise AdaMerging beats task arithmetic', 'adamerging',
     'task_arithmetic'),
    ('Expert Merging beats task arithmetic', 'expert_merging',
     'task_arithmetic'),
    ('Expert Merging++ (importance-guided chunks) beats Expert Merging',
     'expert_merging_plusplus', 'expert_merging'),
    ('Concrete task arithmetic beats task arithmetic', 'concrete',
     'task_arithmetic'),
    ('Concrete AdaMerging beats AdaMerging', 'concrete_adamerging',
     'adamerging'),
    ('WUDI (FusionBench procedure) beats task arithmetic', 'wudi',
     'task_arithmetic'),
    ('WUDI (closed form) beats task arithmetic', 'wudi_closed_form',
     'task_arithmetic'),
    ('OTA (grafting, then curvature weights) beats task arithmetic', 'ota',
     'task_arithmetic'),
    ('Fast Fisher Grafting improves OTA', 'ota', 'ota_no_graft'),
    ('surgery improves task arithmetic', 'surgery_ta', 'task_arithmetic'),
    ('surgery improves AdaMerging', 'surgery_adamerging', 'adamerging'),
)


def _claims(ok: Mapping[str, Any]) -> list[str]:
  lines = []
  for text, a, b in CLAIMS:
    if a in ok and b in ok:
      x, y = ok[a]['avg_accuracy'], ok[b]['avg_accuracy']
      verdict = 'holds' if x > y else 'does not hold'
      lines.append(f'* {text}: {verdict} (`{a}` {x:.3f} vs `{b}` {y:.3f})')
  return lines


def _default_body(r: Mapping[str, Any]) -> str:
  s = r['summary']
  ok = {n: m for n, m in r['methods'].items() if m.get('status') == 'ok'}
  ft = s['finetuned_avg_accuracy']
  ranked = sorted(ok.items(), key=lambda kv: -kv[1]['avg_accuracy'])
  top = [dict(method=n, avg_accuracy=round(m['avg_accuracy'], 3),
              of_finetuned=f'{m["avg_accuracy"] / ft:.1%}')
         for n, m in ranked]
  secs = r.get('seconds', {})
  claims = _claims(ok)
  return '\n'.join([
      'Test accuracy per task of the merged backbone with each task\'s '
      'fine-tuned head; `norm` is the mean over tasks of merged / fine-tuned '
      'accuracy. Produced by',
      '',
      '```bash',
      'python -m experiments.main --config=configs/default.py '
      '--workdir=workdir',
      '```',
      '',
      '## Summary',
      '',
      f'* base model average: {s["base_avg_accuracy"]:.3f} '
      f'({s["base_avg_accuracy"] / ft:.1%} of fine-tuned); base backbone '
      f'with task heads: {s["base_backbone_task_heads_avg_accuracy"]:.3f}; '
      f'fine-tuned (each on its own task): {ft:.3f}',
      f'* best single merged model: {s["best_method"]} '
      f'{s["best_avg_accuracy"]:.3f} ({s["best_over_finetuned"]:.1%} of '
      'fine-tuned)',
      f'* every merge beats the base model: {s["all_merges_beat_base"]}',
      f'* errors: {s["errors"] or "none"}; skipped: {s["skipped"] or "none"}',
      f'* wall time: {secs.get("total", float("nan")):.1f} s '
      f'(zoo {secs.get("zoo", float("nan")):.1f} s, merges '
      f'{secs.get("merges", float("nan")):.1f} s)',
      '',
      *(['## Published claims on this zoo', '',
         'Each line compares average test accuracies of two rows below '
         '(each at its validation-selected setting).', '', *claims, '']
        if claims else []),
      '## Methods ranked by average test accuracy',
      '',
      markdown_table(top),
      '',
      '## Full table',
      '',
      '```',
      r['table'],
      '```',
      '',
      '## Merges that are not one backbone',
      '',
      'Dynamic merges (WEMoE routes every input; T3 interpolates per input '
      'between the base and one fine-tune), FW-Merging over pools that grow '
      'with irrelevant and broken checkpoints, and merges inside training '
      'runs are compared on their own pages. WEMoE, T3 and FW-Merging run on '
      'this zoo and recompute the task-arithmetic and fine-tuned references '
      'there (the zoo is retrained from its config where it is not cached):',
      '',
      '* [dynamic and pool-scale merges](dynamic.md): WEMoE (and E-WEMoE), '
      'T3 / T3_B, FW-Merging hard and soft, peak memory against the number '
      'of models;',
      '* [MWA over one fine-tuning run](mwa.md);',
      '* [decentralized training and one global merge](decentralized.md).',
  ])


def render(result: Mapping[str, Any], title: str | None = None) -> str:
  """A Markdown page for one results JSON (an experiment or a benchmark)."""
  name = result.get('experiment') or result.get('benchmark') or 'results'
  title = title or result.get('title') or f'Results: {name}'
  parts = [f'# {title}', '',
           '*Generated by `experiments/tools/results.py` from the JSON the '
           'run wrote; do not edit by hand.*', '',
           _provenance_block(result.get('provenance', {})), '']
  if name == 'default' and 'summary' in result:
    parts.append(_default_body(result))
  else:
    if result.get('description'):
      parts += [result['description'], '']
    if result.get('command'):
      parts += ['```bash', result['command'], '```', '']
    if isinstance(result.get('tables'), dict):
      # Several titled tables: the notes summarise them, so they come first.
      parts += [*[f'* {n}' for n in result.get('notes', ())], '']
      for heading, rows in result['tables'].items():
        parts += [f'## {heading}', '', markdown_table(rows), '']
      return '\n'.join(parts).rstrip() + '\n'
    for key in ('rows', 'cases', 'results'):
      if isinstance(result.get(key), list) and result[key] and isinstance(
          result[key][0], dict):
        parts.append(markdown_table(result[key]))
        break
    if result.get('notes'):
      parts += ['', *[f'* {n}' for n in result['notes']]]
  return '\n'.join(parts).rstrip() + '\n'


def write_result(out_dir: str, result: Mapping[str, Any]) -> str:
  """Writes an experiment's ``results.json`` atomically and prints its rows.

  Prints the rows as a Markdown table and the notes; returns the path.
  """
  path = os.path.join(out_dir, 'results.json')
  with open(path + '.tmp', 'w') as f:
    json.dump(result, f, indent=1, default=float)
  os.replace(path + '.tmp', path)
  if result.get('rows'):
    print(markdown_table(result['rows']), flush=True)
  print('\n'.join(result.get('notes', ())))
  print(f'wrote {path}')
  return path


def write_page(result: Mapping[str, Any], path: str,
               title: str | None = None) -> str:
  """Writes `render(result)` to ``path`` atomically; returns the path."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    f.write(render(result, title))
  os.replace(tmp, path)
  return path


_TITLES = {'default': 'Default experiment: merging a digits model zoo'}
_README_REGION = re.compile(
    r'(<!-- results:default:start -->\n).*?(<!-- results:default:end -->)',
    re.S)


def readme_summary(result: Mapping[str, Any]) -> str:
  """The README's excerpt of the default experiment (from its results JSON)."""
  s = result['summary']
  ok = {n: m for n, m in result['methods'].items() if m.get('status') == 'ok'}
  ft = s['finetuned_avg_accuracy']
  pick = ['average', 'task_arithmetic', 'ties', 'fisher_merging', 'regmean',
          'regmean_plusplus', 'adamerging', 'tsv', 'iso_c', 'emr', 'twin']
  rows = [dict(model='base model', avg_accuracy=f'{s["base_avg_accuracy"]:.3f}',
               of_finetuned=f'{s["base_avg_accuracy"] / ft:.1%}'),
          dict(model='fine-tuned, each on its own task',
               avg_accuracy=f'{ft:.3f}', of_finetuned='(reference)')]
  tuned = s.get('tuned_avg_accuracy', {})
  rows += [dict(model=f'`{n}`', avg_accuracy=f'{ok[n]["avg_accuracy"]:.3f}',
                of_finetuned=f'{ok[n]["avg_accuracy"] / ft:.1%}',
                tuned=f'{tuned[n]:.3f}' if n in tuned else '')
           for n in pick if n in ok]
  p = result.get('provenance', {})
  return '\n'.join([
      f'Default experiment (8 tasks; commit `{p.get("commit", "?")}`, '
      f'{p.get("date", "?")}; all {len(ok)} merges in '
      '[docs/results/default.md](docs/results/default.md)):', '',
      markdown_table(rows, ['model', 'avg_accuracy', 'of_finetuned'] + (
          ['tuned'] if tuned else [])), ''])


def fill_readme(readme: str, result: Mapping[str, Any]) -> str:
  """``readme`` with its results region replaced by `readme_summary`."""
  if not _README_REGION.search(readme):
    raise ValueError('README has no <!-- results:default:start/end --> region.')
  return _README_REGION.sub(
      lambda m: m.group(1) + readme_summary(result) + m.group(2), readme)


def index_page(pages: Mapping[str, str]) -> str:
  """``docs/results/index.md`` listing ``{name: title}``."""
  lines = ['# Results', '',
           'Every page here is generated by `python -m experiments.tools.results` '
           'from the JSON a run wrote (kept beside the page), with the commit, '
           'date and machine of the run. Each page names the command that '
           'reproduces it.', '']
  lines += [f'* [{t}]({n}.md)' for n, t in sorted(pages.items())]
  return '\n'.join(lines) + '\n'


def _title(result: Mapping[str, Any], name: str) -> str:
  return _TITLES.get(name) or result.get('title') or f'Results: {name}'


def main(argv: Sequence[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('json', nargs='*', help='results JSON files to add')
  p.add_argument('--out', default=os.path.join(_ROOT, 'docs', 'results'),
                 help='directory of the pages (one <name>.md + .json each)')
  p.add_argument('--readme', default=os.path.join(_ROOT, 'README.md'),
                 help='README whose results region shows the default run')
  args = p.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  for path in args.json:  # keep a copy of each JSON beside its page
    with open(path) as f:
      result = json.load(f)
    result.pop('workdir', None)  # a local path, not a result
    name = (result.get('experiment') or result.get('benchmark')
            or os.path.splitext(os.path.basename(path))[0])
    # Figures the page shows (``![...](file.png)``) travel with the JSON.
    for fig in re.findall(r'!\[[^\]]*\]\(([\w.-]+\.png)\)',
                          result.get('description', '')):
      src = os.path.join(os.path.dirname(os.path.abspath(path)), fig)
      if os.path.exists(src):
        shutil.copyfile(src, os.path.join(args.out, fig))
    with open(os.path.join(args.out, f'{name}.json'), 'w') as f:
      json.dump(result, f, indent=1, default=str)
  pages = {}
  for fn in sorted(os.listdir(args.out)):  # re-render every page
    if not fn.endswith('.json'):
      continue
    name = fn[:-5]
    with open(os.path.join(args.out, fn)) as f:
      result = json.load(f)
    pages[name] = _title(result, name)
    print('wrote', write_page(result, os.path.join(args.out, f'{name}.md'),
                              pages[name]))
    if name == 'default' and args.readme:
      with open(args.readme) as f:
        text = f.read()
      with open(args.readme, 'w') as f:
        f.write(fill_readme(text, result))
      print('updated', args.readme)
  with open(os.path.join(args.out, 'index.md'), 'w') as f:
    f.write(index_page(pages))


if __name__ == '__main__':
  main()
