r"""Git Re-Basin on scikit-learn digits: barriers of independently trained MLPs.

  python -m experiments.main --config=configs/rebasin.py --workdir=/tmp/rebasin
  python -m experiments.main --config=configs/rebasin.py:smoke --workdir=/tmp/rebasin_smoke
  python -m experiments.main --config=configs/rebasin.py --workdir=/tmp/rebasin \
      --config.width=1024
  # without the learned matchers (STE, Sinkhorn re-basin), or with variants:
  python -m experiments.main --config=configs/rebasin.py --workdir=/tmp/rebasin \
      --config.ste=False --config.sinkhorn=False
  python -m experiments.main --config=configs/rebasin.py --workdir=/tmp/rebasin \
      --config.sinkhorn_loss=random --config.sinkhorn_straight_through=True
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
  # Learned matchers, trained on the training loss at the midpoint (lam=0.5).
  c.learned_batch_size = 256   # equal batches, cycled (the ragged tail dropped)
  c.ste = True                 # Git Re-Basin STE v2 (`permute.ste_matching`)
  c.ste_steps = 200
  c.ste_lr = 0.1               # SGD + momentum 0.9
  c.sinkhorn = True            # Sinkhorn re-basin (`permute.sinkhorn_matching`)
  c.sinkhorn_steps = 200
  c.sinkhorn_lr = 0.1          # Adam on the logits
  c.sinkhorn_tau = 1.0
  c.sinkhorn_loss = 'midpoint'  # or 'random' (lam ~ U(0, 1)), 'l2', 'cosine'
  c.sinkhorn_straight_through = False
  if arg == 'smoke':
    c.width, c.epochs = 32, 3
    c.ste_steps = c.sinkhorn_steps = 10
  return c
