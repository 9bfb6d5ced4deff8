"""The run directory and its commit protocol (docs/run-directory.md).

Layout: ``<run>/round=<r>/<stage>/attempt-<id>/...`` holds what one attempt wrote, and
``<run>/round=<r>/<stage>/_SUCCESS.json`` commits it: written last, it names the attempt, its files, the
config hash, the fingerprints of the inputs, row counts and timings. Readers read only what a
``_SUCCESS.json`` names, so a failed or half-written attempt is never seen, on local disk or S3 alike,
and an earlier committed output stays readable until a new attempt commits. A stage whose
``_SUCCESS.json`` matches its config and inputs is skipped on rerun.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Optional

import pyarrow as pa

from . import lease, storage
from .config import config_hash, hashed_view

log = logging.getLogger(__name__)

SUCCESS = "_SUCCESS.json"


class StageNotCommitted(RuntimeError):
    """A stage's input has not been committed yet."""


@dataclass(frozen=True)
class StageDir:
    """Where one stage of one round lives inside a run."""

    run: str
    round: Optional[int]  # None: a stage of the whole run (the report), at <run>/<stage>
    stage: str

    @property
    def uri(self) -> str:
        if self.round is None:
            return storage.join(self.run, self.stage)
        return storage.join(self.run, f"round={self.round}", self.stage)

    @property
    def success_uri(self) -> str:
        return storage.join(self.uri, SUCCESS)

    def __str__(self) -> str:
        return self.stage if self.round is None else f"round {self.round} {self.stage}"

    def record(self) -> Optional[dict]:
        """The committed ``_SUCCESS.json``, or None when the stage has not been committed."""
        if not storage.exists(self.success_uri):
            return None
        return storage.read_json(self.success_uri)

    def require(self) -> dict:
        record = self.record()
        if record is None:
            raise StageNotCommitted(
                f"{self} has no committed output in {self.run} (no {self.success_uri}); run that stage first"
            )
        return record

    def files(self, suffix: str = "") -> list[str]:
        """URIs of the committed files (optionally only those ending in ``suffix``)."""
        record = self.require()
        base = storage.join(self.uri, record["attempt"])
        return [storage.join(base, f) for f in record["files"] if f.endswith(suffix)]

    def file(self, name: str) -> str:
        """URI of one committed file by its name inside the attempt."""
        record = self.require()
        if name not in record["files"]:
            raise StageNotCommitted(f"{self}: committed output has no file '{name}'")
        return storage.join(self.uri, record["attempt"], name)

    def read_table(self, columns: Optional[list[str]] = None) -> pa.Table:
        return storage.read_parquet(self.files(".parquet"), columns=columns)

    def fingerprint(self) -> str:
        return self.require()["fingerprint"]

    def verify(self, record: dict) -> Optional[str]:
        """Why the committed files are not what ``record`` says (missing, truncated, altered), or None."""
        expected = record.get("files")
        if not isinstance(expected, dict):
            return "the record has no checksums (written by an older version)"
        found = storage.digests(storage.join(self.uri, record["attempt"]))
        for name, want in expected.items():
            got = found.get(name)
            if got is None:
                return f"committed file {name} is missing"
            if got["size"] != want["size"]:
                return f"committed file {name} has {got['size']} bytes, its record says {want['size']}"
            if got != want:
                return f"committed file {name} was altered (its checksum differs from the record's)"
        return None


def source_fingerprint(uri: str) -> str:
    """Fingerprint of an external input (file or folder): paths, sizes and modification times."""
    fs, path = storage.resolve(uri)
    import pyarrow.fs as pafs

    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise storage.StorageError(f"input not found: {uri}")
    infos = [info]
    if info.type == pafs.FileType.Directory:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    blob = json.dumps(sorted((i.path, i.size, str(i.mtime)) for i in infos if i.type == pafs.FileType.File))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _diff_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [k for key in keys for k in _diff_keys(old.get(key), new.get(key), f"{prefix}{key}.")]
    return [prefix.rstrip(".")] if old != new else []


