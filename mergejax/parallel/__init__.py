"""Execution at scale: device meshes, multi-host runs and streamed checkpoints.

* sharding -- `sharded_merge` runs any `mergejax.MergeTransformation` with
  every leaf placed on a mesh by regex rules (FSDP axis by default), the model
  axis optionally sharded too;
* distributed -- `initialize`, `gather`, `sync`, `launch_local` for
  ``jax.distributed`` multi-host runs;
* streaming -- `stream_merge` merges safetensors checkpoints larger than
  memory tensor by tensor.

>>> import jax, numpy as np, mergejax as mj
>>> from jax.sharding import PartitionSpec as P
>>> from mergejax import parallel
>>> mesh = parallel.make_mesh((1, 1), devices=jax.devices()[:1])
>>> rules = [(r'embed', P(None, 'fsdp')), (r'.*', 'fsdp')]
>>> base = {'embed': np.zeros((8, 4), np.float32)}
>>> fts = [{'embed': np.ones((8, 4), np.float32)}] * 2
>>> out = parallel.sharded_merge(mj.methods.task_arithmetic(), base, fts,
...                              mesh=mesh, rules=rules)
>>> float(out['embed'][0, 0]), out['embed'].sharding.spec
(2.0, P(None, 'fsdp'))
"""

# pylint: disable=g-importing-member
from mergejax.parallel._distributed import free_port
from mergejax.parallel._distributed import gather
from mergejax.parallel._distributed import initialize
from mergejax.parallel._distributed import is_coordinator
from mergejax.parallel._distributed import is_initialized
from mergejax.parallel._distributed import launch_local
from mergejax.parallel._distributed import shutdown
from mergejax.parallel._distributed import sync
from mergejax.parallel._sharding import DEFAULT_RULES
from mergejax.parallel._sharding import FSDP_AXIS
from mergejax.parallel._sharding import fsdp_spec
from mergejax.parallel._sharding import make_mesh
from mergejax.parallel._sharding import MODEL_AXIS
from mergejax.parallel._sharding import param_specs
from mergejax.parallel._sharding import prepare_sharded_merge
from mergejax.parallel._sharding import put_sharded
from mergejax.parallel._sharding import sharded_merge
from mergejax.parallel._sharding import stack_sharded
from mergejax.parallel._sharding import stacked_spec
from mergejax.parallel._stream import stream_merge
from mergejax.parallel._stream import StreamStats
# pylint: enable=g-importing-member

__all__ = (
    # sharding
    'DEFAULT_RULES', 'FSDP_AXIS', 'MODEL_AXIS', 'fsdp_spec', 'make_mesh',
    'param_specs', 'prepare_sharded_merge', 'put_sharded', 'sharded_merge',
    'stack_sharded', 'stacked_spec',
    # multi-host
    'free_port', 'gather', 'initialize', 'is_coordinator', 'is_initialized',
    'launch_local', 'shutdown', 'sync',
    # streaming
    'stream_merge', 'StreamStats',
)
