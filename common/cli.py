"""What every command line shares: ``--version``, ``--print-config``, a renamed option's old spelling, and one
``error:`` line with exit code 2 for a user's mistake (``common.errors.end_of_command`` words it).

    parser = command_parser("python -m pretrain", description)  # --version; a parse mistake is a UsageError
    add_print_config(parser)  # on each (sub)command that takes a config: YAML of it on stdout, nothing runs
    return run_command(lambda: _run(parser, argv))  # USER_FACING -> one line on stderr and its exit code
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Iterable
from importlib import metadata
from typing import Any

from omegaconf import OmegaConf

import common
from common.config import config_values
from common.errors import USER_FACING, UsageError, end_of_command

DISTRIBUTION = "neurotransfer"


def package_version() -> str:
    """The installed distribution's version; a source tree on ``sys.path`` but never installed reports the
    version its ``common`` package records."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return common.__version__


class Parser(argparse.ArgumentParser):
    """argparse whose mistakes raise ``UsageError`` (one ``error:`` line and exit code 2 from ``run_command``)
    instead of printing a usage block; the parsers of its subcommands are of this class too."""

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


class _CurrentStderr(logging.StreamHandler):
    """A handler writing to whatever ``sys.stderr`` is when a record is logged: a CLI called in-process (tests,
    notebooks) must not keep a stream that its caller has since closed or replaced."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):  # StreamHandler.__init__ sets it
        pass


def log_to_stderr(
    level: int = logging.INFO, fmt: str = "%(asctime)s %(name)s %(levelname)s %(message)s", force: bool = False
) -> None:
    """The CLIs' logging: ``level`` and up to the current stderr (``logging.basicConfig``: nothing changes where
    the root logger has handlers already, unless ``force``, which replaces them)."""
    logging.basicConfig(level=level, format=fmt, handlers=[_CurrentStderr()], force=force)


def command_parser(prog: str, description: str, **kwargs: Any) -> Parser:
    """The top-level parser of a CLI, with ``--version`` (``neurotransfer X.Y.Z``)."""
    parser = Parser(prog=prog, description=description, **kwargs)
    parser.add_argument("--version", action="version", version=f"{DISTRIBUTION} {package_version()}")
    return parser


def add_print_config(
    parser: argparse.ArgumentParser, what: str = "the effective config (defaults, file, overrides: merged, checked)"
) -> None:
    """``--print-config``; a command without a config file prints its effective settings (``what``)."""
    parser.add_argument("--print-config", action="store_true", help=f"print {what} as YAML and run nothing")


def add_renamed_option(parser: argparse.ArgumentParser, old: str, new: str) -> None:
    """``old`` (hidden from ``--help``) still sets what ``new`` sets, warning on one line of stderr."""
    dest = new.lstrip("-").replace("-", "_")

    class Renamed(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            print(f"warning: {old} is deprecated; use {new}", file=sys.stderr)
            setattr(namespace, dest, values)

    parser.add_argument(old, dest=dest, action=Renamed, help=argparse.SUPPRESS)


def _rank() -> str | None:
    """This process's rank under a launcher of several (``deepspeed``, ``torchrun``), else None."""
    return os.environ.get("RANK", "?") if os.environ.get("WORLD_SIZE", "1") != "1" else None


def print_config(cfg: Any, leave_out: Iterable[str] = ()) -> int:
    """Write ``cfg`` (a loaded config, a schema instance, or a plain mapping of a command's settings) to stdout
    as YAML that ``--config`` reads back, without the dotted keys ``leave_out``; returns the exit code 0. Under
    a launcher of several ranks only rank 0 writes."""
    values = config_values(cfg)
    for key in leave_out:
        *parents, leaf = key.split(".")
        node = values
        for part in parents:
            node = node.get(part) or {}
        node.pop(leaf, None)
    if _rank() in (None, "0"):
        sys.stdout.write(OmegaConf.to_yaml(values))
    return 0


def run_command(command: Callable[[], int], resume: str = "rerun the same command to resume") -> int:
    """``command()``'s exit code, or, where it raises one of ``USER_FACING``, that error's one line on stderr
    and its exit code (2 for a mistake, 130 for Ctrl-C, ``resume`` saying how to go on). Under a launcher of
    several ranks the line ends with the rank."""
    try:
        return command()
    except USER_FACING as e:
        line, code = end_of_command(e, resume)
        rank = _rank()
        print(line if rank is None else f"{line} (rank {rank})", file=sys.stderr)
        return code
