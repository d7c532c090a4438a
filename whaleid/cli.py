"""Shared command line of the numbered scripts: `--config` overlays, `--set` overrides, clean errors."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from whaleid.config import Config, load_config
from whaleid.errors import UserError


def build_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", action="append", default=[], metavar="YAML",
                   help="overlay file deep-merged over config.yaml (repeatable)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets",
                   help="override one key, e.g. --set train.epochs=3 (repeatable, type-checked)")
    return p


def one_line(err: UserError) -> str:
    """The message of a UserError. One raised in a DataLoader worker comes back re-wrapped by
    torch with the worker's traceback in its message; its last line is the original sentence.
    Any other message is kept whole (some carry a tool's output below their sentence)."""
    text = str(err)
    if "Traceback" not in text:
        return text
    return text.rstrip().splitlines()[-1].removeprefix(f"{UserError.__module__}.{UserError.__name__}: ")


def run_stage(
    description: str,
    stage: Callable[[Config, argparse.Namespace], object],
    add_args: Callable[[argparse.ArgumentParser], None] | None = None,
) -> None:
    """Parse arguments, load the config and call `stage(cfg, args)`.

    A UserError (a problem in the user's data or settings) becomes one line on stderr and exit
    status 2, not a traceback.
    """
    p = build_parser(description)
    if add_args is not None:
        add_args(p)
    args = p.parse_args()
    try:
        cfg = load_config(args.config, args.sets)
        stage(cfg, args)
    except UserError as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: finished artifacts are kept; rerun the stage to finish (stage 02: with --resume, "
              "to continue from last.pt)", file=sys.stderr)
        sys.exit(130)
