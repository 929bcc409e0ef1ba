"""A network cut into the layers the stages hold: a Sequential flattened and balanced
(``_partition``), ``forward`` code traced and cut at its ``pipe_split()`` marks (``_trace``) into
pieces (``_pieces``), and networks built on the meta device with each process replaying only
its own layers' values (``_construct``). No process machinery."""
