"""Results pages are generated from their JSON; the README's numbers come from them."""

import json
import pathlib
import re

from experiments.tools import results

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / 'docs' / 'results'
README = ROOT / 'README.md'
REGENERATE = 'regenerate with `python -m experiments.tools.results`'


def _jsons():
  return sorted(RESULTS.glob('*.json'))


def test_there_is_a_default_experiment_page():
  assert (RESULTS / 'default.json').exists() and (RESULTS / 'default.md').exists()


def test_every_page_is_its_rendered_json():
  pages = {}
  for path in _jsons():
    result = json.loads(path.read_text())
    name = path.stem
    pages[name] = results._title(result, name)  # pylint: disable=protected-access
    page = path.with_suffix('.md')
    assert page.read_text() == results.render(result, pages[name]), (
        f'{page.name} was edited by hand or is stale; {REGENERATE}.')
  assert (RESULTS / 'index.md').read_text() == results.index_page(pages)


def test_pages_record_commit_date_and_machine():
  for path in _jsons():
    p = json.loads(path.read_text()).get('provenance', {})
    assert p.get('commit') and p.get('date') and p.get('machine'), path.name


def test_readme_results_region_is_generated():
  default = json.loads((RESULTS / 'default.json').read_text())
  text = README.read_text()
  assert text == results.fill_readme(text, default), (
      f"README's results region is stale; {REGENERATE}.")


# Versions and licences are not measurements.
_NOT_MEASURED = ('0.1.5', '0.2.33', '2.0', '8x8')


def _prose(text: str) -> str:
  text = re.sub(r'```.*?```', '', text, flags=re.S)    # code blocks
  text = re.sub(r'`[^`]*`', '', text)                  # inline code
  text = re.sub(r'\(https?://[^)]*\)', '', text)       # link targets
  text = re.sub(r'\([\w./-]+\.md\)', '', text)         # relative links
  for token in _NOT_MEASURED:
    text = text.replace(token, '')
  return text


def test_every_number_in_the_readme_comes_from_a_results_page():
  pages = '\n'.join(p.read_text() for p in RESULTS.glob('*.md'))
  numbers = re.findall(r'\d+\.\d+%?|\d+%', _prose(README.read_text()))
  missing = sorted({n for n in numbers if n not in pages})
  assert not missing, (f'README numbers not on any docs/results page: '
                       f'{missing}; quote generated results only.')


def test_readme_stays_short():
  assert len(README.read_text().splitlines()) < 300
