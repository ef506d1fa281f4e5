r"""Git Re-Basin on scikit-learn digits: barriers of independently trained MLPs.

  python -m experiments.main --config=configs/rebasin.py --workdir=/tmp/rebasin
  python -m experiments.main --config=configs/rebasin.py:smoke --workdir=/tmp/rebasin_smoke
  python -m experiments.main --config=configs/rebasin.py --workdir=/tmp/rebasin \
      --config.width=1024
"""

import ml_collections


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.experiment = 'rebasin'
  c.width = 512          # hidden units per layer
  c.depth = 2            # hidden layers
  c.epochs = 40
  c.batch_size = 64
  c.lr = 1e-3
  c.pairs = 2            # independent pairs of models (seeds 2i, 2i+1)
  c.num_lambdas = 25
  c.seed = 0
  if arg == 'smoke':
    c.width, c.epochs = 32, 3
  return c
