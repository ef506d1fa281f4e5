"""Multi-host helpers: `initialize`, `gather`, `sync`, `launch_local`."""

from mergejax._src.distributed import free_port
from mergejax._src.distributed import gather
from mergejax._src.distributed import initialize
from mergejax._src.distributed import is_coordinator
from mergejax._src.distributed import is_initialized
from mergejax._src.distributed import launch_local
from mergejax._src.distributed import shutdown
from mergejax._src.distributed import sync

__all__ = [
    'free_port', 'gather', 'initialize', 'is_coordinator', 'is_initialized',
    'launch_local', 'shutdown', 'sync',
]
