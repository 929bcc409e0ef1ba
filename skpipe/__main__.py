"""``python -m skpipe``: the command line."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m skpipe",
        description="skpipe: scikit-learn estimators that train neural networks with pipeline "
        "parallelism.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="grid search over a pipelined classifier on the bundled penguins data",
        description="GridSearchCV(cv=5) over a ColumnTransformer -> PipeNetClassifier pipeline "
        "on the Palmer penguins data, printing progress, results, the best parameters and the "
        "cross-validated score.",
    )
    demo.add_argument("--n-stages", type=int, default=2, help="pipeline stages (default 2)")
    demo.add_argument(
        "--launcher",
        default="auto",
        choices=["auto", "spawn", "local", "torchrun"],
        help="where the stages run (default auto: worker processes)",
    )
    demo.add_argument("--max-epochs", type=int, default=30, help="epochs per fit (default 30)")
    demo.add_argument("--quiet", action="store_true", help="no progress display")
    demo.add_argument(
        "--timeline",
        default="skpipe-demo-timeline.png",
        help="where to save the timeline picture (default skpipe-demo-timeline.png; '' for none)",
    )
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "demo":
        from ._demo import run_demo

        run_demo(
            n_stages=args.n_stages,
            launcher=args.launcher,
            max_epochs=args.max_epochs,
            verbose=0 if args.quiet else 2,
            progress=not args.quiet,
            timeline_png=args.timeline or None,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
