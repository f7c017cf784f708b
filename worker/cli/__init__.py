"""``python -m worker`` (also ``llm-worker``): run a worker, ask one question, inspect budgets,
inspect and replay dead letters. One module per command group; global options (``--config``)
are accepted before or after the subcommand.

Exit codes: 0 done; 1 the command ran and failed (a request not ``ok``, a dead letter not found,
a replay not confirmed, the broker or Redis unreachable or refusing the login); 2 a configuration
error or bad usage (one line naming the file and key, the request field, or argparse's usage
line); 130 interrupted; 141 the reader of the output went away (``dlq list | head -1``), as for
any tool a closed pipe stops. Every error is one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from worker.cli import budget, dlq, embed, run
from worker.client import InvalidRequest, LLMClientError
from worker.errors import ConfigError, WorkerError
from worker.text import printable

EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a tool a closed pipe stopped


def cmd_schemas(args: argparse.Namespace) -> int:
    from worker.contract import check_schemas, write_schemas

    folder = Path(args.out)
    if args.check:
        stale = check_schemas(folder)
        for name in stale:
            print(
                f"{folder / name} is out of date: run 'python -m worker schemas' and commit it",
                file=sys.stderr,
            )
        return 1 if stale else 0
    for path in write_schemas(folder):
        print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    config_help = "config folder (default: $WORKER_CONFIG_DIR, else ./config)"
    parser = argparse.ArgumentParser(prog="llm-worker", description="LLM calls for agents over RabbitMQ.")
    parser.add_argument("--config", type=Path, default=None, help=config_help)
    # The same option after a subcommand; SUPPRESS keeps an absent one from hiding the first.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, default=argparse.SUPPRESS, help=config_help)
    sub = parser.add_subparsers(dest="command", required=True)
    run.add_commands(sub, common)
    embed.add_commands(sub, common)
    budget.add_commands(sub, common)
    dlq.add_commands(sub, common)
    schemas = sub.add_parser("schemas", help="write the JSON Schema and AsyncAPI files")
    schemas.add_argument("--out", default=str(Path(__file__).resolve().parent.parent.parent / "schemas"))
    schemas.add_argument("--check", action="store_true", help="exit 1 when the files differ from the models")
    schemas.set_defaults(func=cmd_schemas)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Libraries' warnings (aio-pika's "error when creating transport") would add a second line,
    # with the broker library's wording, to the one below; ``run`` sets up its own log lines.
    logging.getLogger().addHandler(logging.NullHandler())
    try:
        code: int = args.func(args)
        sys.stdout.flush()  # here, where a closed pipe can still be told apart (below)
    except ConfigError as exc:
        print(printable(f"config error: {exc}"), file=sys.stderr)
        return 2
    except InvalidRequest as exc:
        print(printable(f"invalid request: {exc}"), file=sys.stderr)
        return 2
    except (WorkerError, LLMClientError) as exc:
        print(printable(f"error: {exc}"), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Nothing more can be written; point stdout at /dev/null so the exit's flush is silent.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    return code


if __name__ == "__main__":
    sys.exit(main())
