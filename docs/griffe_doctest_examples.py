"""Griffe extension: render ``Example:`` sections as doctest examples.

Our Google-style docstrings title their doctests ``Example:`` (singular), which
Griffe would render as an admonition of Markdown text, so ``p['a']['b']`` would
be read as a link reference. Renaming the title to ``Examples:`` makes Griffe
render the doctest as code.
"""

import re

import griffe

_EXAMPLE = re.compile(r'^(\s*)Example:\s*$', re.MULTILINE)


class DoctestExamples(griffe.Extension):
  """Renames ``Example:`` docstring sections to ``Examples:``."""

  def on_object(self, *, obj, **kwargs):
    del kwargs
    if obj.docstring is not None:
      obj.docstring.value = _EXAMPLE.sub(r'\1Examples:', obj.docstring.value)
