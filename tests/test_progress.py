"""Progress of the long stages: a log line per tenth of the work when there is no terminal."""
import logging

from cliquecnn_ray import progress


def test_without_a_terminal_progress_is_a_log_line_per_tenth(caplog):
    assert not progress.on_terminal()  # pytest captures stderr: not a terminal
    log = logging.getLogger("cliquecnn_ray.test")
    with caplog.at_level(logging.INFO, logger="cliquecnn_ray"), progress.Progress("work", 50, log, unit="items") as p:
        for _ in range(50):
            p.update(1, note="loss 1.0")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 10 and lines[0] == "work: 5/50 items (10%), loss 1.0" and lines[-1].startswith("work: 50/50")


def test_a_big_update_logs_once_and_the_end_logs_again(caplog):
    log = logging.getLogger("cliquecnn_ray.test")
    with caplog.at_level(logging.INFO, logger="cliquecnn_ray"):
        p = progress.Progress("tiles", 1000, log, bar=False)
        p.update(999)  # nine tenths passed at once: one line, not nine
        assert caplog.messages == ["tiles: 999/1000 (99%)"]
        p.update(1)
    assert caplog.messages[-1] == "tiles: 1000/1000 (100%)" and len(caplog.messages) == 2
