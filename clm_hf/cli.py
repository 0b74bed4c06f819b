"""The ``clm-hf`` command line: ``demo``, ``train RECIPE.yaml`` and ``report RUN_DIR``.

Examples::

    clm-hf demo                                  # plain vs replay vs EWC on the synthetic suite
    clm-hf demo --strategies plain,ewc --output-dir runs/mine
    clm-hf demo --report-to none                 # no MLflow / TensorBoard runs even if installed
    clm-hf train recipes/ewc/tiny_gpt2.yaml --training.learning_rate 1e-3
    clm-hf train recipes/ewc/tiny_gpt2.yaml --resume runs/ewc
    clm-hf report runs/demo
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clm-hf", description="Continual learning for Hugging Face Transformers.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="Compare strategies on the synthetic suite with a tiny GPT-2 (a few minutes on CPU).")
    demo.add_argument("--strategies", default="plain,replay,ewc", help="Comma-separated names; 'plain' = no strategy, 'joint' = all tasks at once (upper bound).")
    demo.add_argument("--strategy", default=None, help="Run this one strategy next to plain fine-tuning.")
    demo.add_argument("--output-dir", default="runs/demo", help="Run folder (results.json and plots go here).")
    demo.add_argument("--quick", action="store_true", help="Smoke-test sizes (seconds, meaningless numbers).")
    demo.add_argument("--report-to", default="auto", metavar="{auto,none,mlflow,tensorboard}",
                      help="Trackers, comma-separated: 'auto' (default) = each of mlflow and tensorboard that is "
                           "installed, one run per strategy, stored under --output-dir (a set MLFLOW_TRACKING_URI "
                           "wins); 'none' = no tracking.")

    train = sub.add_parser("train", help="Train a task stream from a YAML recipe.")
    train.add_argument("recipe", help="Path to the YAML recipe.")
    train.add_argument("--resume", default=None, metavar="RUN_DIR",
                       help="Continue an interrupted run from its folder (its newest valid checkpoint), or from "
                            "one end-of-task checkpoint RUN_DIR/continual/task-XXX.")
    train.add_argument("--force-resume", action="store_true",
                       help="With --resume: go on even though strategy settings changed since the checkpoint.")
    train.add_argument("--restart-on-damage", action="store_true",
                       help="With --resume: if every checkpoint is damaged, train again from the first task "
                            "(without it, that is an error naming the damage).")

    report = sub.add_parser("report", help="Write plots (PNG) and tables for a run folder.")
    report.add_argument("run_dir", help="A folder with results.json (or sub-folders with one each).")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``clm-hf`` console script."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("httpx", "datasets", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.command != "train" and extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")

    if args.command == "demo":
        from .demo import parse_report_to, run_demo
        from .strategies.base import get_strategy_class

        names = [s.strip() for s in args.strategies.split(",") if s.strip()]
        if args.strategy:
            names = ["plain", args.strategy]
        for name in names:
            if name not in ("plain", "joint"):
                get_strategy_class(name)  # fail fast on a typo, with a suggestion
        try:
            parse_report_to(args.report_to)  # a bad tracker name fails before any training
        except ValueError as err:
            parser.error(str(err))
        run_demo(names, args.output_dir, quick=args.quick, report_to=args.report_to)
        return 0

    if args.command == "train":
        from .recipe import load_recipe, run_recipe

        try:
            recipe = load_recipe(args.recipe, extra)
        except FileNotFoundError as err:  # one line, not a traceback, and argparse's exit code
            print(f"clm-hf train: error: {err}", file=sys.stderr)
            return 2
        if args.force_resume and not args.resume:
            parser.error("--force-resume needs --resume RUN_DIR")
        if args.restart_on_damage and not args.resume:
            parser.error("--restart-on-damage needs --resume RUN_DIR")
        output_dir = None
        if args.resume:
            from .trainer import resolve_run_dir

            try:  # a checkpoint path resumes its run: new checkpoints go to the run folder, not inside it
                output_dir = str(resolve_run_dir(args.resume)[0])
            except ValueError as err:
                parser.error(str(err))
        results, trainer = run_recipe(recipe, resume=args.resume, output_dir=output_dir,
                                      force_resume=args.force_resume,
                                      restart_on_damage=args.restart_on_damage)
        print(results.format_table())
        print({k: (round(v, 4) if v is not None else None) for k, v in results.summary().items()})
        print(f"Results in {trainer.args.output_dir}/results.json")
        return 0

    if args.command == "report":
        from .plots import write_report

        for path in write_report(args.run_dir):
            print(path)
        return 0
    return 2  # unreachable: argparse requires a command


if __name__ == "__main__":
    sys.exit(main())
