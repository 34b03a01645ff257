"""`accelerate launch` that hands back the trainer's exit status instead of a launcher traceback.

    python -m glmkit.launch.accelerate [accelerate launch options] train_qlora.py [trainer options]

When the trainer exits non-zero, accelerate 1.15 raises: `subprocess.CalledProcessError` with one
process, torch's `ChildFailedError` with several. A one-line refusal from train_qlora.py (exit 2)
then came wrapped in a 20-40 line traceback, and the launcher exited 1. The trainer has already said
what went wrong, so this returns its status unchanged (2 stays 2) and adds nothing for a refusal;
for any other failure it adds one line naming the rank and status. launch_training.sh runs this.
"""

from __future__ import annotations

import signal
import subprocess
import sys

USER_ERROR = 2  # train_qlora.py's "bad input, explained in one line" status


def describe(status: int) -> str:
    """"exited with status N", or "was killed by SIGX" (a negative status is a signal, as in subprocess)."""
    if status < 0:
        try:
            return f"was killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"was killed by signal {-status}"
    return f"exited with status {status}"


def shell_status(status: int) -> int:
    """What a shell reports for the child: its status, or 128 + the signal that killed it."""
    return 128 - status if status < 0 else status


def main(argv: list[str] | None = None) -> int:
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args(argv)
    try:
        launch_command(args)
        return 0
    except subprocess.CalledProcessError as exc:
        rank, status = 0, exc.returncode
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        status = failure.exitcode
    if status != USER_ERROR:
        print(f"launch: the trainer (rank {rank}) {describe(status)}; its own output is above", file=sys.stderr)
    return shell_status(status) or 1


if __name__ == "__main__":
    sys.exit(main())
