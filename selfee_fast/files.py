"""Files that survive a kill: atomic writes, and JSONL files appended batch by batch.

Every file selfee_fast writes goes through `write_text_atomic` (temporary file, fsync,
rename), so a reader sees the old content or the new, never half of it. Generation and
judgment append one batch of records at a time instead; `complete_batches` is how a
restart finds which batches made it to disk whole.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_text_atomic(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: str | Path, value) -> None:
    write_text_atomic(path, json.dumps(value, indent=2))


def write_jsonl_atomic(path: str | Path, records: list[dict]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in records))


def append_batch(f, records: list[dict]) -> None:
    """Append one batch of records to an open JSONL file and force it to disk."""
    f.write("".join(json.dumps(r) + "\n" for r in records))
    f.flush()
    os.fsync(f.fileno())


def complete_batches(path: str | Path, sizes: list[int]) -> set[int]:
    """Batch numbers whose every record (a dict with a "batch" key) is in `path`.

    A torn last line, and the records of batches that are not complete, are removed from the
    file, so appending can continue where the complete batches end.
    """
    path = Path(path)
    if not path.exists():
        return set()
    records = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        if not line.endswith("\n"):
            break
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    counts: dict[int, int] = {}
    for r in records:
        counts[r["batch"]] = counts.get(r["batch"], 0) + 1
    done = {b for b, n in counts.items() if b < len(sizes) and n == sizes[b]}
    write_jsonl_atomic(path, [r for r in records if r["batch"] in done])
    return done
