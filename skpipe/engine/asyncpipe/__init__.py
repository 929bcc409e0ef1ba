"""The asynchronous schedules (PipeDream-2BW, PipeDream): the one executor skpipe owns, since
torch ships none. ``_ticks``: the pure order of work per stage across batch boundaries, with
the weight version each action uses; ``_inprocess``: that order run with every stage in one
process (a reference for the rules); ``_executor``: one stage per process, in a thread of its
own, on torch's point-to-point communication (what the stage hosts run)."""
