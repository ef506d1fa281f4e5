"""Deprecated: use `mergejax.parallel` (kept for one release)."""

import warnings

from mergejax.parallel import *  # pylint: disable=wildcard-import,unused-wildcard-import
from mergejax.parallel import __all__  # pylint: disable=unused-import

warnings.warn('mergejax.distributed is deprecated; use mergejax.parallel.',
              DeprecationWarning, stacklevel=2)
