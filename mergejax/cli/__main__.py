"""``python -m mergejax.cli``: the ``mergejax`` command."""

import sys

from mergejax.cli._main import main

if __name__ == '__main__':
  sys.exit(main())
