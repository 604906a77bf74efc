"""Resumable append-only files: which batches count as finished."""

import json

import pytest

from selfee_fast.files import append_batch, complete_batches, merge_shards, rank_shard


def write(path, records, torn=""):
    with path.open("w", encoding="utf-8") as f:
        for batch in records:
            append_batch(f, batch)
        f.write(torn)


def test_complete_batches_keep_finished_work_and_drop_the_rest(tmp_path):
    path = tmp_path / "gen.jsonl"
    plan = [[0, 3], [1, 2], [4]]
    write(path, [[{"batch": 0, "index": 0}, {"batch": 0, "index": 3}], [{"batch": 1, "index": 1}]],
          torn='{"batch": 1, "ind')  # fmt: skip
    assert complete_batches(path, plan) == {0}
    assert [json.loads(line)["index"] for line in path.read_text().splitlines()] == [0, 3], "torn and partial dropped"


def test_a_file_written_under_another_plan_is_not_finished_work(tmp_path):
    path = tmp_path / "judge.jsonl.partial"
    # Same batch sizes, other members: e.g. a version that grouped the records differently.
    write(path, [[{"batch": 0, "index": 0}, {"batch": 0, "index": 1}], [{"batch": 1, "index": 2}, {"batch": 1, "index": 3}]])  # fmt: skip
    assert complete_batches(path, [[0, 2], [1, 3]]) == set()
    assert path.read_text() == ""
    assert complete_batches(tmp_path / "missing.jsonl", [[0]]) == set()


def test_a_folder_is_replaced_only_when_complete(tmp_path):
    import pytest

    from selfee_fast.files import folder_written_atomically

    target = tmp_path / "model"
    with folder_written_atomically(target) as staging:
        (staging / "weights").write_text("v1")
    assert (target / "weights").read_text() == "v1"
    with pytest.raises(RuntimeError), folder_written_atomically(target) as staging:
        (staging / "weights").write_text("half of v2")
        raise RuntimeError("killed while saving")
    assert (target / "weights").read_text() == "v1", "an interrupted save leaves the previous model"
    with folder_written_atomically(target) as staging:
        (staging / "weights").write_text("v2")
    assert (target / "weights").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"], "no staging folder left behind"


def test_a_second_process_is_refused_the_run_folder_and_a_killed_holder_leaves_no_lock(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from selfee_fast.files import RunFolderBusy, run_folder_lock

    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\nfrom selfee_fast.files import run_folder_lock\n"
         f"with run_folder_lock({str(tmp_path)!r}, 'selfee-fast run'):\n"
         "    print('held', flush=True)\n    time.sleep(60)\n"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderBusy, match=rf"in use by process {holder.pid} \(selfee-fast run"):
            with run_folder_lock(tmp_path, "selfee-fast generate"):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    started = time.perf_counter()
    with run_folder_lock(tmp_path, "selfee-fast run"):  # the kernel dropped the dead holder's lock
        assert f"process {__import__('os').getpid()}" in (tmp_path / ".lock").read_text()
    assert time.perf_counter() - started < 1


def test_a_full_disk_is_one_clear_error_naming_the_file(tmp_path, monkeypatch):
    import errno
    import os as os_module

    from selfee_fast.files import WriteFailed, write_text_atomic, writing

    (tmp_path / "state.json").write_text("old")
    real_fsync = os_module.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os_module, "fsync", full)
    with pytest.raises(WriteFailed, match=rf"cannot write {tmp_path / 'state.json'}: the disk is full; .*rerun"):
        write_text_atomic(tmp_path / "state.json", "new")
    monkeypatch.setattr(os_module, "fsync", real_fsync)
    assert (tmp_path / "state.json").read_text() == "old", "the last good state is intact"
    with pytest.raises(WriteFailed, match="the folder is read-only"), writing(tmp_path / "x"):
        raise OSError(errno.EROFS, "Read-only file system")
    with pytest.raises(WriteFailed, match=r"cannot write .*ckpt: the disk is full \(a short write\)"), writing("ckpt"):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 69120 vs 69008")
    with pytest.raises(RuntimeError, match="something else"), writing("x"):
        raise RuntimeError("something else")
    import safetensors

    message = 'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
    with pytest.raises(WriteFailed, match=r"cannot write w\.safetensors: the disk is full"), writing("w.safetensors"):
        raise safetensors.SafetensorError(message)


def test_a_garbled_line_in_the_middle_is_named_and_what_follows_is_redone(tmp_path):
    path = tmp_path / "generations.jsonl"
    records = [{"batch": b, "index": i} for b, i in ((0, 0), (0, 1), (1, 2), (1, 3), (2, 4))]
    lines = [json.dumps(r) + "\n" for r in records]
    lines[2] = '{"batch": 1, "ind\n'  # damaged in place, not torn at the end
    path.write_text("".join(lines))
    logs = []
    assert complete_batches(path, [[0, 1], [2, 3], [4]], log=logs.append) == {0}
    assert logs == [f"{path}:3 is garbled: it and the 2 lines after it are dropped, and their batches done again"]
    assert [json.loads(line)["index"] for line in path.read_text().splitlines()] == [0, 1]


def test_shards_of_several_processes_merge_in_batch_order_and_resume_on_any_number(tmp_path):
    """What two ranks left (rank 1 killed mid-batch) merges into what one process writes, batch by batch."""
    path = tmp_path / "gen.jsonl"
    plan = [[0], [1, 2], [3], [4]]
    write(rank_shard(path, 0), [[{"batch": 0, "index": 0}], [{"batch": 2, "index": 3}]])
    write(rank_shard(path, 1), [[{"batch": 1, "index": 2}, {"batch": 1, "index": 1}]], torn='{"batch": 3, "ind')
    assert merge_shards(path, plan) == {0, 1, 2}
    assert [json.loads(line)["index"] for line in path.read_text().splitlines()] == [0, 2, 1, 3]
    assert not list(tmp_path.glob("*.rank*")), "shards removed once merged"
    write(rank_shard(path, 0), [[{"batch": 3, "index": 4}]])  # a later run on one or more processes
    assert merge_shards(path, plan) == {0, 1, 2, 3}
    assert merge_shards(path, plan) == {0, 1, 2, 3}, "no shards: the file's own complete batches"
