"""One writer per run directory: a driver holds an exclusive lease on its run for its whole life.

Two drivers on one run (a job resubmitted "to resume" while the first still runs) would race on the same
commits. The lease is ``<run>/_LOCK``:

- local disk: ``fcntl.flock`` on the file, whose content names the holder (host, pid, since). The kernel
  releases the lock when the holder dies, however it dies, so a crashed driver never locks the run.
- S3: an object created with ``If-None-Match: *`` (a conditional create: exactly one driver succeeds),
  renewed by a heartbeat thread with ``If-Match: <its ETag>`` every ``ttl / 4``. A lock not renewed for
  ``ttl`` seconds (its holder died) is taken over, again with ``If-Match``, so two drivers cannot both take
  it over. Its age is measured on the server's clock (``Last-Modified`` against the response's ``Date``),
  so clock skew between drivers does not matter. Real S3 and the moto server the tests run both honour
  these conditional writes.

``break_lock`` takes the lease whatever its state (the user knows the holder is gone or hung): locally the
file is replaced, so the old holder's lock no longer guards anything; on S3 the object is overwritten. A
holder checks before each commit that its lease is still its own (``check``), so a driver whose lease
was broken or expired stops instead of committing over the new holder's work.

``hold`` is re-entrant within a process: the pipeline holds the lease for the run's whole life and every
``rundir.run_stage`` inside it re-enters; a stage called on its own takes the lease for its duration.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Iterator, Optional

from . import storage

log = logging.getLogger(__name__)

LOCK = "_LOCK"
# Seconds after its last renewal that an S3 lease expires; long enough to ride out a slow request or two.
TTL_S = 120.0


class RunLocked(RuntimeError):
    """Another driver holds the run's lease; the message names the run and the holder."""


class LeaseLost(RuntimeError):
    """This driver's lease was broken or expired; it must not commit."""


def _ttl() -> float:
    return float(os.environ.get("CLIQUECNN_LEASE_TTL_S", TTL_S))


def _holder() -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "since": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "token": uuid.uuid4().hex,
    }


def describe(holder: Optional[dict]) -> str:
    if not holder:
        return "a driver that has not written its name yet"
    return f"host {holder.get('host')}, pid {holder.get('pid')}, since {holder.get('since')}"


def _refusal(run: str, holder: Optional[dict], detail: str = "") -> RunLocked:
    return RunLocked(
        f"run {run} is locked by another driver ({describe(holder)}){detail}. Wait for it to finish, or pass "
        f"--break-lock if you know it is gone"
    )


class _LocalLock:
    def __init__(self, run: str):
        self.run = run
        self.path = os.path.join(os.path.abspath(run), LOCK)
        self.fd: Optional[int] = None

    def _read(self) -> Optional[dict]:
        try:
            with open(self.path) as fh:
                return json.loads(fh.read() or "null")
        except (OSError, ValueError):
            return None

    def acquire(self, holder: dict, break_lock: bool) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        if break_lock and os.path.exists(self.path):
            log.warning("run %s: breaking the lock of %s", self.run, describe(self._read()))
            os.unlink(self.path)  # the old holder keeps a lock on a file nobody opens any more
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _refusal(self.run, self._read()) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        os.fsync(fd)
        self.fd = fd

    def check(self) -> None:
        try:
            current = os.stat(self.path).st_ino
        except FileNotFoundError:
            current = None
        if current != os.fstat(self.fd).st_ino:
            raise LeaseLost(f"run {self.run}: the lock was broken by {describe(self._read())}; not committing")

    def release(self) -> None:
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, 0)
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


