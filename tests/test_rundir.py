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
