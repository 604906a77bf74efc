"""Files that survive a kill: atomic writes, and JSONL files appended batch by batch.

Every whole file selfee_fast writes goes through `write_text_atomic` (temporary file, fsync,
rename), so a reader sees the old content or the new, never half of it; and every write, whole
or appended, goes through `writing`, which turns a full disk into one line naming the file. Generation and
judgment append one batch of records at a time instead; `complete_batches` is how a
restart finds which batches made it to disk whole. Saved models (folders) are written into
a staging folder and swapped in whole (`folder_written_atomically`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

# What a full disk looks like: the OS's own codes; the messages torch.save gives when its writer
# runs out of room mid-file (it never says why); safetensors' error, which carries the OS error as text.
FULL_OR_READ_ONLY = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
                     errno.EROFS: "the folder is read-only"}  # fmt: skip
SHORT_WRITE = ("unexpected pos", "PytorchStreamWriter failed", "file write failed", "os error 28", "os error 122",
               "No space left on device")  # fmt: skip
READ_ONLY = ("os error 30", "Read-only file system")
RESUME = "everything written before is intact: free space and rerun the same command to resume"


class WriteFailed(RuntimeError):
    """A file could not be written for lack of space or permission; what was written before is intact."""


@contextlib.contextmanager
def writing(path: str | Path):
    """Turn a full disk or a read-only folder, while writing `path`, into one clear error naming it."""
    try:
        yield
    except OSError as error:
        if error.errno not in FULL_OR_READ_ONLY:
            raise
        raise WriteFailed(f"cannot write {path}: {FULL_OR_READ_ONLY[error.errno]}; {RESUME}") from error
    except Exception as error:  # torch's RuntimeError, safetensors' SafetensorError: the OS error is in the text
        if isinstance(error, WriteFailed):
            raise
        if any(s in str(error) for s in READ_ONLY):
            raise WriteFailed(f"cannot write {path}: the folder is read-only; {RESUME}") from error
        if not any(s in str(error) for s in SHORT_WRITE):
            raise
        raise WriteFailed(f"cannot write {path}: the disk is full (a short write); {RESUME}") from error


def write_text_atomic(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with writing(path), tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: str | Path, value) -> None:
    write_text_atomic(path, json.dumps(value, indent=2))


def write_jsonl_atomic(path: str | Path, records: list[dict]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in records))


@contextlib.contextmanager
def folder_written_atomically(path: str | Path):
    """Yield a temporary sibling folder to write into; it replaces `path` only once complete.

    A kill while writing leaves `path` as it was (the previous model, or nothing) plus a
    stale `.tmp` folder that the next write clears.
    """
    path = Path(path)
    staging, previous = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    shutil.rmtree(staging, ignore_errors=True)
    with writing(path):
        staging.mkdir(parents=True)
        yield staging
    shutil.rmtree(previous, ignore_errors=True)
    if path.exists():
        path.rename(previous)
    staging.rename(path)
    shutil.rmtree(previous, ignore_errors=True)


def append_batch(f, records: list[dict]) -> None:
    """Append one batch of records to an open JSONL file and force it to disk."""
    with writing(f.name):
        f.write("".join(json.dumps(r) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())


def complete_batches(path: str | Path, plan: list[list[int]], log=None) -> set[int]:
    """Batch numbers whose records (dicts with "batch" and "index" keys) are all in `path`.

    `plan[b]` lists the record indices batch b holds. A batch counts as complete only if its
    records carry exactly those indices, so a file written under another plan (another batch
    size, or a version that grouped records differently) is never taken for finished work.
    A torn last line, and the records of batches that are not complete, are removed from the
    file, so appending can continue where the complete batches end.
    """
    path = Path(path)
    if not path.exists():
        return set()
    found = complete_batch_records(path, plan, log)
    write_jsonl_atomic(path, [r for records in found.values() for r in records])
    return set(found)


def complete_batch_records(path: Path, plan: list[list[int]], log=None) -> dict[int, list[dict]]:
    """The records of each complete batch in `path`, by batch number, in file order (see `complete_batches`)."""
    records = []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
    for number, line in enumerate(lines, start=1):
        try:
            if not line.endswith("\n"):
                raise ValueError("torn")
            records.append(json.loads(line))
        except ValueError:
            if log is not None and number < len(lines):  # a torn last line is a kill's ordinary trace
                log(f"{path}:{number} is garbled: it and the {len(lines) - number} lines after it are dropped, "
                    "and their batches done again")  # fmt: skip
            break
    found: dict[int, list[dict]] = {}
    for r in records:
        found.setdefault(r["batch"], []).append(r)
    return {b: rs for b, rs in found.items() if b < len(plan) and sorted(r["index"] for r in rs) == sorted(plan[b])}


def rank_shard(path: Path, rank: int) -> Path:
    """Where rank `rank` of several processes appends its batches of `path`."""
    return path.with_name(f"{path.name}.rank{rank}")


def merge_shards(path: Path, plan: list[list[int]], log=None) -> set[int]:
    """Gather the complete batches of `path` and of every rank's shard beside it into `path`, in batch order.

    The merged file is what one process appending batch after batch would have written, so
    the number of processes changes no byte; a run resumes on any number of them. The shards
    are removed once their batches are in `path`. Returns the complete batch numbers.
    """
    shards = sorted(path.parent.glob(f"{path.name}.rank*"))
    if not shards:
        return complete_batches(path, plan, log)
    found: dict[int, list[dict]] = {}
    for source in [path, *shards]:
        if source.exists():
            found.update(complete_batch_records(source, plan, log))
    write_jsonl_atomic(path, [r for b in sorted(found) for r in found[b]])
    for shard in shards:
        shard.unlink()
    return set(found)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


MANIFEST = "checksums.json"


def write_manifest(folder: Path) -> None:
    """Record every file's checksum in the folder, so a damaged copy is found before it is used."""
    # README.md is the model card a user may edit; it is not what loads.
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name not in (MANIFEST, "README.md"))
    write_json_atomic(folder / MANIFEST, {p.name: sha256_of(p) for p in files})


