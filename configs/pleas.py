r"""PLeaS on scikit-learn digits: two MLPs trained on disjoint class splits.

  python -m experiments.main --config=configs/pleas.py --workdir=/tmp/pleas
  python -m experiments.main --config=configs/pleas.py:smoke --workdir=/tmp/pleas_smoke
"""

import ml_collections


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.experiment = 'pleas'
  c.width = 128
  c.depth = 2
  c.epochs = 40
  c.batch_size = 64
  c.lr = 1e-3
  c.sizes = (1.0, 1.2, 1.4, 1.6, 1.8, 2.0)   # merged size / one model's size
  c.ridge = 1e-3
  c.data_free = False    # True: match and solve on generated inputs
  c.ls_inputs = 'merged'  # or 'original' (PLeaS' reference fitting)
  c.num_pairs = 5        # independently trained model pairs (means reported)
  c.task_tagged = False  # True: each model's separate blocks fit on its task
  c.seed = 0
  if arg == 'smoke':
    c.width, c.epochs, c.num_pairs, c.sizes = 32, 3, 1, (1.0, 2.0)
  return c