class _S3Lock:
    def __init__(self, run: str, ttl: float):
        self.run = run
        self.bucket, _, prefix = run[len("s3://"):].rstrip("/").partition("/")
        self.key = f"{prefix}/{LOCK}" if prefix else LOCK
        self.client = storage.s3_client()
        self.ttl = ttl
        self.etag: Optional[str] = None
        self.lost: Optional[str] = None
        self.renewed = time.monotonic()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @staticmethod
    def _precondition_failed(exc: Exception) -> bool:
        code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
        return code in ("PreconditionFailed", "412", "ConditionalRequestConflict")

    def _put(self, body: dict, **condition) -> str:
        return self.client.put_object(Bucket=self.bucket, Key=self.key, Body=json.dumps(body).encode(),
                                      **condition)["ETag"]

    def _current(self) -> tuple[Optional[dict], Optional[str], float]:
        """(holder, ETag, seconds since its last renewal on the server's clock); (None, None, 0) if absent."""
        try:
            got = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except self.client.exceptions.NoSuchKey:
            return None, None, 0.0
        server_now = parsedate_to_datetime(got["ResponseMetadata"]["HTTPHeaders"]["date"])
        age = (server_now - got["LastModified"]).total_seconds()
        try:
            holder = json.loads(got["Body"].read() or b"null")
        except ValueError:
            holder = None
        return holder, got["ETag"], age

    def acquire(self, holder: dict, break_lock: bool) -> None:
        body = {**holder, "ttl_s": self.ttl}
        try:
            self.etag = self._put(body, IfNoneMatch="*")
        except Exception as exc:  # noqa: BLE001 (botocore's ClientError; anything else is re-raised)
            if not self._precondition_failed(exc):
                raise storage.StorageError(f"cannot create the lock {self.run}/{LOCK}: {exc}") from exc
            self.etag = self._take_over(body, break_lock)
        self.renewed = time.monotonic()
        self._thread = threading.Thread(target=self._heartbeat, args=(body,), daemon=True,
                                         name=f"lease {self.run}")
        self._thread.start()

    def _take_over(self, body: dict, break_lock: bool) -> str:
        other, etag, age = self._current()
        if etag is None:  # released in the meantime
            return self._put(body, IfNoneMatch="*")
        ttl = float((other or {}).get("ttl_s", self.ttl))
        ours = other and other.get("host") == body["host"] and other.get("pid") == body["pid"]
        if not (break_lock or age > ttl or ours):
            raise _refusal(self.run, other, f"; renewed {age:.0f} s ago, expires {ttl - age:.0f} s from now")
        reason = ("breaking the lock of" if break_lock else "taking over a lock left by this process" if ours
                  else f"taking over the lock expired {age - ttl:.0f} s ago of")
        log.warning("run %s: %s %s", self.run, reason, describe(other))
        try:
            return self._put(body, IfMatch=etag)
        except Exception as exc:  # noqa: BLE001
            if self._precondition_failed(exc):  # another driver took it over first
                raise _refusal(self.run, self._current()[0]) from None
            raise

    def _heartbeat(self, body: dict) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                self.etag = self._put(body, IfMatch=self.etag)
                self.renewed = time.monotonic()
            except Exception as exc:  # noqa: BLE001
                if self._precondition_failed(exc):
                    self.lost = f"the lock was taken by {describe(self._current()[0])}"
                    return
                if time.monotonic() - self.renewed > self.ttl:
                    self.lost = f"the lock could not be renewed for {self.ttl:.0f} s ({exc})"
                    return
                log.warning("run %s: lease renewal failed, retrying: %s", self.run, exc)

    def check(self) -> None:
        if self.lost is None and time.monotonic() - self.renewed > self.ttl:
            self.lost = f"the lock was not renewed for {self.ttl:.0f} s"
        if self.lost:
            raise LeaseLost(f"run {self.run}: {self.lost}; not committing")

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=self.etag)
        except Exception as exc:  # noqa: BLE001 (a lock left behind expires; never hide the run's own error)
            if not self._precondition_failed(exc):
                log.warning("run %s: could not remove the lock (it expires in %.0f s): %s", self.run, self.ttl, exc)


class Lease:
    """The lease of one run, held by this process."""

    def __init__(self, run: str):
        self.run = run
        self.holder = _holder()
        self._lock = _S3Lock(run, _ttl()) if storage.is_s3(run) else _LocalLock(run)
        self.depth = 0

    def acquire(self, break_lock: bool = False) -> None:
        self._lock.acquire(self.holder, break_lock)
        log.debug("run %s: lease taken (%s)", self.run, describe(self.holder))

    def check(self) -> None:
        """Raise LeaseLost unless this process still holds the lease."""
        self._lock.check()

    def release(self) -> None:
        self._lock.release()


_held: dict[str, Lease] = {}
_guard = threading.Lock()


def _key(run: str) -> str:
    return str(run).rstrip("/") if storage.is_s3(run) else os.path.abspath(run)


@contextlib.contextmanager
def hold(run: str, break_lock: bool = False) -> Iterator[Lease]:
    """Hold the run's lease for the duration of the block (re-entrant within this process)."""
    key = _key(run)
    with _guard:
        lease = _held.get(key)
        if lease is None:
            lease = Lease(key)
            lease.acquire(break_lock)
            _held[key] = lease
        lease.depth += 1
    try:
        yield lease
    finally:
        with _guard:
            lease.depth -= 1
            if lease.depth == 0:
                del _held[key]
                lease.release()


def check(run: str) -> None:
    """Before a commit: raise LeaseLost if this process's lease on ``run`` was broken or expired."""
    lease = _held.get(_key(run))
    if lease is not None:
        lease.check()
