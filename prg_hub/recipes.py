"""Recipes: a YAML file of a training script's options, given as `--config recipe.yaml`.

The keys are the option names without `--` (`train_batch_size: 128`); options given on the command line override
the recipe. The recipes of the paper's runs are in `examples/configs`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml


def parse_args_with_recipe(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line on top of an optional YAML recipe given as `--config`.

    Raises a parser error naming any recipe key that is not an option of the script (listing the options) and any
    value outside an option's choices.
    """
    parser.add_argument(
        "--config", default=None, help="YAML recipe (see examples/configs); the command line overrides it."
    )
    recipe_parser = argparse.ArgumentParser(add_help=False)
    recipe_parser.add_argument("--config", default=None)
    recipe_path = recipe_parser.parse_known_args(argv)[0].config
    if recipe_path is not None:
        recipe = yaml.safe_load(Path(recipe_path).read_text(encoding="utf-8")) or {}
        options = {action.dest: action for action in parser._actions if action.dest != "help"}
        unknown = sorted(set(recipe) - set(options))
        if unknown:
            parser.error(f"{recipe_path}: unknown options {unknown}; the options are {sorted(options)}.")
        for key, value in recipe.items():
            if options[key].choices is not None and value not in options[key].choices:
                parser.error(f"{recipe_path}: {key} = {value!r} is not one of {list(options[key].choices)}.")
            options[key].required = False
        parser.set_defaults(**recipe)
    return parser.parse_args(argv)
