"""Sharded merges over a device mesh with regex sharding rules.

See `mergejax.sharded_merge`. Example:

>>> import jax, numpy as np, mergejax as mj
>>> from jax.sharding import PartitionSpec as P
>>> mesh = mj.sharding.make_mesh((1, 1), devices=jax.devices()[:1])
>>> rules = [(r'embed', P(None, 'fsdp')), (r'.*', 'fsdp')]
>>> base = {'embed': np.zeros((8, 4), np.float32)}
>>> fts = [{'embed': np.ones((8, 4), np.float32)}] * 2
>>> out = mj.sharded_merge(mj.methods.task_arithmetic(), base, fts, mesh=mesh,
...                        rules=rules)
>>> float(out['embed'][0, 0]), out['embed'].sharding.spec
(2.0, P(None, 'fsdp'))
"""

from mergejax._src.sharding import DEFAULT_RULES
from mergejax._src.sharding import FSDP_AXIS
from mergejax._src.sharding import fsdp_spec
from mergejax._src.sharding import make_mesh
from mergejax._src.sharding import MODEL_AXIS
from mergejax._src.sharding import param_specs
from mergejax._src.sharding import put_sharded
from mergejax._src.sharding import sharded_merge
from mergejax._src.sharding import stack_sharded
from mergejax._src.sharding import stacked_spec

__all__ = [
    'DEFAULT_RULES', 'FSDP_AXIS', 'MODEL_AXIS', 'fsdp_spec', 'make_mesh',
    'param_specs', 'put_sharded', 'sharded_merge', 'stack_sharded',
    'stacked_spec',
]