def folder_problem(folder: Path) -> str | None:
    """What is wrong with a folder against its manifest (None: nothing, or no manifest to check)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        return None if folder.is_dir() else f"{folder} is missing"
    except ValueError:
        return f"{folder / MANIFEST} is unreadable"
    for name, digest in manifest.items():
        if not (folder / name).is_file():
            return f"{folder / name} is missing"
        if sha256_of(folder / name) != digest:
            return f"{folder / name} does not match its checksum (truncated or damaged)"
    return None


class RunFolderBusy(RuntimeError):
    """Another process holds the run folder."""


def refuse_if_busy(run_dir: str | Path) -> None:
    """Refuse at once if another process holds `run_dir`, before any slow check; writes nothing."""
    import fcntl

    path = Path(run_dir) / ".lock"
    if not path.exists():
        return
    with path.open("r", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = handle.read().strip() or "another process"
            raise RunFolderBusy(f"{run_dir} is in use by {holder}; wait for it to finish or stop it") from None
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def run_folder_lock(run_dir: str | Path, command: str):
    """Hold `run_dir` for this process: an OS lock (flock) the kernel drops when the process dies.

    A second process is refused at once, told who holds the folder (read from the lock file,
    which the holder writes after taking the lock). Nothing is left to clean up after a kill:
    the file stays, the lock does not.
    """
    import fcntl
    import sys
    import time

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / ".lock"
    with writing(path):
        handle = path.open("a+", encoding="utf-8")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise RunFolderBusy(f"{run_dir} is in use by {holder}; wait for it to finish or stop it") from None
    try:
        handle.seek(0)
        handle.truncate()
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        handle.write(f"process {os.getpid()} ({command}, since {started}, {' '.join(sys.argv)[:200]})")
        handle.flush()
        yield
    finally:
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        handle.close()
