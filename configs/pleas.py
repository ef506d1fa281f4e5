r"""PLeaS on scikit-learn digits: two MLPs or CNNs trained on disjoint class splits.

  python -m experiments.main --config=configs/pleas.py --workdir=/tmp/pleas
  python -m experiments.main --config=configs/pleas.py:cnn --workdir=/tmp/pleas_cnn
  python -m experiments.main --config=configs/pleas.py:smoke --workdir=/tmp/pleas_smoke
  python -m experiments.main --config=configs/pleas.py:smoke,cnn --workdir=/tmp/pleas_smoke_cnn
  python -m experiments.main --config=configs/pleas.py:resnet --workdir=/tmp/pleas_resnet

``arch='cnn'`` reshapes the digits to 8x8x1 images and trains `models.CNN`
(``cnn_features`` 3x3 convs + ``cnn_norm`` + ReLU, global mean pool,
``cnn_dense`` hidden Dense layers, head); ``arch='resnet'`` trains
`models.ResNet` (``resnet_stages`` blocks per stage, ``resnet_widths``, the
same ``cnn_norm``).
"""

import ml_collections


def get_config(arg=None):
  args = set((arg or '').split(',')) - {''}
  unknown = args - {'smoke', 'cnn', 'resnet'}
  if unknown:
    raise ValueError(f'configs/pleas.py: unknown variant(s) {sorted(unknown)}; '
                     "valid: 'smoke', 'cnn', 'resnet' (comma-separated).")
  c = ml_collections.ConfigDict()
  c.experiment = 'pleas'
  c.arch = 'mlp'         # or 'cnn' / 'resnet' (digits as 8x8x1 images)
  c.width = 128          # MLP hidden width
  c.depth = 2            # MLP hidden layers
  c.cnn_features = (16, 32)  # CNN conv widths
  c.cnn_dense = (32,)        # CNN hidden Dense widths after the pool
  c.cnn_norm = 'batch'       # 'none' | 'batch' | 'group' (LayerNorm is rejected)
  c.resnet_stages = (1, 1)   # ResNet blocks per stage
  c.resnet_widths = (16, 32)  # ResNet stage widths
  c.bn_stats = 'recompute'   # or 'keep_separate' (pleas' bn_stats)
  c.epochs = 40
  c.batch_size = 64
  c.lr = 1e-3
  c.sizes = (1.0, 1.2, 1.4, 1.6, 1.8, 2.0)   # merged size / one model's size
  c.measure = 'params'   # what the size counts: 'params' or 'flops'
  c.criterion = 'sensitivity'  # separate units by merge cost; or 'correlation' (PLeaS')
  c.ridge = 1e-3
  c.fit = 'closed_form'  # or 'gradient' (PLeaS' Adam fit)
  c.data_free = False    # True: match and solve on generated inputs
  c.ls_inputs = 'merged'  # or 'original' (PLeaS' reference fitting)
  c.num_pairs = 5        # independently trained model pairs (means reported)
  c.task_tagged = False  # True: each model's separate blocks fit on its task
  c.seed = 0
  if 'cnn' in args or 'resnet' in args:
    c.arch = 'cnn' if 'cnn' in args else 'resnet'
    c.epochs = 30
  if 'smoke' in args:
    c.width, c.epochs, c.num_pairs, c.sizes = 32, 3, 1, (1.0, 2.0)
    c.cnn_features, c.cnn_dense = (8, 8), (8,)
    c.resnet_widths = (8, 8)
  return c
