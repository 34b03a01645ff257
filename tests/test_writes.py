"""The one write path (glmkit/run/writes.py): what each library's failure becomes, partial folders, the log's note.

Real full disks are in tests/test_real_faults.py; these pin the rules in-process, in milliseconds.
"""

import errno
import os

import pytest

from glmkit.run.logs import RunLogs
from glmkit.run.writes import NO_SPACE, WriteFailed, cause_of, guarded_write


def test_each_librarys_failure_names_its_real_cause(tmp_path):
    path = str(tmp_path / "x")
    assert cause_of(OSError(errno.ENOSPC, "No space left on device"), path) == NO_SPACE
    assert cause_of(RuntimeError("safetensors: ... No space left on device (os error 28)"), path) == NO_SPACE
    wrapped = RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 320 vs 214")
    wrapped.__cause__ = OSError(errno.ENOSPC, "No space left on device")
    assert cause_of(wrapped, path) == NO_SPACE
    assert cause_of(PermissionError(errno.EACCES, "Permission denied"), path) == "permission denied"
    # torch.save's bare message on a disk with room: the message itself, shortened, with its type
    assert cause_of(RuntimeError("basic_ios::clear: iostream error\nmore"), path) == "RuntimeError: basic_ios::clear: iostream error"
    assert len(cause_of(ValueError("v" * 5000), path)) < 220


def test_a_failed_write_removes_its_partial_folder_and_says_one_line(tmp_path):
    partial = tmp_path / "out.tmp"
    partial.mkdir()
    (partial / "half").write_bytes(b"x")
    with pytest.raises(WriteFailed) as caught:
        with guarded_write("the thing", str(tmp_path / "out"), partial=str(partial), intact="the rest is intact",
                           fix="rerun"):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert str(caught.value) == (f"could not write the thing {tmp_path / 'out'}: no space left on device; the rest is "
                                 f"intact; free space on the disk holding {tmp_path / 'out'}, then rerun")
    assert not partial.exists()
    with pytest.raises(KeyError):  # the writer's own errors pass, the partial folder still goes
        partial.mkdir()
        with guarded_write("the thing", str(tmp_path / "out"), partial=str(partial), passes=(KeyError,)):
            raise KeyError("own")
    assert not partial.exists()


def test_error_record_that_cannot_be_written_is_noted_on_stderr(tmp_path, capsys):
    logs_dir = tmp_path / "logs"
    logs_dir.write_text("a file where the logs folder belongs")
    RunLogs(str(logs_dir), enabled=False).error(RuntimeError("boom"), 3, 0)
    err = capsys.readouterr().err
    assert err.startswith(f"note: the error record could not be written to {logs_dir / 'error_log.jsonl'} (")
    assert os.path.isfile(logs_dir)
