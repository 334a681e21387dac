"""`io.atomic_dir` / `atomic_file`: a writer killed at any point never loses the previous output,
its leftovers are swept by the next run, and what is reported written is fsynced (file and directory)."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from duomem_mlx import io
from duomem_mlx.errors import DuomemError
from duomem_mlx.io import atomic_dir, check_destination, write_atomic

CHILD = """
import os, signal, sys
from pathlib import Path
from duomem_mlx import io
out, when = Path(sys.argv[1]), sys.argv[2]
replace = os.replace

def killed_after_first_rename(src, dst):
    replace(src, dst)
    if ".old-" in str(dst):  # OUT swapped out, the new one not yet in place
        os.kill(os.getpid(), signal.SIGKILL)

os.replace = killed_after_first_rename
with io.atomic_dir(out) as tmp:
    (tmp / "weights").write_text("new")
    if when == "work":
        os.kill(os.getpid(), signal.SIGKILL)
"""


def killed_writer(out, when: str) -> int:
    """atomic_dir(out) in a child that SIGKILLs itself between the renames ('rename') or during the work ('work')."""
    child = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(CHILD), str(out), when], capture_output=True, timeout=120
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    return child.returncode


@pytest.fixture
def out(tmp_path):
    out = tmp_path / "package"
    out.mkdir()
    (out / "weights").write_text("old")
    return out


def test_a_kill_between_the_renames_loses_nothing(out, capsys):
    killed_writer(out, "rename")
    assert not out.exists()
    assert sorted(p.name.split("-")[0] for p in out.parent.iterdir()) == [".package.old", ".package.tmp"]
    with pytest.raises(DuomemError, match="already exists; pass --force"):  # a rerun: the old one is back
        check_destination(out, force=False)
    assert (out / "weights").read_text() == "old" and "previous version is back" in capsys.readouterr().err
    assert [p.name for p in out.parent.iterdir()] == ["package"]
    with atomic_dir(out) as tmp:
        (tmp / "weights").write_text("new")
    assert (out / "weights").read_text() == "new" and [p.name for p in out.parent.iterdir()] == ["package"]


def test_a_kill_during_the_work_leaves_a_temporary_the_next_write_sweeps(out):
    killed_writer(out, "work")
    leftovers = [p.name for p in out.parent.iterdir() if p.name != "package"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".package.tmp-")
    live = out.parent / f".package.tmp-{os.getppid()}"  # a live process's temporary is left alone
    live.mkdir()
    with atomic_dir(out) as tmp:
        (tmp / "weights").write_text("new")
    assert sorted(p.name for p in out.parent.iterdir()) == [live.name, "package"]
    assert (out / "weights").read_text() == "new"


def test_what_is_written_is_fsynced_file_and_directory(out, monkeypatch):
    synced = []
    fsync = os.fsync
    monkeypatch.setattr(io.os, "fsync", lambda fd: (synced.append(os.fstat(fd).st_ino), fsync(fd)))
    with atomic_dir(out) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "weights").write_text("new")
    inodes = {os.stat(p).st_ino for p in (out / "sub" / "weights", out / "sub", out, out.parent)}
    assert inodes <= set(synced)
    synced.clear()
    write_atomic(out.parent / "manifest.json", "{}")
    assert {os.stat(out.parent / "manifest.json").st_ino, os.stat(out.parent).st_ino} <= set(synced)
