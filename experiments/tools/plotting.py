"""Consistent matplotlib figures for merge experiments (needs matplotlib).

One look for every experiment: the same size, font, grid and a fixed color per
method name (so "ties" is the same color in every plot). Each function returns
the ``Figure`` and, given ``path``, saves a PNG (150 dpi) there. The Agg
backend is used when no display is available, so plots work headless.

* `barrier_plot`: loss/accuracy along an interpolation path ``alpha in [0, 1]``
  (re-basin barriers), one curve per setting.
* `fronts_plot`: point sets of two objectives, some drawn as fronts (MAP's
  predicted front against a grid's).
* `pareto_plot`: two metrics per method (e.g. average normalized accuracy vs
  size or density), with the Pareto front drawn.
* `sweep_plot`: a metric against one swept hyperparameter, one line per group.
* `task_table_plot`: a methods x tasks heatmap of per-task accuracies.
"""

from __future__ import annotations

import hashlib
import os
import sys
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = (
    'color',
    'colors',
    'barrier_plot',
    'fronts_plot',
    'pareto_front',
    'pareto_plot',
    'sweep_plot',
    'task_table_plot',
)

_STYLE = {
    'figure.figsize': (5.0, 3.6),
    'axes.grid': True,
    'grid.alpha': 0.3,
    'axes.spines.top': False,
    'axes.spines.right': False,
    'font.size': 9,
    'legend.fontsize': 8,
    'legend.frameon': False,
}

_PALETTE = ('#4477AA', '#EE6677', '#228833', '#CCBB44', '#66CCEE', '#AA3377',
            '#BBBBBB', '#000000', '#EE7733', '#0077BB', '#33BBEE', '#009988')


def _plt():
  import matplotlib  # pylint: disable=g-import-not-at-top
  if not os.environ.get('DISPLAY') and 'ipykernel' not in sys.modules:
    matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def color(name: str) -> str:
  """A stable color for a method/setting name (same name, same color).

  Example:
    >>> from experiments.tools.plotting import color
    >>> color('ties') == color('ties')
    True
  """
  h = int(hashlib.md5(name.encode()).hexdigest(), 16)
  return _PALETTE[h % len(_PALETTE)]


def colors(labels: Sequence[str]) -> dict[str, str]:
  """`color` for each label, made distinct within one figure.

  Example:
    >>> from experiments.tools.plotting import colors
    >>> len(set(colors(['a', 'b', 'c']).values()))
    3
  """
  out, used = {}, set()
  for label in labels:
    c = color(label)
    if c in used:  # a hash collision: take the first free palette color
      c = next((p for p in _PALETTE if p not in used), c)
    out[label] = c
    used.add(c)
  return out


def _finish(fig, ax, title, path, legend=True):
  if title:
    ax.set_title(title)
  if legend and ax.get_legend_handles_labels()[0]:
    ax.legend()
  fig.tight_layout()
  if path is not None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=150)
  return fig


def barrier_plot(alphas: Sequence[float],
                 curves: Mapping[str, Sequence[float]],
                 *,
                 ylabel: str = 'loss',
                 title: str | None = None,
                 path: str | None = None):
  """Metric along the path ``(1 - alpha) * theta_A + alpha * theta_B``.

  Args:
    alphas: interpolation coefficients (0 = model A, 1 = model B).
    curves: ``{label: values}``, e.g. ``{'naive': ..., 'permuted': ...}``.
    ylabel: the metric's name.
    title: the figure title.
    path: where to save a PNG, or None.

  Returns:
    The matplotlib Figure.

  Example:
    >>> from experiments.tools.plotting import barrier_plot
    >>> fig = barrier_plot([0, .5, 1], {'naive': [.1, .9, .1]})
  """
  plt = _plt()
  with plt.rc_context(_STYLE):
    fig, ax = plt.subplots()
    cs = colors(list(curves))
    for label, ys in curves.items():
      ax.plot(alphas, ys, marker='o', ms=3, label=label, color=cs[label])
    ax.set_xlabel(r'interpolation $\alpha$ (A $\to$ B)')
    ax.set_ylabel(ylabel)
    return _finish(fig, ax, title, path)


def pareto_front(xs: Sequence[float], ys: Sequence[float], *,
                 minimize_x: bool = True, maximize_y: bool = True) -> list[int]:
  """Indices of the non-dominated points, sorted by x.

  Example:
    >>> from experiments.tools.plotting import pareto_front
    >>> pareto_front([1, 2, 3], [0.5, 0.4, 0.9])
    [0, 2]
  """
  import mergejax as mj  # pylint: disable=g-import-not-at-top
  objectives = np.stack([np.asarray(xs, float) * (-1 if minimize_x else 1),
                         np.asarray(ys, float) * (1 if maximize_y else -1)], 1)
  front = np.flatnonzero(np.asarray(mj.search.pareto_mask(objectives)))
  return sorted(front.tolist(), key=lambda i: xs[i])


