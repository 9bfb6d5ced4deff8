"""The run directory and its commit protocol (docs/run-directory.md).

Layout: ``<run>/round=<r>/<stage>/attempt-<id>/...`` holds what one attempt wrote, and
``<run>/round=<r>/<stage>/_SUCCESS.json`` commits it: written last, it names the attempt, its files, the
config hash, the fingerprints of the inputs, row counts and timings. Readers read only what a
``_SUCCESS.json`` names, so a failed or half-written attempt is never seen, on local disk or S3 alike,
and an earlier committed output stays readable until a new attempt commits. A stage whose
``_SUCCESS.json`` matches its config and inputs is skipped on rerun.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Optional

import pyarrow as pa

from . import storage
from .config import config_hash, to_dict

log = logging.getLogger(__name__)

SUCCESS = "_SUCCESS.json"


class StageNotCommitted(RuntimeError):
    """A stage's input has not been committed yet."""


@dataclass(frozen=True)
class StageDir:
    """Where one stage of one round lives inside a run."""

    run: str
    round: int
    stage: str

    @property
    def uri(self) -> str:
        return storage.join(self.run, f"round={self.round}", self.stage)

    @property
    def success_uri(self) -> str:
        return storage.join(self.uri, SUCCESS)

    def __str__(self) -> str:
        return f"round {self.round} {self.stage}"

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
    """Run ``compute(attempt_uri) -> stats`` unless ``out`` is committed for the same config and inputs.

    ``inputs`` maps input names to fingerprints (``StageDir.fingerprint()`` or ``source_fingerprint``).
    ``compute`` writes its files under ``attempt_uri`` and returns a JSON-able dict of statistics
    (``rows`` by convention). Returns the committed record (with ``skipped`` True when nothing ran).
    """
    config_dict = to_dict(config) if dataclasses.is_dataclass(config) else dict(config)
    chash = config_hash(config_dict)
    previous = out.record()
    if previous and not force:
        if previous["config_hash"] == chash and previous["inputs"] == inputs:
            log.info("%s: committed output matches config and inputs, skipped", out)
            return {**previous, "skipped": True}
        changed = _diff_keys(previous.get("config", {}), config_dict)
        changed_inputs = sorted(k for k in set(previous["inputs"]) | set(inputs)
                                if previous["inputs"].get(k) != inputs.get(k))
        log.warning(
            "%s: committed output was made with other %s; recomputing",
            out,
            "; ".join(
                part
                for part in (
                    f"config ({', '.join(changed)})" if changed else "",
                    f"inputs ({', '.join(changed_inputs)})" if changed_inputs else "",
                )
                if part
            ) or "settings",
        )
    attempt = f"attempt-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
    attempt_uri = storage.join(out.uri, attempt)
    started = time.time()
    log.info("%s: running", out)
    try:
        stats = compute(attempt_uri) or {}
    except BaseException:
        # The failed attempt is removed; the previously committed one (if any) stays readable.
        try:
            storage.delete(attempt_uri)
        except storage.StorageError:
            log.warning("%s: could not remove the failed attempt %s", out, attempt_uri)
        raise
    seconds = time.time() - started
    prefix_len = len(storage.resolve(attempt_uri)[1]) + 1
    files = [storage.resolve(f)[1][prefix_len:] for f in storage.list_files(attempt_uri)]
    fingerprint = hashlib.sha256(
        json.dumps([chash, inputs, files, stats.get("rows")], sort_keys=True, default=str).encode()
    ).hexdigest()[:16]
    record = {
        "stage": out.stage,
        "round": out.round,
        "attempt": attempt,
        "files": files,
        "config_hash": chash,
        "config": config_dict,
        "inputs": inputs,
        "fingerprint": fingerprint,
        "seconds": round(seconds, 3),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "stats": stats,
    }
    storage.write_json(out.success_uri, record)  # the commit
    for old in storage.list_files(out.uri):
        rel = storage.resolve(old)[1][len(storage.resolve(out.uri)[1]) + 1 :]
        if rel.startswith("attempt-") and not rel.startswith(attempt + "/"):
            storage.delete(old)
    _remove_empty_attempt_dirs(out, keep=attempt)
    log.info("%s: committed in %.1f s (%s)", out, seconds, _short(stats))
    return {**record, "skipped": False}


def _remove_empty_attempt_dirs(out: StageDir, keep: str) -> None:
    fs, path = storage.resolve(out.uri)
    import pyarrow.fs as pafs

    for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)):
        name = info.path.rsplit("/", 1)[-1]
        if info.type == pafs.FileType.Directory and name.startswith("attempt-") and name != keep:
            fs.delete_dir(info.path)


def _short(stats: dict) -> str:
    items = [f"{k}={v}" for k, v in stats.items() if isinstance(v, (int, float, str)) and len(str(v)) < 40]
    return ", ".join(items[:6])
