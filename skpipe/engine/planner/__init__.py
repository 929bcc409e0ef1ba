"""Choosing a layout: measure the layers and messages (``_measure``), replay torch's per-rank
orders of work with those costs (``_simulate``, pure), and choose and advise (``_planner``).
Never imports a runner or a worker."""
