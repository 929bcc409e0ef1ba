"""Training state as it moves: optimizer state and checkpoint parts keyed by names in the whole
network (``_named``), big states streamed tensor by tensor (``_stream``), and a network pickled
without a second copy of its weights (``_portable``)."""
