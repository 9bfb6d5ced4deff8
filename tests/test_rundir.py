"""The run directory's commit protocol, on local disk and on a real S3 server."""
import pytest

from cliquecnn_ray import rundir, storage
from tests.synthetic import class_images, frames_table


def _commit(out, config, inputs, table, fail=False):
    def compute(attempt):
        storage.write_parquet(table, storage.join(attempt, "part-0.parquet"))
        if fail:
            raise RuntimeError("injected failure")
        return {"rows": table.num_rows}

    return rundir.run_stage(out, config, inputs, compute)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_commit_skip_recompute_and_failure_keeps_previous(where, tmp_path, request):
    run = str(tmp_path / "run") if where == "local" else request.getfixturevalue("s3_bucket") + "/run"
    images, _ = class_images(2, 3, size=16)
    table = frames_table(images)
    out = rundir.StageDir(run, 0, "frames")
    assert out.record() is None
    first = _commit(out, {"a": 1}, {"src": "x"}, table)
    assert not first["skipped"] and first["stats"]["rows"] == 6
    assert out.read_table().num_rows == 6
    # Same config and inputs: skipped.
    assert _commit(out, {"a": 1}, {"src": "x"}, table)["skipped"]
    # A failing attempt leaves the committed output readable and unchanged.
    with pytest.raises(RuntimeError, match="injected"):
        _commit(out, {"a": 2}, {"src": "x"}, table.slice(0, 2), fail=True)
    assert out.record()["attempt"] == first["attempt"]
    assert out.read_table().num_rows == 6
    # A changed config recomputes and replaces the old attempt.
    second = _commit(out, {"a": 2}, {"src": "x"}, table.slice(0, 2))
    assert not second["skipped"] and second["attempt"] != first["attempt"]
    assert out.read_table().num_rows == 2
    assert all(first["attempt"] not in f for f in storage.list_files(out.uri))


def test_uncommitted_stage_is_a_clear_error(tmp_path):
    with pytest.raises(rundir.StageNotCommitted, match="round 0 features"):
        rundir.StageDir(str(tmp_path), 0, "features").read_table()


# ---------------------------------------------------------------------------------------------
# One writer per run: the lease, in real processes, on local disk and on the S3 server

