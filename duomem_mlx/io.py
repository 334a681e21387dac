"""Files users hand us and files we write, in one place: a JSON / JSONL reader that turns a
damaged file (bad bytes, bad JSON, a wrong shape) into one `Error:` line naming the file and
line, and writers that check the destination before the work and write under a temporary
name, fsynced and renamed when complete, so an unwritable --out, a crash or a power cut never
leaves half a file, and a replaced output is never lost (an interrupted replace is put back)."""

import glob
import json
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from duomem_mlx.errors import DuomemError


def cache_root() -> Path:
    """Where fetched models and generated games are kept: `~/.cache/duomem-mlx`, or `$DUOMEM_CACHE`."""
    return Path(os.environ.get("DUOMEM_CACHE") or "~/.cache/duomem-mlx").expanduser()


SHAPE_ERRORS = (TypeError, ValueError, KeyError, AttributeError, IndexError)


def read_text(path: str | Path, fix: str) -> str:
    path = Path(path)
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise DuomemError(f"{path} line {line} is not UTF-8 text (byte {e.start}); {fix}")
    except OSError as e:
        raise DuomemError(f"cannot read {path} ({e.strerror or e}); {fix}")


def read_json(path: str | Path, fix: str, check: Callable | None = None):
    """A JSON document; `check(data)` raises (DuomemError or a shape error) when it has the wrong shape."""
    try:
        data = json.loads(read_text(path, fix))
    except json.JSONDecodeError as e:
        raise DuomemError(f"{path} is not valid JSON (line {e.lineno}: {e.msg}); {fix}")
    return shaped(check, data, str(path), fix) if check else data


def read_jsonl(path: str | Path, parse: Callable, fix: str, torn_ok: bool = False) -> list:
    """`parse(record, where)` of every non-empty line. A torn last line (a killed writer, no
    final newline) is skipped when `torn_ok`."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DuomemError(f"cannot read {path} ({e.strerror or e}); {fix}")
    lines = data.split(b"\n")
    out = []
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        where = f"{path} line {n}"
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise DuomemError(f"{where} is not UTF-8 text; {fix}")
        except json.JSONDecodeError as e:
            if torn_ok and n == len(lines):
                break
            raise DuomemError(f"{where}: not valid JSON ({e.msg}); {fix}")
        out.append(shaped(parse, record, where, fix))
    return out


def shaped(parse: Callable, data, where: str, fix: str):
    try:
        return parse(data, where)
    except SHAPE_ERRORS as e:
        raise DuomemError(f"{where}: unexpected content ({e.__class__.__name__}: {e}); {fix}")


def require(condition: bool, message: str) -> None:
    """For shape checks: `require(isinstance(x, dict), "expected an object")`."""
    if not condition:
        raise ValueError(message)


def check_destination(path: str | Path, force: bool | None = None, option: str = "--out") -> Path:
    """Before the work: `path` can be written (an existing directory takes files, else its parent
    exists or is created and does); with `force` given, an existing file or non-empty directory
    at `path` is refused unless force is True."""
    path = Path(path).expanduser()
    recover(path)
    if force is False and path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise DuomemError(f"{path} already exists; pass --force to overwrite it or choose another {option}")
    where = path if path.is_dir() else path.absolute().parent
    try:
        where.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=where).close()  # os.access lies to root and on read-only mounts
    except OSError as e:
        raise DuomemError(f"cannot write to {where} for {option} {path} ({e.strerror or e}); choose another {option}")
    return path


HINT = "free some space or choose another --out"


def write_failed(e: BaseException) -> bool:
    """An OSError, or the RuntimeError MLX's writers raise (`[write] Unable to write N bytes to file.`)."""
    return isinstance(e, OSError) or isinstance(e, RuntimeError) and str(e).startswith(("[write]", "[save"))


