"""The parameter and attribute sections both estimators' docstrings share (numpydoc)."""

PARAMETERS_DOC = """
    Parameters
    ----------
    module : nn.Module subclass or instance, default=skpipe.modules.MLP
        A class is built with the ``module__*`` parameters, plus ``n_features_in`` and
        ``n_outputs`` when its constructor declares them.
    criterion : nn.Module subclass or instance, default=None
        None means the estimator's default loss; ``criterion__*`` parameters are passed to a class.
    optimizer : callable, default=torch.optim.Adam
        Built as ``optimizer(params, lr=lr, **optimizer__*)``.
    lr : float, default=0.001
        Learning rate.
    max_epochs : int, default=100
        Passes over the training data.
    batch_size : int or 'all', default=64
        Rows per optimizer step.
    callbacks : list of skorch callbacks, default=None
        Run in this process, whatever the number of stages (``EpochScoring``,
        ``EarlyStopping``, ``PrintLog``...).
    train_split : callable, default=None
        A skorch split such as ``skorch.dataset.ValidSplit(5)``; None trains on all of X.
    warm_start : bool, default=False
        Continue from the fitted network (a new optimizer is built).
    random_state : int, RandomState or None, default=None
        Fixes weight initialisation and shuffling: two fits with the same seed are identical.
    verbose : int, default=0
        1 prints skorch's epoch table.
    devices : 'auto' or list of str, default='auto'
        One device per stage ('cpu', 'cuda:0', ...); with one stage the first is used. With
        replicas, one per (replica, stage): replica 0's stages first, then replica 1's, ...
    n_stages : int or 'auto', default=1
        Pipeline depth: the number of workers (devices) the network is split across. 'auto'
        (needs ``stage_memory_budget``): the fewest stages whose plan fits the budget.
    n_replicas : int, default=1
        Data-parallel copies of the pipeline (``n_replicas x n_stages`` workers). Each takes its
        share of every batch and their gradients are summed: the fit equals one device's at the
        same ``batch_size``. Needs ``launcher='spawn'``, ``'torchrun'`` or ``'auto'``.
    tensor_parallel : int, default=1
        Ranks each stage's layers are split over (tensor parallelism, torch's
        ``parallelize_module``): ``n_replicas x n_stages x tensor_parallel`` workers, a stage's
        shards on neighbouring ranks. For a layer too large for one device. skpipe's networks
        have plans built in; give ``tp_plan`` for your own.
    tp_plan : dict or None, default=None
        Which layers ``tensor_parallel`` splits, and how: submodule name (torch's patterns,
        e.g. ``'blocks.*.ffn.0'``) -> ``'colwise'``, ``'rowwise'``, ``'replicate'`` or a torch
        ``ParallelStyle``. None: the built-in plan of ``skpipe.modules``' networks.
    shard : {'none', 'optimizer', 'full'}, default='none'
        How the replicas hold their state: each a whole copy ('none'), or sharded over them
        with torch's FSDP2 ('optimizer': optimizer state and gradients, each layer's weights
        gathered from its forward to its backward; 'full': weights too, gathered per layer and
        let go after each forward and backward: ZeRO-3). Needs ``n_replicas >= 2``.
    n_microbatches : int or 'auto', default='auto'
        Micro-batches per batch; 'auto' picks the largest of 4p, 2p, p the schedule accepts.
    schedule : str, default='1f1b'
        'gpipe', '1f1b', 'interleaved_1f1b', 'looped_bfs', 'interleaved_zero_bubble', 'zbv'
        or 'dualpipev' (torch.distributed.pipelining's schedules); 'auto' lets the planner
        choose the schedule, micro-batch count and chunks from measurements (see :meth:`plan`).
        '2bw' and 'pipedream' are skpipe's asynchronous schedules: no flush between batches,
        and so not what one device trains (the rules are in the docs' pipelining page).
    chunks_per_stage : int or 'auto', default='auto'
        Model chunks per worker for the looped/interleaved schedules (2 for the V schedules).
    balance : 'uniform', 'parameters', 'time', 'auto' or list of int, default='uniform'
        How layers are divided among chunks; 'auto' lets the planner try the three rules (see
        ``schedule='auto'``).
    split_points : dict or None, default=None
        Where a network that is not an ``nn.Sequential`` may be cut, given from outside it:
        ``{'blocks.4': 'beginning', 'head': 'end'}`` (or torch's ``SplitPoint.BEGINNING`` /
        ``END``) runs ``pipe_split()`` before or after every call of those submodules; with
        the ``pipe_split()`` calls in ``forward``, they are the cut points (see "Training a
        network larger than one device").
    checkpoint : {'never', 'except_last', 'always'}, default='never'
        Activation recomputation per micro-batch, as torchgpipe defines the modes.
    launcher : {'auto', 'spawn', 'local', 'torchrun'}, default='auto'
        Where the stages live: worker processes, this process, or a torchrun job.
    precision : {'float32', 'bf16'}, default='float32'
        'bf16' runs the forward under bfloat16 autocast.
    max_grad_norm : float or None, default=None
        Clip gradients by their global norm across all stages.
    timeout : float, default=300.0
        Seconds the driver waits for a worker before declaring it hung.
    timeline_steps : int, default=0
        Record what each stage does during this many steps (from the second one) into
        ``timeline_`` (see :func:`skpipe.viz.plot_timeline`).
    stage_memory_budget : float or None, default=None
        Bytes each stage may hold; with ``n_microbatches='auto'`` the micro-batch count is raised
        until the estimated peak (parameters, gradients, optimizer state and the activations of
        the micro-batches in flight) fits, or ``fit`` says by how much it cannot.
    **kwargs : dict
        Prefixed parameters: ``module__*``, ``optimizer__*``, ``criterion__*``,
        ``iterator_train__*``, ``iterator_valid__*``, ``callbacks__*``.
"""

ATTRIBUTES_DOC = """
    module_ : nn.Module
        The whole trained network, on the CPU.
    criterion_ : nn.Module
        The loss the network was trained with.
    history_ : skorch.History
        Per epoch (and per batch): the losses and what the callbacks recorded.
    n_features_in_ : int
        Number of features seen during ``fit``.
    feature_names_in_ : ndarray of str
        Only when X had string column names.
    n_iter_ : int
        Epochs run.
    plan_ : PlanReport
        The plan the fit used (see :meth:`plan`).
    timeline_ : Timeline or None
        The recorded spans when ``timeline_steps > 0``.
    config_ : PipelineConfig
        The resolved configuration (micro-batch count, chunks, devices, launcher).
    optimizer_state_ : dict
        Only after ``partial_fit``: the optimizer's state (keyed by parameter name), which the
        next ``partial_fit`` continues from."""
