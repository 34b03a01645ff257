"""`accelerate launch` that hands back the trainer's exit status instead of a launcher traceback.

    python -m glmkit.launch.accelerate [accelerate launch options] train_qlora.py [trainer options]

When the trainer exits non-zero, accelerate 1.15 raises: `subprocess.CalledProcessError` with one
process, torch's `ChildFailedError` with several. A one-line refusal from train_qlora.py (exit 2)
then came wrapped in a 20-40 line traceback, and the launcher exited 1. The trainer has already said
what went wrong, so this returns its status unchanged (2 stays 2) and adds nothing for a refusal;
for any other failure it adds one line naming the rank and status. launch_training.sh runs this.

SIGHUP (the terminal hung up: a dropped SSH session) is forwarded to the trainer processes, which save a
checkpoint at the next step boundary and exit 0 (glmkit/train/preemption.py); the launcher points its
output away from the gone terminal and waits for them, so the run ends as a preemption, not a kill.
torch elastic would forward it too, but then gives the ranks only TORCH_ELASTIC_SHUTDOWN_TIMEOUT
(30 s) to save before SIGKILL and leaves with a traceback; it keeps SIGTERM, SIGINT and SIGQUIT, and a
launcher stopped by one of those says so in one line.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys

from glmkit.run.hangup import detach_from_terminal, terminal_fds

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


def children(pid: int) -> list[int]:
    """The processes `pid` started (the trainer, or every local rank), from /proc."""
    found = []
    for task in os.listdir(f"/proc/{pid}/task") if os.path.isdir(f"/proc/{pid}/task") else []:
        with contextlib.suppress(OSError, ValueError):
            with open(f"/proc/{pid}/task/{task}/children", encoding="ascii") as fh:
                found += [int(child) for child in fh.read().split()]
    return found


def forward_hangup() -> None:
    """On SIGHUP: stop writing to the gone terminal, and pass the signal on to every trainer process."""
    terminal = terminal_fds()  # noted now: after the hangup the terminal no longer says it is one

    def handle(signum, frame):
        detach_from_terminal(terminal)
        for child in children(os.getpid()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGHUP)

    # torch elastic (several processes) would install its own SIGHUP handler over this one (or over `nohup`'s).
    os.environ.setdefault("PET_SIGNALS_TO_HANDLE", "SIGTERM,SIGINT,SIGQUIT")
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:  # under `nohup` the run outlives the terminal
        signal.signal(signal.SIGHUP, handle)


class ProcessKilled(RuntimeError):
    """A trainer process ended by a signal: it could write nothing itself, so the launcher records it."""


def first_failure(exc) -> tuple[int, object]:
    """(rank, ProcessFailure) to name: the first process killed by a signal (the cause: its peers only lost
    their connection to it), else the first failure."""
    killed = sorted((failure.timestamp, rank) for rank, failure in exc.failures.items() if failure.exitcode < 0)
    if killed:
        return killed[0][1], exc.failures[killed[0][1]]
    return exc.get_first_failure()


def record_in_run_log(trainer_args: list[str], rank: int, message: str) -> None:
    """Append the error record a killed process could not write to the run's error log (the dashboard's Errors
    panel and its "crashed" status read it), at the run's last logged step. Best effort: quiet on any problem."""
    import argparse
    import json

    from glmkit.config.cli import add_config_arguments, config_from_args
    from glmkit.run.logs import LOG_FILES, RunLogs

    with contextlib.suppress(Exception, SystemExit):
        parser = argparse.ArgumentParser(add_help=False)
        add_config_arguments(parser)
        cfg = config_from_args(parser.parse_known_args(trainer_args)[0])
        step = None
        with contextlib.suppress(OSError, ValueError, KeyError, IndexError):
            with open(os.path.join(cfg.logs_dir, LOG_FILES["train"]), "rb") as fh:
                fh.seek(max(0, fh.seek(0, os.SEEK_END) - 65536))
                step = json.loads(fh.read().splitlines()[-1])["step"]
        RunLogs(cfg.logs_dir, enabled=False).error(ProcessKilled(message), step, rank)


def say(line: str) -> None:
    with contextlib.suppress(OSError):  # stderr may be a terminal that is gone
        print(line, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args(argv)
    forward_hangup()
    try:
        launch_command(args)
        return 0
    except subprocess.CalledProcessError as exc:
        rank, status, pid = 0, exc.returncode, None
    except ChildFailedError as exc:
        rank, failure = first_failure(exc)
        status, pid = failure.exitcode, failure.pid
    except SignalException as exc:  # torch elastic passed SIGTERM/SIGINT on and waited for the trainer processes
        name = signal.Signals(exc.sigval).name
        say(f"launch: stopped by {name}: the trainer processes were sent {name} (each saves a checkpoint at its "
            f"next step boundary, or was killed after TORCH_ELASTIC_SHUTDOWN_TIMEOUT); relaunch to continue")
        return 128 + int(exc.sigval)
    if status < 0:  # killed: it wrote nothing, and its peers only saw a broken connection
        message = (f"rank {rank}{f' (pid {pid})' if pid else ''} {describe(status)}: a killed process writes nothing "
                   f"itself (out of memory? `dmesg | grep -i kill` lists the kernel's kills); the other processes "
                   f"stopped with it; relaunch to resume from the latest complete checkpoint")
        say(f"launch: {message}")
        if os.path.basename(args.training_script) == "train_qlora.py":
            record_in_run_log(args.training_script_args, rank, message)
    elif status != USER_ERROR:
        say(f"launch: the trainer (rank {rank}) {describe(status)}; its own output is above")
    return shell_status(status) or 1


if __name__ == "__main__":
    sys.exit(main())