def fronts_plot(points: Mapping[str, Any], *, xlabel: str, ylabel: str,
                lines: Sequence[str] = (), title: str | None = None,
                path: str | None = None):
  """Point sets ``{label: [N, 2]}`` of two objectives in one scatter; the
  labels in ``lines`` are drawn as fronts (joined, sorted by x).

  Example:
    >>> from experiments.tools.plotting import fronts_plot
    >>> fig = fronts_plot({'grid': [[0, 1], [1, 0], [.2, .2]],
    ...                    'front': [[0, 1], [1, 0]]}, xlabel='task 1',
    ...                   ylabel='task 2', lines=['front'])
  """
  plt = _plt()
  with plt.rc_context(_STYLE):
    fig, ax = plt.subplots()
    cs = colors(list(points))
    for label, pts in points.items():
      pts = np.asarray(pts, float).reshape(-1, 2)
      if label in lines:
        pts = pts[np.argsort(pts[:, 0])]
        ax.plot(pts[:, 0], pts[:, 1], '.-', color=cs[label], lw=1.2, ms=4,
                label=label, zorder=3)
      else:
        ax.scatter(pts[:, 0], pts[:, 1], color=cs[label], s=6, alpha=0.35,
                   label=label, zorder=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return _finish(fig, ax, title, path)


def pareto_plot(points: Mapping[str, tuple[float, float]],
                *,
                xlabel: str,
                ylabel: str,
                minimize_x: bool = True,
                title: str | None = None,
                path: str | None = None):
  """Scatter of ``{label: (x, y)}`` with the Pareto front (higher y better).

  Example:
    >>> from experiments.tools.plotting import pareto_plot
    >>> fig = pareto_plot({'ties': (0.2, 0.8), 'ta': (1.0, 0.7)},
    ...                   xlabel='density', ylabel='acc')
  """
  plt = _plt()
  labels = list(points)
  xs = [points[k][0] for k in labels]
  ys = [points[k][1] for k in labels]
  with plt.rc_context(_STYLE):
    fig, ax = plt.subplots()
    cs = colors(labels)
    for label, x, y in zip(labels, xs, ys):
      ax.scatter([x], [y], color=cs[label], s=18, zorder=3)
      ax.annotate(label, (x, y), textcoords='offset points', xytext=(3, 3),
                  fontsize=7)
    front = pareto_front(xs, ys, minimize_x=minimize_x)
    ax.plot([xs[i] for i in front], [ys[i] for i in front], '--', color='0.4',
            lw=1, label='Pareto front')
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return _finish(fig, ax, title, path)


def sweep_plot(rows: Sequence[Mapping[str, Any]],
               x: str,
               y: str,
               *,
               group: str | None = None,
               logx: bool = False,
               title: str | None = None,
               path: str | None = None):
  """A metric ``y`` against a swept hyperparameter ``x`` from sweep rows.

  Args:
    rows: dicts, e.g. `hyper.run_sweep(...).rows`.
    x: the swept column, e.g. ``'merge.density'``.
    y: the metric column, e.g. ``'avg_norm_acc'``.
    group: a column whose values get one line each (e.g. ``'merge.method'``).
    logx: log-scale x axis.
    title: the figure title.
    path: where to save a PNG, or None.

  Example:
    >>> from experiments.tools.plotting import sweep_plot
    >>> rows = [{'d': 0.1, 'acc': 0.5}, {'d': 0.2, 'acc': 0.6}]
    >>> fig = sweep_plot(rows, 'd', 'acc')
  """
  plt = _plt()
  lines: dict[str, list[tuple[float, float]]] = {}
  for r in rows:
    if x in r and y in r:
      lines.setdefault(str(r.get(group, y)) if group else y, []).append(
          (float(r[x]), float(r[y])))
  with plt.rc_context(_STYLE):
    fig, ax = plt.subplots()
    # Series of one sweep are ordered (e.g. densities): a sequential colormap.
    cmap = plt.get_cmap('viridis')
    n = max(len(lines) - 1, 1)
    for i, (label, pts) in enumerate(lines.items()):
      pts.sort()
      c = cmap(0.9 * i / n) if len(lines) > 1 else color(label)
      ax.plot([p[0] for p in pts], [p[1] for p in pts], marker='o', ms=3,
              label=label, color=c)
    if logx:
      ax.set_xscale('log')
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    return _finish(fig, ax, title, path, legend=group is not None)


def task_table_plot(table: Mapping[str, Mapping[str, float]],
                    *,
                    title: str | None = None,
                    fmt: str = '{:.2f}',
                    path: str | None = None):
  """A methods x tasks heatmap with values printed in the cells.

  Args:
    table: ``{method: {task: value}}`` (missing cells are left blank).
    title: the figure title.
    fmt: format of the printed values.
    path: where to save a PNG, or None.

  Example:
    >>> from experiments.tools.plotting import task_table_plot
    >>> fig = task_table_plot({'ties': {'rot': .9, 'flip': .8},
    ...                        'ta': {'rot': .7, 'flip': .85}})
  """
  plt = _plt()
  methods = list(table)
  tasks = list(dict.fromkeys(t for m in methods for t in table[m]))
  data = np.full((len(methods), len(tasks)), np.nan)
  for i, m in enumerate(methods):
    for j, t in enumerate(tasks):
      if t in table[m]:
        data[i, j] = table[m][t]
  style = dict(_STYLE, **{'axes.grid': False})
  style['figure.figsize'] = (1.2 + 0.7 * len(tasks), 0.8 + 0.35 * len(methods))
  with plt.rc_context(style):
    fig, ax = plt.subplots()
    im = ax.imshow(data, cmap='viridis', aspect='auto')
    ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha='right')
    ax.set_yticks(range(len(methods)), methods)
    lo, hi = np.nanmin(data), np.nanmax(data)
    for i in range(len(methods)):
      for j in range(len(tasks)):
        if not np.isnan(data[i, j]):
          light = (data[i, j] - lo) < 0.5 * (hi - lo + 1e-12)
          ax.text(j, i, fmt.format(data[i, j]), ha='center', va='center',
                  fontsize=7, color='white' if light else 'black')
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return _finish(fig, ax, title, path, legend=False)
