"""A small digits model zoo for merge experiments (needs ``mergejax[experiments]``).

A base MLP pre-trained on generic augmentations of one part of scikit-learn's
8x8 digits, and K fine-tunes on distinct input transforms (rotations, flips,
inversion, pixel permutation, ...) of a disjoint part. Backbones are merged;
each task keeps its fine-tuned head.
"""

from experiments.zoo._data import augment
from experiments.zoo._data import Digits
from experiments.zoo._data import load_digits
from experiments.zoo._data import make_tasks
from experiments.zoo._data import make_transform
from experiments.zoo._data import Split
from experiments.zoo._data import Task
from experiments.zoo._data import TASK_NAMES
from experiments.zoo._eval import normalized
from experiments.zoo._eval import TaskEvaluator
from experiments.zoo._models import accuracy
from experiments.zoo._models import Backbone
from experiments.zoo._models import Classifier
from experiments.zoo._models import init_params
from experiments.zoo._models import logits
from experiments.zoo._train import finetune
from experiments.zoo._train import load_or_train
from experiments.zoo._train import train_base
from experiments.zoo._train import Zoo

__all__ = (
    'augment',
    'Digits',
    'load_digits',
    'make_tasks',
    'make_transform',
    'Split',
    'Task',
    'TASK_NAMES',
    'normalized',
    'TaskEvaluator',
    'accuracy',
    'Backbone',
    'Classifier',
    'init_params',
    'logits',
    'finetune',
    'load_or_train',
    'train_base',
    'Zoo',
)
