"""A network cut into the layers the stages hold: a Sequential flattened and balanced
(``_partition``); ``forward`` code cut where it may be (``_marks``: torch's ``pipe_split()`` and
``split_points``), traced by torch.fx (``_trace``), its graph cut into the pieces' code with what
crosses each mark checked (``_cut``), the pieces bound to the network's own tensors
(``_pieces``); and networks built on the meta device with each process replaying only its own
layers' values (``_construct``). No process machinery."""
