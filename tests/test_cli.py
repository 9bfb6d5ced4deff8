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


def test_bad_value_is_refused_before_work_naming_the_key(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["neighbours", "--run", "r", "neighbours.k=0"])
    assert exc.value.code == 2 and "neighbours.k" in capsys.readouterr().err


def test_a_stages_value_error_is_one_line(tmp_path, capsys):
    code = cli.main(["evaluate", "--run", str(tmp_path / "run"), "--ltp", "-1", "--labels", "x.parquet", "-q"])
    err = capsys.readouterr().err
    assert code == 1 and "ltp_p must be" in err and "Traceback" not in err


def test_a_second_driver_is_one_line_naming_the_holder(tmp_path, capsys):
    from cliquecnn_ray import lease

    run = str(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom cliquecnn_ray import lease\n"
                               "with lease.hold(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(600)",
                               run], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code = cli.main(["cliques", "--run", run, "-q"])
        err = capsys.readouterr().err
        assert code == 1 and f"pid {holder.pid}" in err and "--break-lock" in err and "Traceback" not in err
        # --break-lock takes it over; the command then meets its real problem (nothing committed yet)
        code = cli.main(["cliques", "--run", run, "--break-lock", "-q"])
        assert code == 1 and "has no committed output" in capsys.readouterr().err
        assert lease._held == {}
    finally:
        holder.kill()
        holder.wait()


def test_bare_config_name_is_the_packaged_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ folder here: only the package's copy can answer
    assert {"demo", "fashion_mnist"} <= set(cli.packaged_configs())
    args = cli.parse_args(cli.build_parser(), ["pipeline", "--config", "demo", "rounds=1"])
    cfg = cli.config_from_args(args)
    assert cfg.sources == ("demo",) and cfg.rounds == 1 and cfg.train.steps == 60
    (tmp_path / "demo").write_text("rounds: 3\n")  # a file of that name here wins: paths keep their meaning
    assert cli.config_from_args(cli.parse_args(cli.build_parser(), ["pipeline", "--config", "demo"])).rounds == 3
