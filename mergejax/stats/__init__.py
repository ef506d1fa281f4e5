"""Statistics for data-informed merges: Fisher information and input Grams.

A data-informed merge computes statistics of each fine-tuned model on a little
data once, then runs as an ordinary `mergejax.MergeTransformation` over them
(`mergejax.methods.fisher_merging`, `mergejax.methods.regmean`). Statistics
come from the user's own model function, as in
`mergejax.permute.activation_matching`, and accumulate in float32 batch by
batch.

>>> import jax, jax.numpy as jnp
>>> from mergejax import stats
>>> params = {'w': jnp.ones((3, 2))}
>>> logits_fn = lambda p, x: x @ p['w']
>>> x, y = jnp.ones((4, 3)), jnp.zeros(4, jnp.int32)
>>> stats.fisher_diagonal(logits_fn, params, [(x, y)], kind='empirical')['w'].shape
(3, 2)
"""

# pylint: disable=g-importing-member
from mergejax.stats._fisher import fisher_diagonal
from mergejax.stats._fisher import FISHER_KINDS
from mergejax.stats._gram import input_grams
from mergejax.stats._gram import linen_dense_inputs
from mergejax.stats._gram import nnx_functional
from mergejax.stats._gram import nnx_linear_inputs
# pylint: enable=g-importing-member

__all__ = ('fisher_diagonal', 'FISHER_KINDS', 'input_grams',
           'linen_dense_inputs', 'nnx_functional', 'nnx_linear_inputs')
