"""The ``clm-hf`` command line: ``demo``, ``train RECIPE.yaml`` and ``report RUN_DIR``.

Examples::

    clm-hf demo                                  # plain vs replay vs EWC on the synthetic suite
    clm-hf demo --strategies plain,ewc --output-dir runs/mine
    clm-hf demo --report-to none                 # no MLflow / TensorBoard runs even if installed
    clm-hf train recipes/ewc/tiny_gpt2.yaml --training.learning_rate 1e-3
    clm-hf train recipes/ewc/tiny_gpt2.yaml --resume runs/ewc
    clm-hf report runs/demo

A mistake of the user's (a missing recipe, a wrong key or value, a bad override, a damaged
checkpoint) is one line ``clm-hf: error: ...`` on stderr and exit code 2; ``clm-hf --traceback ...``
shows the full trace instead. Anything else is a bug and keeps its traceback. The heavy libraries
(torch, transformers, datasets) are imported only once a command runs, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

_OVERRIDES_HELP = """\
overrides:
  Any recipe key can be changed on the command line as --section.key value (or
  --section.key=value); the value is read as YAML, and list entries are numbered:
    clm-hf train recipes/ewc/tiny_gpt2.yaml --training.learning_rate 1e-3 \\
        --strategies.0.ewc_lambda 50 --tasks.num_train 64 --training.report_to=none
  Sections: model, tasks, strategies, training (any TrainingArguments field), reference,
  trainer (continual, or sft for TRL's SFTTrainer: --trainer sft).
"""


class UserError(Exception):
    """A mistake in what the user asked for: reported as one line and exit code 2, without a traceback."""


def _user_error_types() -> tuple[type[BaseException], ...]:
    # ValueError covers RecipeError, CheckpointError and the validation errors, which name the key, the
    # task or the file at fault; these modules are loaded by then, so the look-up costs nothing.
    import yaml

    types: list[type[BaseException]] = [UserError, ValueError, FileNotFoundError, yaml.YAMLError]
    state = sys.modules.get("clm_hf.state")
    if state is not None:
        types.append(state.RunLockError)  # another process holds the run folder
        types.append(state.OutputDirInUseError)  # a new run in a folder holding another run's checkpoints
    packnet = sys.modules.get("clm_hf.strategies.packnet")
    if packnet is not None:
        types.append(packnet.PackNetCapacityError)  # more tasks than the capacity the config leaves
    return tuple(types)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clm-hf", description="Continual learning for Hugging Face Transformers.",
                                     epilog=_OVERRIDES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--traceback", action="store_true",
                        help="On an error in the user's input, show the full traceback instead of one line.")
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

    train = sub.add_parser("train", help="Train a task stream from a YAML recipe (override any key: --section.key value).",
                           usage="clm-hf train RECIPE.yaml [--resume RUN_DIR] [--section.key value ...]",
                           epilog=_OVERRIDES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    """Entry point of the ``clm-hf`` console script.

    Args:
        argv (`Sequence[str]`, *optional*): The arguments; ``sys.argv[1:]`` when not given.

    Returns:
        `int`: The exit code: 0 on success, 2 for a mistake in the user's input (printed as one line).

    Example:

    ```python
    >>> from clm_hf.cli import main
    >>> main(["train", "no/such/recipe.yaml"])
    2

    ```
    """
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from ._logging import set_verbosity

    set_verbosity(logging.INFO)  # clm-hf's progress lines; a recipe's training.log_level still decides
    if args.command != "train" and extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return _run(args, extra)
    except BaseException as err:
        if args.traceback or not isinstance(err, _user_error_types()):
            raise
        message = " ".join(str(err).split()) or type(err).__name__  # one line, whatever the message's layout
        print(f"clm-hf: error: {message}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace, extra: list[str]) -> int:
    if args.command == "demo":
        from .demo import parse_report_to, run_demo
        from .strategies.base import get_strategy_class

        names = [s.strip() for s in args.strategies.split(",") if s.strip()]
        if args.strategy:
            names = ["plain", args.strategy]
        for name in names:
            if name not in ("plain", "joint"):
                get_strategy_class(name)  # fail fast on a typo, with a suggestion
        parse_report_to(args.report_to)  # a bad tracker name fails before any training
        run_demo(names, args.output_dir, quick=args.quick, report_to=args.report_to)
        return 0

    if args.command == "train":
        from .recipe import load_recipe, run_recipe

        recipe = load_recipe(args.recipe, extra)
        if args.force_resume and not args.resume:
            raise UserError("--force-resume needs --resume RUN_DIR")
        if args.restart_on_damage and not args.resume:
            raise UserError("--restart-on-damage needs --resume RUN_DIR")
        output_dir = None
        if args.resume:
            from .trainer import resolve_run_dir

            # A checkpoint path resumes its run: new checkpoints go to the run folder, not inside it.
            output_dir = str(resolve_run_dir(args.resume)[0])
        from .demo import _quiet_datasets

        # The Trainer's bars (training, per-task scoring) only: no `datasets` bars for tokenizing,
        # casting or saving rows in between, as in the demo.
        with _quiet_datasets():
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
