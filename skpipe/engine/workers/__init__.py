"""The processes that host stages: the pool of warm workers and their channel (``_pool``), the
driver <-> worker messages (``_protocol``), the worker's entry point (``_worker_main``), and the
stages one process hosts with torch's schedule and the optimizer (``_stage``), each chunk as a
stage runs it (``_chunk``). Only the runners import this part."""
