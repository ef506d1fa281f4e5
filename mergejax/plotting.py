"""Consistent matplotlib figures for merge experiments (needs matplotlib).

See `mergejax._src.plotting`; barrier curves, Pareto fronts, sweeps and
per-task tables share one style and one color per method name.
"""

from mergejax._src.plotting import barrier_plot
from mergejax._src.plotting import color
from mergejax._src.plotting import colors
from mergejax._src.plotting import pareto_front
from mergejax._src.plotting import pareto_plot
from mergejax._src.plotting import sweep_plot
from mergejax._src.plotting import task_table_plot
