r"""The default experiment: a digits model zoo merged with every mergejax method.

A base MLP is pre-trained on generic augmentations of one part of scikit-learn's
8x8 digits; K = 8 copies are fine-tuned on distinct input transforms (three
rotations, two flips, transpose, inversion, a pixel permutation) of a disjoint
part. Backbones are merged; each task keeps its fine-tuned head. Every method
in `mergejax.methods` merges the zoo; scales (``lambda_``, ``t``) are swept in
one vmapped call and chosen on a validation split; test accuracy is reported.

Run (from the repository root):

  python -m experiments.main --config=configs/default.py --workdir=workdir

Tiny variant (seconds; used by the tests):

  python -m experiments.main --config=configs/default.py:smoke --workdir=/tmp/w

Override any field, e.g. the shared TIES-family density, or run a subset:

  python -m experiments.main --config=configs/default.py --workdir=workdir \
      --config.merge.density=0.3 --config.methods_to_run=ties,task_arithmetic

Each method is an entry ``config.methods.<name> = (kwargs, sweep, protocol)``:
``kwargs`` go to the factory ``mergejax.methods.<name>(**kwargs)``; ``sweep``
maps one numeric hyperparameter to its grid (vmapped, chosen on validation);
``protocol`` says which models the method sees:

* ``models``: the base and all K fine-tunes.
* ``no_base``: the K fine-tunes only (``base=None``), for methods defined on
  models rather than task vectors (``linear``, ``karcher``).
* ``sum_endpoint``: for methods of exactly one model plus the base (``slerp``,
  ``nearswap``, ``arcee_fusion``): the other end is the task-arithmetic sum
  ``theta_0 + sum_i tau_i``, and the method's own ``t`` plays the role of
  lambda (slerp: spherical task arithmetic; nearswap: task arithmetic with each
  entry of the summed task vector clipped to ``[-t, t]``).
* ``fold``: for methods of exactly two fine-tunes (``nuslerp``): an iterated
  pairwise merge ``m_1 = ft_1``, ``m_i = method(m_{i-1}, ft_i)`` with weights
  ``[i - 1, 1]``, i.e. the running (spherical) mean of the task vectors.
* ``per_task``: for methods that store per-task masks, scalars or bases and
  rebuild one model per task (``tall_masks``, ``emr``, ``reversible``): task
  ``i`` is evaluated with ``mergejax.methods.reconstruct(state, base, i)``.
* ``routed``: Twin-Merging with a trained router (``experiments/
  twin_routed.py``): the router (``mergejax.methods.twin_train_router``,
  settings in the entry's ``router`` field) learns task ids from the shared
  backbone's features of ``per_task`` labelled training inputs per task; each
  test input runs with its own mix ``theta* + sum_t w_t(x) v_t``. The oracle
  router (one-hot task weights) is reported as a ``<name>_oracle`` row.
* ``lora``: the methods see a LoRA zoo derived from the dense fine-tunes
  (``experiments.default.lora_zoo``): every matrix of each task vector
  ``tau_i = theta_i - theta_0`` is replaced by its best rank-``lora_rank``
  factorisation (truncated SVD, ``a = U sqrt(S)``, ``b = sqrt(S) V^T``); biases
  stay dense task vectors. LoRA factor merges (``lora_svd``, ``lora_lego``)
  merge the factor pairs (``mergejax.transforms.merge_lora``) and the merged adapter is
  added to the base; any other method (``factory``) merges the rank-r
  fine-tunes ``theta_0 + a_i b_i`` (``lora_ta``: task arithmetic on them, the
  reference that shows what the truncation alone costs).
* ``data``: data-informed merges (``fisher_merging``, ``regmean``,
  ``regmean_plusplus``, ``adamerging``, ``concrete``) of the
  fine-tunes, with statistics of each fine-tune on the first
  ``data.examples`` training inputs of its own task
  (``experiments.default.data_statistics``): diagonal Fishers of the
  classifier with the task's head (``data.fisher_kind``), the input Grams
  of the backbone's Dense layers (through the merged layers for
  RegMean++), AdaMerging's and Expert Merging's coefficients and the
  Concrete mask fitted on unlabeled validation inputs, or the fine-tunes'
  saved Adam second moments (OTA).
* ``surgery``: representation surgery (``fit_surgery``) on the merge of
  the method named by ``inner.name`` at its selected setting (run earlier):
  per-task adapters on the backbone features, fitted on unlabeled validation
  inputs.
* ``not_applicable``: listed but not run.

An optional ``factory`` names the `mergejax.methods` function when it differs
from the entry's name (``lora_ta`` runs ``task_arithmetic``). An optional
``inner = dict(arg=..., name=..., kwargs=...)`` passes another
method, ``mergejax.methods.<name>(**kwargs)``, as the factory's ``arg`` (e.g.
the merge whose update ``lines`` rescales).
"""