def run_stage(
    out: StageDir,
    config: Any,
    inputs: dict[str, str],
    compute: Callable[[str], dict],
    force: bool = False,
) -> dict:
    """Run ``compute(attempt_uri) -> stats`` unless ``out`` is committed for the same config and inputs
    and its files are still what its record says.

    ``config`` is a config dataclass or a dict that may hold dataclasses; only the fields that change
    results enter its hash (``config.hashed_view``). ``inputs`` maps input names to fingerprints
    (``StageDir.fingerprint()`` or ``source_fingerprint``). ``compute`` writes its files under
    ``attempt_uri`` and returns a JSON-able dict of statistics (``rows`` by convention). The run's lease is
    held throughout (re-entered when the caller holds it). Returns the committed record (with ``skipped``
    True when nothing ran).
    """
    config_dict = hashed_view(config)
    chash = config_hash(config_dict)
    with lease.hold(out.run):
        previous = out.record()
        if previous and not force:
            reason = _changed(previous, config_dict, chash, inputs) or out.verify(previous)
            if reason is None:
                log.info("%s: committed output matches config and inputs, skipped", out)
                return {**previous, "skipped": True}
            log.warning("%s: %s; recomputing", out, reason)
        return _commit(out, config_dict, chash, inputs, compute, previous)


def _changed(previous: dict, config_dict: dict, chash: str, inputs: dict) -> Optional[str]:
    """Why a committed record does not match this config and these inputs (None when it does)."""
    if previous.get("config_hash") == chash and previous.get("inputs") == inputs:
        return None
    changed = _diff_keys(previous.get("config", {}), config_dict)
    changed_inputs = sorted(k for k in set(previous.get("inputs", {})) | set(inputs)
                            if previous.get("inputs", {}).get(k) != inputs.get(k))
    parts = [f"config ({', '.join(changed)})" if changed else "",
             f"inputs ({', '.join(changed_inputs)})" if changed_inputs else ""]
    return "committed output was made with other " + ("; ".join(p for p in parts if p) or "settings")


def matches(record: dict, config: Any, inputs: dict[str, str]) -> bool:
    """Whether a committed record was made with this config and these inputs (its files unchecked)."""
    return _changed(record, hashed_view(config), config_hash(config), inputs) is None


def _commit(out: StageDir, config_dict: dict, chash: str, inputs: dict, compute: Callable[[str], dict],
            previous: Optional[dict]) -> dict:
    attempt = f"attempt-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
    attempt_uri = storage.join(out.uri, attempt)
    started = time.time()
    log.info("%s: running", out)
    try:
        stats = compute(attempt_uri) or {}
        files = storage.digests(attempt_uri)  # also fsyncs them (local): durable before the record names them
    except BaseException:
        # The failed attempt is removed; the previously committed one (if any) stays readable.
        try:
            storage.delete(attempt_uri)
        except storage.StorageError:
            log.warning("%s: could not remove the failed attempt %s", out, attempt_uri)
        raise
    seconds = time.time() - started
    # The attempt id enters the fingerprint: a recomputed stage (--force) invalidates every stage
    # downstream even when its files come out byte for byte the same.
    fingerprint = hashlib.sha256(
        json.dumps([chash, inputs, attempt, files], sort_keys=True, default=str).encode()
    ).hexdigest()[:16]
    record = {
        "stage": out.stage,
        "round": out.round,
        "attempt": attempt,
        "files": dict(sorted(files.items())),
        "config_hash": chash,
        "config": config_dict,
        "inputs": inputs,
        "fingerprint": fingerprint,
        "seconds": round(seconds, 3),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "stats": stats,
    }
    lease.check(out.run)  # a driver whose lease was broken or expired must not commit over the new holder
    storage.write_json(out.success_uri, record)  # the commit
    if previous and previous.get("attempt") not in (None, attempt):
        # Only the attempt this commit supersedes: any other attempt-* is not this driver's to remove.
        storage.delete(storage.join(out.uri, previous["attempt"]))
    log.info("%s: committed in %.1f s (%s)", out, seconds, _short(stats))
    return {**record, "skipped": False}
def _short(stats: dict) -> str:
    items = [f"{k}={v}" for k, v in stats.items() if isinstance(v, (int, float, str)) and len(str(v)) < 40]
    return ", ".join(items[:6])
