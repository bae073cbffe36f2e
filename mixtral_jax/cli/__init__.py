"""The `mixtral-jax` command line: one module per command group.

Exit codes: 0 success, 2 usage or input errors (one line on stderr, no traceback), 1 anything else.
"""

from __future__ import annotations

import logging
import os
import sys

from . import convert, evals, finetune, generate, plan, routing, serve, train
from .common import PROG, Parser, UsageError, init_distributed

_GROUPS = (convert, generate, evals, serve, plan, train, finetune, routing)
_LOGGERS = ("mixtral_jax", "mixtral_convert")


def build_parser() -> Parser:
    parser = Parser(prog=PROG, description="Mixtral sparse mixture-of-experts in JAX.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (this project's INFO messages)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for group in _GROUPS:
        group.add_parsers(sub)
    return parser


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        # --verbose is this project's progress: other libraries' INFO (orbax logs every array it
        # reads, JAX every backend it looks for) would bury it, so they stay at WARNING.
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        for name in _LOGGERS:
            logging.getLogger(name).setLevel(logging.INFO if args.verbose else logging.WARNING)
        if not init_distributed(args):
            return args.func(args)
        import jax

        rc = args.func(args)
        jax.distributed.shutdown()
        return rc
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as e:  # bad input files or values
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one line, not a traceback; MIXTRAL_JAX_DEBUG=1 for it
        if os.environ.get("MIXTRAL_JAX_DEBUG"):
            raise
        print(f"{PROG}: internal error: {type(e).__name__}: {e} (set MIXTRAL_JAX_DEBUG=1 for a traceback)",
              file=sys.stderr)
        return 1
