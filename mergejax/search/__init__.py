"""Searching merge space: many merge candidates scored in one compiled call.

Choosing a merge's hyperparameters (task-wise or layer-wise coefficients,
densities) decides which method wins a comparison. Numeric hyperparameters
live in a transformation's state, so they trace: `population_evaluator`
``vmap``s a user's score over a population of candidates, chunked with
``lax.map`` to bound memory and sharded over a device mesh, and `evolve`
runs an evosax strategy (CMA-ES, Sep-CMA-ES, genetic algorithms, ...) over
those candidates, resumable from orbax checkpoints. For several objectives
(one metric per task), `map_search` fits MAP's quadratic surrogates to a few
evaluated merges and `surrogate_front` reads the Pareto front off them;
`pareto_mask` and `hypervolume` compare fronts. `m2n2` evolves an archive
of whole models by merging them (evolving split points, niche competition,
attraction-based mate choice), from fine-tunes or from scratch.
`layerwise_space` turns a few unit-scale merges into a space of layer-wise
configurations (a method and a weight per block) for zero-order search;
`evo_merging` finds sparse, signed coefficients for a large repository from
the merged model's metric alone.

>>> import jax.numpy as jnp, mergejax as mj
>>> mj.search.evaluate_population(lambda c: jnp.sum(c ** 2), jnp.eye(3))
Array([1., 1., 1.], dtype=float32)
"""

# pylint: disable=g-importing-member
from mergejax.search._evo_merging import evo_coefficients
from mergejax.search._evo_merging import evo_merging
from mergejax.search._evolve import evolve
from mergejax.search._evolve import SearchResult
from mergejax.search._layerwise import layerwise_candidate
from mergejax.search._layerwise import layerwise_merge
from mergejax.search._layerwise import layerwise_space
from mergejax.search._layerwise import LayerwiseSpace
from mergejax.search._m2n2 import attraction
from mergejax.search._m2n2 import crossover
from mergejax.search._m2n2 import m2n2
from mergejax.search._m2n2 import M2N2Result
from mergejax.search._m2n2 import niche_fitness
from mergejax.search._map import fit_quadratic
from mergejax.search._map import map_search
from mergejax.search._map import MapResult
from mergejax.search._map import nested_map
from mergejax.search._map import predict
from mergejax.search._map import QuadraticSurrogate
from mergejax.search._map import surrogate_front
from mergejax.search._pareto import hypervolume
from mergejax.search._pareto import pareto_mask
from mergejax.search._population import evaluate_population
from mergejax.search._population import population_evaluator
# pylint: enable=g-importing-member

__all__ = (
    'attraction', 'crossover', 'evaluate_population', 'evo_coefficients',
    'evo_merging', 'evolve', 'fit_quadratic', 'hypervolume',
    'layerwise_candidate', 'layerwise_merge', 'layerwise_space',
    'LayerwiseSpace', 'm2n2', 'M2N2Result', 'map_search', 'MapResult',
    'nested_map', 'niche_fitness', 'pareto_mask', 'population_evaluator',
    'predict', 'QuadraticSurrogate', 'SearchResult', 'surrogate_front',
)
