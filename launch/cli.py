"""The ``regrow`` command: ``regrow train``, ``demo`` (``train_cli.py``), ``chaos`` (``chaos_cli.py``), ``ray``
(``ray_cli.py``), ``run SCRIPT`` (``script_cli.py``), ``ckpt ...`` (``ckpt_cli.py``) and ``data prepare``
(``data_cli.py``).

The command line is parsed into typed options (``parser.py``, ``options.py``) and validated as a whole before
anything starts (``job.py``): every argument problem is reported at once, with exit code 2.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

from regrow.launch import chaos_cli, ckpt_cli, data_cli, ray_cli, script_cli, train_cli
from regrow.launch.job import ConfigErrors, Job, build_job
from regrow.launch.parser import build_parser, options_from_args

COMMANDS: dict[str, Callable[[Job], int]] = {
    "train": train_cli.run, "demo": train_cli.run, "chaos": chaos_cli.run, "ray": ray_cli.run,
}
"""The training sub-commands, each run with its validated job (``regrow ckpt`` and ``regrow data`` take their own
arguments)."""


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        return script_cli.main(args, options_from_args(args))
    if args.command == "ckpt":
        try:
            return ckpt_cli.main(args)
        except BrokenPipeError:  # e.g. `regrow ckpt inspect DIR | head`: the reader left; not an error of ours
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
    if args.command == "data":
        return data_cli.main(args)
    options = options_from_args(args)
    try:
        job = build_job(options)
    except ConfigErrors as error:
        print(f"regrow {options.command}: {error}", file=sys.stderr)
        return 2
    return COMMANDS[options.command](job)


if __name__ == "__main__":
    raise SystemExit(main())
