"""A small digits model zoo for merge experiments (needs ``mergejax[experiments]``).

A base MLP pre-trained on generic augmentations of one part of scikit-learn's
8x8 digits, and K fine-tunes on distinct input transforms (rotations, flips,
inversion, pixel permutation, ...) of a disjoint part. Backbones are merged;
each task keeps its fine-tuned head.
"""

from mergejax.zoo._data import augment
from mergejax.zoo._data import Digits
from mergejax.zoo._data import load_digits
from mergejax.zoo._data import make_tasks
from mergejax.zoo._data import make_transform
from mergejax.zoo._data import Split
from mergejax.zoo._data import Task
from mergejax.zoo._data import TASK_NAMES
from mergejax.zoo._eval import normalized
from mergejax.zoo._eval import TaskEvaluator
from mergejax.zoo._models import accuracy
from mergejax.zoo._models import Backbone
from mergejax.zoo._models import Classifier
from mergejax.zoo._models import init_params
from mergejax.zoo._models import logits
from mergejax.zoo._train import finetune
from mergejax.zoo._train import load_or_train
from mergejax.zoo._train import train_base
from mergejax.zoo._train import Zoo
