"""Train a pipelined classifier across processes started by torchrun.

Run on one machine with two CPU processes (one stage each)::

    torchrun --nproc-per-node 2 examples/torchrun_pipeline.py

or with four: two replicas of the 2-stage pipeline, each taking half of every batch::

    torchrun --nproc-per-node 4 examples/torchrun_pipeline.py --replicas 2

Every rank runs this same script: each holds its own stage of the network, all ranks walk the
same batches, and after ``fit`` every rank holds the whole trained network in ``module_``. On a
cluster, start it with your launcher's torchrun line (``--nnodes``, ``--rdzv-endpoint``) and set
``devices`` to the GPUs; nothing else changes.
"""

from __future__ import annotations

import argparse
import sys

import torch.distributed as dist
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline

from skpipe import PipeNetClassifier
from skpipe.datasets import load_penguins, penguin_preprocessor


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-epochs", type=int, default=20)
    parser.add_argument("--schedule", default="1f1b")
    parser.add_argument("--replicas", type=int, default=1, help="data-parallel pipelines")
    args = parser.parse_args()

    dist.init_process_group("gloo")  # torchrun set RANK, WORLD_SIZE, MASTER_ADDR/PORT
    rank, world = dist.get_rank(), dist.get_world_size()
    n_stages = world // args.replicas  # the job's processes: replicas x stages
    X, y = load_penguins(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(X, y, random_state=0, stratify=y)
    net = PipeNetClassifier(
        lr=0.01,
        batch_size=32,
        random_state=0,
        n_stages=n_stages,
        n_replicas=args.replicas,
        launcher="torchrun",
        schedule=args.schedule,
        n_microbatches=2 * n_stages,
        max_epochs=args.max_epochs,
    )
    pipe = make_pipeline(penguin_preprocessor(), net)
    pipe.fit(X_train, y_train)
    accuracy = pipe.score(X_test, y_test)
    net = pipe[-1]
    # one write per line: the ranks share this output, and a line written in pieces interleaves
    sys.stdout.write(
        f"rank {rank}/{world}: final train loss {net.history_[-1, 'train_loss']:.4f}, "
        f"test accuracy {accuracy:.4f}\n"
    )
    sys.stdout.flush()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
