"""The command line: help a newcomer can follow, overrides, errors that name the key."""
import os
import shutil
import subprocess
import sys

import pytest

from cliquecnn_ray import cli


def test_help_lists_every_stage(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in ("ingest", "features", "neighbours", "cliques", "batches", "train", "impute", "evaluate",
                 "report", "pipeline", "baselines"):
        assert name in out


def test_stage_help_shows_run_config_and_overrides(capsys):
    with pytest.raises(SystemExit):
        cli.main(["neighbours", "--help"])
    out = capsys.readouterr().out
    assert "--run" in out and "--config" in out and "key=value" in out and "--round" in out


def test_overrides_and_sources_are_told_apart():
    args = cli.build_parser().parse_args(["ingest", "a.mp4", "frames/", "ingest.frame_stride=2", "--run", "r"])
    cfg = cli.config_from_args(args)
    assert cfg.sources == ("a.mp4", "frames/") and cfg.ingest.frame_stride == 2 and cfg.run == "r"


def test_mistyped_key_is_named(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["neighbours", "--run", "r", "neighbours.kk=3"])
    assert exc.value.code == 2
    assert "neighbours.kk" in capsys.readouterr().err


def test_console_script_is_installed():
    script = shutil.which("cliquecnn", path=os.path.dirname(sys.executable))
    assert script, "the cliquecnn entry point is not installed beside this Python"
    out = subprocess.run([script, "ingest", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "SOURCE" in out.stdout


def test_overrides_may_follow_options():
    args = cli.parse_args(cli.build_parser(), ["neighbours", "--run", "r", "neighbours.k=7", "--round", "1"])
    cfg = cli.config_from_args(args)
    assert cfg.neighbours.k == 7 and args.round == 1


def test_bad_input_is_one_line_not_a_traceback(tmp_path, capsys):
    code = cli.main(["cliques", "--run", str(tmp_path / "empty-run"), "-q"])
    err = capsys.readouterr().err
    assert code == 1 and "has no committed output" in err and "Traceback" not in err


def test_bare_config_name_is_the_packaged_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ folder here: only the package's copy can answer
    assert {"demo", "fashion_mnist"} <= set(cli.packaged_configs())
    args = cli.parse_args(cli.build_parser(), ["pipeline", "--config", "demo", "rounds=1"])
    cfg = cli.config_from_args(args)
    assert cfg.sources == ("demo",) and cfg.rounds == 1 and cfg.train.steps == 60
    (tmp_path / "demo").write_text("rounds: 3\n")  # a file of that name here wins: paths keep their meaning
    assert cli.config_from_args(cli.parse_args(cli.build_parser(), ["pipeline", "--config", "demo"])).rounds == 3