HOLDER = """
import sys, time
from cliquecnn_ray import lease
with lease.hold(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def _start_holder(run: str, env: dict | None = None):
    import os
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", HOLDER, run], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    assert proc.stdout.readline().strip() == "held"
    return proc


def _run_for(where, tmp_path, request) -> str:
    return str(tmp_path / "run") if where == "local" else request.getfixturevalue("s3_bucket") + "/run"


@pytest.mark.parametrize("where", ["local", "s3"])
def test_second_driver_is_refused_naming_the_holder_and_break_lock_takes_over(where, tmp_path, request, caplog):
    from cliquecnn_ray import lease

    run = _run_for(where, tmp_path, request)
    holder = _start_holder(run)
    try:
        out = rundir.StageDir(run, 0, "frames")
        with pytest.raises(lease.RunLocked) as refused:
            _commit(out, {"a": 1}, {}, frames_table(class_images(1, 2, size=8)[0]))
        message = str(refused.value)
        assert run in message and f"pid {holder.pid}" in message and "since 20" in message and "host " in message
        assert "--break-lock" in message
        assert out.record() is None  # nothing was written
        with lease.hold(run, break_lock=True):
            assert not _commit(out, {"a": 1}, {}, frames_table(class_images(1, 2, size=8)[0]))["skipped"]
        assert "breaking the lock" in caplog.text and f"pid {holder.pid}" in caplog.text
    finally:
        holder.kill()
        holder.wait()


def test_local_lease_of_a_killed_driver_is_free_at_once(tmp_path):
    from cliquecnn_ray import lease

    run = str(tmp_path / "run")
    holder = _start_holder(run)
    holder.kill()  # SIGKILL: no cleanup runs; the kernel drops the flock
    holder.wait()
    with lease.hold(run):
        pass


def test_s3_lease_of_a_killed_driver_expires_and_is_taken_over(s3_bucket, monkeypatch, caplog):
    import time

    from cliquecnn_ray import lease

    run = s3_bucket + "/run"
    holder = _start_holder(run, {"CLIQUECNN_LEASE_TTL_S": "2"})
    time.sleep(1.2)  # the live holder renews (every ttl/4): still refused after its first period
    with pytest.raises(lease.RunLocked, match=f"pid {holder.pid}"):
        with lease.hold(run):
            pass
    holder.kill()
    holder.wait()
    time.sleep(3.5)  # > ttl since its last renewal (Last-Modified has 1 s resolution)
    with lease.hold(run):
        assert "expired" in caplog.text


def test_broken_lease_stops_the_old_holder_before_it_commits(tmp_path):
    """The old holder of a broken lease finds out at its next commit instead of overwriting."""
    from cliquecnn_ray import lease

    run = str(tmp_path / "run")
    out = rundir.StageDir(run, 0, "frames")
    table = frames_table(class_images(1, 2, size=8)[0])

    def compute(attempt):
        other = lease.Lease(run)  # a second driver breaking the lock while this stage computes
        other.acquire(break_lock=True)
        storage.write_parquet(table, storage.join(attempt, "part-0.parquet"))
        return {"rows": table.num_rows}

    with pytest.raises(lease.LeaseLost, match="broken"):
        rundir.run_stage(out, {"a": 1}, {}, compute)
    assert out.record() is None


def test_commit_removes_only_the_attempt_it_supersedes(tmp_path):
    """Another attempt in the stage folder (a second driver's, or one a crash left) is not this commit's."""
    run = str(tmp_path / "run")
    table = frames_table(class_images(1, 3, size=8)[0])
    out = rundir.StageDir(run, 0, "frames")
    first = _commit(out, {"a": 1}, {}, table)
    foreign = storage.join(out.uri, "attempt-other-driver", "part-0.parquet")
    storage.write_parquet(table, foreign)
    second = _commit(out, {"a": 2}, {}, table)
    assert storage.exists(foreign)
    assert not storage.exists(storage.join(out.uri, first["attempt"]))
    assert storage.exists(storage.join(out.uri, second["attempt"]))


# ---------------------------------------------------------------------------------------------
# A record is proof of its output


@pytest.mark.parametrize("where, damage", [("local", "missing"), ("local", "truncated"), ("local", "altered"),
                                           ("s3", "altered")])
def test_a_damaged_part_makes_the_stage_run_again(where, damage, tmp_path, request, caplog):
    run = _run_for(where, tmp_path, request)
    table = frames_table(class_images(2, 3, size=8)[0])
    out = rundir.StageDir(run, 0, "frames")
    first = _commit(out, {"a": 1}, {}, table)
    part = storage.join(out.uri, first["attempt"], "part-0.parquet")
    entry = first["files"]["part-0.parquet"]
    assert entry["size"] == len(storage.read_bytes(part))
    if where == "local":
        import hashlib

        assert entry["sha256"] == hashlib.sha256(storage.read_bytes(part)).hexdigest()
    data = storage.read_bytes(part)
    if damage == "missing":
        storage.delete(part)
    elif damage == "truncated":
        storage.write_bytes(part, data[: len(data) // 2])
    else:
        storage.write_bytes(part, data[:100] + bytes([data[100] ^ 1]) + data[101:])
    again = _commit(out, {"a": 1}, {}, table)
    assert not again["skipped"] and again["attempt"] != first["attempt"]
    assert out.read_table().num_rows == 6
    assert "part-0.parquet" in caplog.text and {"missing": "missing", "truncated": "bytes",
                                                 "altered": "altered"}[damage] in caplog.text


def test_forcing_a_stage_invalidates_every_stage_downstream(tmp_path):
    """A recomputed stage has a new fingerprint even when its files come out the same, so what was made
    from the old one is made again."""
    run = str(tmp_path / "run")
    table = frames_table(class_images(1, 3, size=8)[0])
    up, down = rundir.StageDir(run, 0, "frames"), rundir.StageDir(run, 0, "features")
    _commit(up, {"a": 1}, {}, table)
    _commit(down, {"b": 1}, {"frames": up.fingerprint()}, table)
    assert _commit(down, {"b": 1}, {"frames": up.fingerprint()}, table)["skipped"]
    rundir.run_stage(up, {"a": 1}, {}, lambda attempt: _write_part(table, attempt), force=True)
    assert not _commit(down, {"b": 1}, {"frames": up.fingerprint()}, table)["skipped"]


def _write_part(table, attempt):
    storage.write_parquet(table, storage.join(attempt, "part-0.parquet"))
    return {"rows": table.num_rows}


def test_local_files_are_fsynced_before_the_record(tmp_path, monkeypatch):
    import os

    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    out = rundir.StageDir(str(tmp_path / "run"), 0, "frames")
    table = frames_table(class_images(1, 3, size=8)[0])

    def compute(attempt):  # a writer that does not fsync (as Ray Data's or torch's writers)
        os.makedirs(attempt)
        with open(os.path.join(attempt, "raw.bin"), "wb") as fh:
            fh.write(b"x" * 1000)
        return _write_part(table, attempt)

    record = rundir.run_stage(out, {"a": 1}, {}, compute)
    attempt = os.path.join(out.uri, record["attempt"])
    record_at = synced.index(next(p for p in synced if p.endswith(f".tmp-{os.getpid()}")
                                  and "_SUCCESS" in p))
    before = set(synced[:record_at])
    assert {os.path.join(attempt, "raw.bin"), os.path.join(attempt, "part-0.parquet"), attempt} <= before