def failed_write(e: BaseException, path: Path, out: Path, need: int | None, hint: str) -> DuomemError:
    """The one line for a write that failed part-way (after its leftovers are gone): the file,
    why, the space it needed against what is free, and that nothing was left."""
    where = next(p for p in out.absolute().parents if p.exists())
    free = f"{shutil.disk_usage(where).free / 1e6:,.1f} MB free on {where}"
    space = f"; it needs {need / 1e6:,.1f} MB, {free}" if need is not None else f"; {free}"
    reason = ((e.strerror if isinstance(e, OSError) else None) or str(e)).rstrip(".")
    return DuomemError(f"could not write {path} ({reason}{space}); nothing was left behind, {out} is as it was: {hint}")


def fsync(path: Path) -> None:
    """Flush a file's data, or a directory's entries (a rename is durable once its directory is),
    to the disk. (On macOS the drive may still cache it: fcntl F_FULLFSYNC would wait for that too.)"""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    for parent, _, files in os.walk(root):
        for name in files:
            fsync(Path(parent, name))
        fsync(Path(parent))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def recover(out: Path) -> None:
    """Put right what an interrupted `atomic_dir` of a dead process left beside `out`: a kill between
    its two renames leaves `out` missing and the previous output in `.OUT.old-PID`, which is put back
    (and said so); any other `.OUT.old-PID` or `.OUT.tmp-PID` of a dead process is deleted."""
    for leftover in sorted(out.parent.glob(f".{glob.escape(out.name)}.*-*")) if out.parent.is_dir() else []:
        kind, _, pid = leftover.name[len(out.name) + 2 :].rpartition("-")
        if kind not in ("old", "tmp") or not pid.isdigit() or int(pid) == os.getpid() or alive(int(pid)):
            continue
        if kind == "old" and not os.path.lexists(out):
            os.replace(leftover, out)
            fsync(out.parent)
            print(
                f"duomem-mlx: the writer replacing {out} was killed; its previous version is back in place",
                file=sys.stderr,
            )
        elif leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


@contextmanager
def atomic_file(path: str | Path, need: int | None = None, hint: str = HINT):
    """Yield a temporary name beside `path` (same suffix) to write; fsynced and renamed over `path`
    when the block ends without error, deleted otherwise. A failed write (`write_failed`) is one DuomemError."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{os.getpid()}.{path.name}")
    try:
        yield tmp
        fsync(tmp)
        os.replace(tmp, path)
        fsync(path.parent)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if write_failed(e):
            raise failed_write(e, path, path, need, hint) from e
        raise


def write_atomic(path: str | Path, data: bytes | str, hint: str = HINT) -> None:
    """Write `data` under a temporary name in the same directory, fsync, rename over `path`."""
    data = data.encode() if isinstance(data, str) else data
    with atomic_file(path, len(data), hint) as tmp, open(tmp, "wb") as f:
        f.write(data)


@contextmanager
def atomic_dir(out: str | Path, need: int | None = None, hint: str = HINT):
    """Yield a temporary directory next to `out`; when the block ends without error it is fsynced and
    replaces `out` (an existing `out` is swapped out, then deleted), otherwise it is deleted. A kill
    between the two renames is put right by the next `recover` (`check_destination` runs it).
    A failed write (`write_failed`) is one DuomemError naming the file it was writing."""
    out = Path(out)
    recover(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        yield tmp
        fsync_tree(tmp)
        if out.exists():
            os.replace(out, old)
        try:
            os.replace(tmp, out)
        except OSError:
            if old.exists():
                os.replace(old, out)
            raise
        fsync(out.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        if not write_failed(e):
            raise
        files = [p for p in tmp.rglob("*") if p.is_file()] if tmp.is_dir() else []
        last = max(files, key=lambda p: p.stat().st_mtime_ns, default=None)  # the file it was writing
        shutil.rmtree(tmp, ignore_errors=True)
        raise failed_write(e, out / last.relative_to(tmp) if last else out, out, need, hint) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