import ml_collections

from experiments.tools import config_files

# Methods in the order of the results table. Names not (yet) in
# `mergejax.methods` are skipped with a note at run time.
METHODS = (
    'linear', 'average', 'task_arithmetic', 'ties', 'dare_linear', 'dare_ties',
    'breadcrumbs', 'breadcrumbs_ties', 'della', 'della_linear', 'sce', 'magmax',
    'ram', 'ramplus_tl', 'model_stock', 'slerp', 'nuslerp', 'multislerp',
    'karcher', 'nearswap', 'arcee_fusion',
    # Subspace, mask and continual methods.
    'tsv', 'rtsvm', 'iso_c', 'iso_cts', 'knots', 'consensus', 'pcb', 'lines',
    'widen', 'wudi', 'wudi_closed_form', 'opcm', 'tall_masks', 'emr', 'twin',
    'reversible',
    # LoRA merges on the rank-r LoRA zoo derived from the fine-tunes.
    'lora_lego', 'lora_svd', 'lora_ta',
    # Data-informed merges (statistics on each task's training inputs).
    'fisher_merging', 'regmean', 'regmean_plusplus', 'adamerging', 'concrete',
    'concrete_adamerging',
    'expert_merging', 'expert_merging_short', 'expert_merging_plusplus',
    # Curvature from the fine-tunes' own Adam second moments.
    'ota', 'ota_no_graft', 'ota_compressed',
    # Representation surgery on two of the merges above.
    'surgery_ta', 'surgery_adamerging',
)

TASKS = ('rot90', 'rot180', 'rot270', 'hflip', 'vflip', 'transpose', 'invert',
         'permute')


