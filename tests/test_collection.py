"""The suite collects and runs without the parity peers installed.

The README's test command runs on a fresh clone where torch, mergekit and
fusion-bench are absent; a module-level peer import must then skip its
module, never break collection. The peers are hidden from a subprocess by an
import hook, so this holds also where they are installed (CI's parity run).
"""

import os
import pathlib
import subprocess
import sys
import textwrap

from mergejax.testing import PEER_SKIP_REASON

ROOT = pathlib.Path(__file__).resolve().parents[1]
PEERS = ('torch', 'mergekit', 'fusion_bench')

_HIDE_PEERS = textwrap.dedent(f"""
    import sys

    class _HidePeers:
      def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {PEERS!r}:
          raise ImportError(f'{{name}} hidden by tests/test_collection.py')
        return None

    sys.meta_path.insert(0, _HidePeers())
""")


def _pytest_without_peers(tmp_path, *args):
  (tmp_path / 'sitecustomize.py').write_text(_HIDE_PEERS)
  env = {k: v for k, v in os.environ.items()
         if k not in ('MERGEJAX_REQUIRE_PEERS', 'PYTEST_ADDOPTS')}
  env['PYTHONPATH'] = os.pathsep.join(
      [str(tmp_path)] + ([env['PYTHONPATH']] if env.get('PYTHONPATH') else []))
  return subprocess.run(
      [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', *args],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
      check=False)


def test_whole_suite_collects_without_peers(tmp_path):
  proc = _pytest_without_peers(tmp_path, '--collect-only')
  out = proc.stdout + proc.stderr
  assert proc.returncode == 0, out[-4000:]
  assert 'error' not in out.splitlines()[-1].lower(), out[-4000:]


def test_parity_tests_skip_with_one_line(tmp_path):
  parity = sorted(str(p.relative_to(ROOT))
                  for p in (ROOT / 'tests').glob('test_parity_*.py'))
  assert parity
  proc = _pytest_without_peers(tmp_path, *parity)
  out = proc.stdout + proc.stderr
  assert proc.returncode == 0, out[-4000:]
  lines = [l for l in out.splitlines() if l.startswith('SKIPPED (')]
  assert len(lines) == 1, out[-4000:]
  assert lines[0].endswith(PEER_SKIP_REASON), lines


def _readme_commands():
  readme = (ROOT / 'README.md').read_text()
  block = readme.split('```bash\n', 1)[1].split('```', 1)[0]
  return [l for l in block.splitlines() if l and not l.startswith('#')]


def test_ci_runs_the_readme_commands_first():
  commands = _readme_commands()
  assert len(commands) == 2, commands
  ci = [l for l in (ROOT / '.ci' / 'run').read_text().splitlines()
        if l.strip() and not l.lstrip().startswith('#')]
  # Before the README's commands only shell set-up runs: nothing installed.
  first = next(i for i, l in enumerate(ci)
               if not l.startswith(('set ', 'cd ')))
  assert ci[first:first + 2] == commands, (ci, commands)
