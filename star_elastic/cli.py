"""`star-elastic` command line: a thin map from subcommand to library function.

Every subcommand writes progress and logs to standard error, so that a `--json` result on standard
output is one JSON object and nothing else.
"""

from __future__ import annotations

import argparse
import sys

from star_elastic.config import ConfigError


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="print a model's pattern, sizes and parameter counts")
    p.add_argument("path", help="model directory (config.json is enough; weights are not read)")
    p.add_argument("--json", action="store_true", help="print one JSON object on standard output")
    p.set_defaults(func=_run_info)


def _run_info(args: argparse.Namespace) -> int:
    from star_elastic.accounting import info_command

    return info_command(args.path, as_json=args.json)


SUBCOMMANDS = [_add_info]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="star-elastic", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"star-elastic {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