def get_config(arg=None):
  """Returns the config; ``arg`` is a variant: None/'default' or 'smoke'."""
  smoke = config_files.is_smoke(arg)
  config = ml_collections.ConfigDict()
  config.experiment = 'default'  # the module experiments.<experiment>
  config.seed = 0
  config.progress = True  # tqdm bars (they switch off in non-interactive runs)
  config.strict = False  # re-raise a method's error instead of recording it
  # Host BLAS/LAPACK threads during the run (None: the library default). One
  # thread: OpenBLAS workers spin between XLA's SVD/QR calls, which on a
  # loaded 2-core machine made SVD-based merges tens of times slower.
  config.blas_threads = 1

  config.zoo = ml_collections.ConfigDict()
  config.zoo.tasks = ('rot90', 'invert', 'permute') if smoke else TASKS
  config.zoo.width = 32 if smoke else 512
  config.zoo.depth = 2
  config.zoo.data = dict(pretrain_frac=0.4, val_frac=0.1, test_frac=0.3)
  config.zoo.base = dict(
      steps=60 if smoke else 1000, batch_size=128, lr=3e-3 if smoke else 1e-3,
      weight_decay=0.0,
      augment_copies=1 if smoke else 8,
      augment=dict(max_shift=1, noise=0.1, contrast=0.2))
  config.zoo.finetune = dict(
      steps=30 if smoke else 400, batch_size=128, lr=1e-3 if smoke else 3e-4,
      head_lr=3e-3,
      weight_decay=0.0, fresh_head=False)

  # Shared merge settings, referenced by the method entries below, so that
  # --config.merge.density=0.3 changes every TIES-family method at once.
  config.merge = ml_collections.ConfigDict()
  config.merge.density = 0.2  # TIES paper's top-20%
  config.merge.gamma = 0.01  # breadcrumbs: fraction of outliers dropped
  config.merge.epsilon = 0.1  # della: spread of keep probabilities
  config.merge.lambdas = ((0.3, 1.0) if smoke else
                          (0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0, 1.5, 2.0,
                           3.0))
  config.merge.ts = (0.3, 1.0) if smoke else (0.1, 0.2, 0.3, 0.4, 0.5, 0.6,
                                              0.8, 1.0)
  # nearswap's t is a distance in parameter units (entries of the summed task
  # vector are a few 1e-3 here).
  config.merge.thresholds = (1e-3, 1e-2) if smoke else (5e-4, 1e-3, 2e-3, 5e-3,
                                                        1e-2, 2e-2, 5e-2)
  config.merge.params = 'backbone'  # merged subtree; heads stay per task
  # The tuning protocol: every hyperparameter an entry lists in ``tune``
  # (``name: (low, high, 'linear' | 'log')``) chosen on the validation split
  # among ``budget`` candidates (the default setting and random draws), the
  # same budget for every method, reported on test beside the default row.
  # 0 turns it off.
  config.tuning = ml_collections.ConfigDict()
  config.tuning.budget = 4 if smoke else 32
  config.tuning.seed = 0
  # Rank of the LoRA zoo (the 'lora' protocol): static, it sets the shapes.
  config.merge.lora_rank = 4 if smoke else 16

  m = config.merge
  density = m.get_ref('density')
  lam = dict(lambda_=m.get_ref('lambdas'))

  def entry(kwargs=None, sweep=None, protocol='models', inner=None,
            factory=None):
    e = dict(kwargs=kwargs or {}, sweep=sweep or {}, protocol=protocol)
    if inner:
      e['inner'] = inner
    if factory:
      e['factory'] = factory
    if protocol == 'lora':
      e['lora_rank'] = m.get_ref('lora_rank')
    return ml_collections.ConfigDict(e)

  k = len(config.zoo.tasks)
  methods = dict(
      linear=entry(protocol='no_base'),
      average=entry(),
      task_arithmetic=entry(sweep=lam),
      ties=entry(dict(density=density), lam),
      dare_linear=entry(dict(density=density), lam),
      dare_ties=entry(dict(density=density), lam),
      breadcrumbs=entry(dict(density=density, gamma=m.get_ref('gamma')), lam),
      breadcrumbs_ties=entry(dict(density=density, gamma=m.get_ref('gamma')),
                             lam),
      della=entry(dict(density=density, epsilon=m.get_ref('epsilon')), lam),
      della_linear=entry(dict(density=density, epsilon=m.get_ref('epsilon')),
                         lam),
      sce=entry(),
      magmax=entry(sweep=lam),
      ram=entry(),
      ramplus_tl=entry(),
      model_stock=entry(),
      slerp=entry(sweep=dict(t=m.get_ref('ts')), protocol='sum_endpoint'),
      nuslerp=entry(protocol='fold'),
      multislerp=entry(),
      karcher=entry(protocol='no_base'),
      nearswap=entry(sweep=dict(t=m.get_ref('thresholds')),
                     protocol='sum_endpoint'),
      arcee_fusion=entry(protocol='sum_endpoint'),
      tsv=entry(sweep=dict(alpha=m.get_ref('lambdas'))),
      rtsvm=entry(sweep=dict(alpha=m.get_ref('lambdas'))),
      iso_c=entry(sweep=dict(alpha=m.get_ref('lambdas'))),
      iso_cts=entry(sweep=dict(alpha=m.get_ref('lambdas'))),
      knots=entry(sweep=lam),
      consensus=entry(sweep=lam),
      pcb=entry(sweep=lam),
      # LiNeS rescales the update of an inner merge run at scale 1.
      lines=entry(sweep=dict(beta=m.get_ref('lambdas')),
                  inner=dict(arg='method', name='task_arithmetic', kwargs={})),
      widen=entry(),
      # WUDI as FusionBench runs it (Adam from the sum of task vectors, 400
      # steps at 1e-5, no scale), and the minimiser of the same loss.
      wudi=entry(),
      wudi_closed_form=entry(dict(solver='closed_form'), factory='wudi'),
      opcm=entry(),
      # Methods that store per-task information and rebuild one model per
      # task (`mergejax.methods.reconstruct`).
      tall_masks=entry(sweep=dict(tall_lambda=(0.2, 0.3, 0.4, 0.5, 0.6)),
                       protocol='per_task'),
      emr=entry(protocol='per_task'),
      # Twin-Merging with a router trained on 128 labelled inputs per task
      # (the one-hot oracle router is reported as a second row).
      twin=entry(protocol='routed'),
      reversible=entry(dict(budget=max(1, k // 2)), protocol='per_task'),
      # LoRA merges of the rank-r LoRA zoo (one adapter per task). lora_svd:
      # the best rank-r approximation of weights * sum_i a_i b_i (output rank
      # = input rank); lora_lego: k-means of the K r rank-one units into r
      # clusters, scaled by `scale`; lora_ta: task arithmetic on the rank-r
      # fine-tunes (no merge-side truncation), the reference for both.
      lora_lego=entry(sweep=dict(scale=m.get_ref('lambdas')), protocol='lora'),
      lora_svd=entry(sweep=dict(weights=m.get_ref('lambdas')),
                     protocol='lora'),
      lora_ta=entry(sweep=lam, protocol='lora', factory='task_arithmetic'),
      # FusionBench's defaults: 256 examples per task, batches of 32; RegMean
      # shrinks off-diagonal Gram entries by 0.95 (its CLIP setting).
      fisher_merging=entry(protocol='data'),
      regmean=entry(dict(alpha=0.95), protocol='data'),
      regmean_plusplus=entry(dict(alpha=0.95), protocol='data'),
      adamerging=entry(protocol='data'),
      # Concrete task arithmetic with FusionBench's settings (lambda 0.3,
      # logits from 0, temperature 0.5, Adam 1e-3, 2000 steps).
      concrete=entry(dict(lambda_=0.3), protocol='data'),
      # Concrete layer-wise AdaMerging, FusionBench's bi-level schedule
      # (1000 mask steps, then 1000 AdaMerging steps on the frozen mask).
      concrete_adamerging=entry(protocol='data'),
      # Expert Merging with the authors' loss settings (init 0.1, T 3,
      # hidden weight 0.1, L1 pull 0.1, clip 1) on the same inputs as
      # AdaMerging. With AdaMerging's budget (Adam 1e-3, 500 steps; the
      # `_short` row) its alignment loss is still falling at the end; the
      # main row trains until it levels off (Adam 1e-2, 2000 steps), a
      # label-free criterion, as the authors stop on the loss.
      expert_merging=entry(protocol='data', factory='adamerging'),
      expert_merging_short=entry(protocol='data', factory='adamerging'),
      # Expert Merging++: as expert_merging, then refitted with chunk-wise
      # coefficients, 8 extra per model over the backbone's 4 leaves (3 per
      # leaf on average; importance_chunks' allotment), set before any run.
      expert_merging_plusplus=entry(protocol='data', factory='adamerging'),
      # OTA with the authors' grafting density (0.1) and Adam's
      # preconditioner as weights (power 0.5); without grafting; and with
      # the rank-1 compressed second moments.
      ota=entry(protocol='data'),
      ota_no_graft=entry(dict(graft_density=None), protocol='data',
                         factory='ota'),
      ota_compressed=entry(dict(compress=True), protocol='data',
                           factory='ota'),
      surgery_ta=entry(
          protocol='surgery', factory='fit_surgery',
          inner=dict(arg='merge', name='task_arithmetic', kwargs={})),
      surgery_adamerging=entry(
          protocol='surgery', factory='fit_surgery',
          inner=dict(arg='merge', name='adamerging', kwargs={})),
  )
  methods['fisher_merging'].data = dict(stats='fisher', examples=256,
                                        batch_size=32, fisher_kind='exact')
  methods['regmean'].data = dict(stats='gram', examples=256, batch_size=32)
  methods['regmean_plusplus'].data = dict(stats='sequential', examples=256,
                                          batch_size=32)
  # Layer-wise AdaMerging with the paper's settings (init 0.3, Adam 1e-3,
  # 500 steps, coefficients clamped to [0, 1]), on unlabeled validation
  # inputs (the paper uses the unlabeled test inputs).
  methods['adamerging'].data = dict(stats='unlabeled', examples=128,
                                    batch_size=32, granularity='layer',
                                    init=0.3, steps=500, learning_rate=1e-3)
  methods['expert_merging'].data = dict(stats='expert', examples=128,
                                        batch_size=32,
                                        steps=20 if smoke else 2000,
                                        learning_rate=1e-2)
  methods['expert_merging_plusplus'].data = dict(
      methods['expert_merging'].data.to_dict(), chunk_budget=8,
      max_chunks=16)
  methods['expert_merging_short'].data = dict(stats='expert', examples=128,
                                              batch_size=32,
                                              steps=20 if smoke else 500,
                                              learning_rate=1e-3)
  for name in ('ota', 'ota_no_graft', 'ota_compressed'):
    methods[name].data = dict(stats='adam')
  methods['concrete_adamerging'].data = dict(
      stats='concrete_adamerging', examples=128, batch_size=32,
      steps=10 if smoke else 1000, adamerging_steps=10 if smoke else 1000,
      seed=0)
  methods['concrete'].data = dict(stats='concrete', examples=128,
                                  batch_size=32, steps=20 if smoke else 2000,
                                  learning_rate=1e-3, seed=0)
  # Representation surgery with FusionBench's settings (hidden width 16,
  # Adam 1e-3, 1000 steps) on unlabeled validation inputs (FusionBench uses
  # the unlabeled test inputs).
  for name in ('surgery_ta', 'surgery_adamerging'):
    methods[name].data = dict(examples=128, batch_size=32, hidden=16,
                              steps=20 if smoke else 1000, learning_rate=1e-3)
  methods['twin'].router = dict(per_task=128, hidden=(), steps=300,
                                learning_rate=1e-2)
  for name in METHODS:
    methods.setdefault(name, entry(sweep=lam))
  # Search spaces of the tuning protocol. Scales span the default grid's
  # range; densities the whole (0, 1].
  scale = (0.05, 3.0, 'log')
  tune = dict(
      task_arithmetic=dict(lambda_=scale),
      ties=dict(lambda_=scale, density=(0.05, 1.0, 'linear')),
      dare_linear=dict(lambda_=scale, density=(0.05, 1.0, 'linear')),
      dare_ties=dict(lambda_=scale, density=(0.05, 1.0, 'linear')),
      breadcrumbs=dict(lambda_=scale, density=(0.05, 1.0, 'linear'),
                       gamma=(0.001, 0.1, 'log')),
      breadcrumbs_ties=dict(lambda_=scale, density=(0.05, 1.0, 'linear'),
                            gamma=(0.001, 0.1, 'log')),
      della=dict(lambda_=scale, density=(0.05, 1.0, 'linear'),
                 epsilon=(0.01, 0.2, 'linear')),
      della_linear=dict(lambda_=scale, density=(0.05, 1.0, 'linear'),
                        epsilon=(0.01, 0.2, 'linear')),
      magmax=dict(lambda_=scale),
      slerp=dict(t=(0.05, 1.0, 'linear')),
      nearswap=dict(t=(1e-4, 0.1, 'log')),
      tsv=dict(alpha=scale),
      rtsvm=dict(alpha=scale, quantile=(0.9, 0.999, 'linear'),
                 energy=(0.8, 0.99, 'linear')),
      iso_c=dict(alpha=scale),
      iso_cts=dict(alpha=scale),
      knots=dict(lambda_=scale),
      consensus=dict(lambda_=scale, k=(1.0, float(k), 'linear'),
                     tall_lambda=(0.1, 1.0, 'linear')),
      pcb=dict(lambda_=scale, pcb_ratio=(0.02, 1.0, 'log')),
      lines=dict(beta=scale),
      tall_masks=dict(tall_lambda=(0.1, 1.0, 'linear')),
      lora_lego=dict(scale=scale),
      lora_svd=dict(weights=scale),
      lora_ta=dict(lambda_=scale),
  )
  for name, space in tune.items():
    methods[name].tune = space
  config.methods = ml_collections.ConfigDict(methods)
  # Comma-separated methods to run, in this order ('' runs every entry).
  # The smoke subset covers every protocol with methods that compile fast.
  config.methods_to_run = ('linear,task_arithmetic,ties,slerp,nuslerp,emr,lora_lego,'
                           'lora_svd,lora_ta,wudi,concrete,'
                           'concrete_adamerging,expert_merging,ota,'
                           'surgery_ta' if smoke else
                           ','.join(METHODS))
  return config
