"""Where the stages live: the ``Runner`` interface (``_runner``), the table from launcher to
runner and the devices a fit holds (``_runners``), and one module per home: this process with
one stage (``_single``) or all stages (``_local``), spawned workers (``_spawn``), a torchrun job
(``_torchrun``); the optimizer callbacks step where the stages keep theirs elsewhere
(``_hyper``)."""
