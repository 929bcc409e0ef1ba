"""The plan of one fit, made once before any worker: the frozen config (``_config``), one row
per schedule (``_schedules``), how a batch becomes micro-batches (``_microbatch``), the
``Plan`` itself (``_plan``), its memory (``_memory``) and budget (``_budget``), the report a
user reads (``_report``), and the timeline of what the stages really did against it
(``_timeline``). No process machinery."""
