"""Progress in logs: a bar on a terminal; elsewhere one plain line every ~10 s with the rate and the time left, and
never a carriage return (a log file or `ray job submit`'s output would keep every frame of a bar)."""
from __future__ import annotations

import io

from cluster.cli import main
from data.progress import LineProgress, NoProgress, progress


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_line_every_ten_seconds_with_rate_and_time_left_then_one_at_the_end():
    clock, lines = _Clock(), []
    bar = LineProgress(300, unit="img", desc="shards build", write=lines.append, clock=clock)
    for _ in range(25):  # 10 images a second for 25 s
        clock.now += 1
        bar.update(10)
    assert lines == ["shards build: 100/300 img (33%), 10.0 img/s, 0:20 left",
                     "shards build: 200/300 img (67%), 10.0 img/s, 0:10 left"]
    bar.set_postfix_str("3.2 MB/s read")
    bar.close()
    assert lines[-1] == "shards build: 250/300 img (83%), 10.0 img/s, done in 0:25, 3.2 MB/s read"
    bar.close()  # nothing new since: no second final line
    assert len(lines) == 3


def test_a_resumed_count_rates_only_what_this_run_did():
    clock, lines = _Clock(), []
    bar = LineProgress(1000, initial=900, unit="step", desc="train", write=lines.append, clock=clock)
    clock.now = 10
    bar.update(50)
    assert lines == ["train: 950/1,000 step (95%), 5.0 step/s, 0:10 left"]


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_bar_only_on_a_terminal_and_nothing_when_turned_off(monkeypatch):
    from tqdm import tqdm

    assert isinstance(progress(10, stream=io.StringIO()), LineProgress)
    bar = progress(10, stream=_Tty())
    assert isinstance(bar, tqdm)
    bar.close()
    assert isinstance(progress(10, enabled=False), NoProgress)
    monkeypatch.setenv("BGSPLIT_PROGRESS", "0")  # a Ray task of a pass: its driver reports
    assert isinstance(progress(10, stream=io.StringIO()), NoProgress)


def test_shards_build_into_a_log_writes_lines_not_carriage_returns(tmp_path, capsys):
    out = tmp_path / "set"
    assert main(["shards", "build", "--source", "fmnist:test", "--rare", "3", "--subsample", "300", "--writers", "0",
                 "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    line = next(line for line in err.splitlines() if line.startswith("shards build: "))
    assert line.startswith("shards build: 300/300 img (100%), ") and "img/s, done in " in line and "MB/s read" in line
