"""Progress in a log or a pipe: plain lines, about one per tenth of the work, never carriage returns."""
import io
import subprocess
import sys

import pytest

from LabelConditionedSegLib.progress import LineProgress, progress_bar, set_quiet


@pytest.fixture(autouse=True)
def not_quiet():
    """An `lcs ... --quiet` run earlier in this process leaves progress off; these tests need it on."""
    set_quiet(False)


def test_a_log_gets_a_line_per_tenth_and_no_carriage_returns():
    log = io.StringIO()
    bar = progress_bar(total=200, desc="training", file=log)
    assert isinstance(bar, LineProgress)
    for step in range(200):
        bar.set_postfix(loss=f"{1 / (step + 1):.3f}")
        bar.update()
    bar.close()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and len(lines) == 10
    assert lines[0].startswith("training: 20/200 (10 %)") and lines[-1].startswith("training: 200/200 (100 %)")
    assert "loss=0.005" in lines[-1]


def test_wrapping_an_iterable_and_stopping_early_say_where_it_ended():
    log = io.StringIO()
    assert list(progress_bar(range(7), desc="cases", file=log)) == list(range(7))
    assert log.getvalue().splitlines()[-1].startswith("cases: 7/7 (100 %)")
    log = io.StringIO()
    bar = progress_bar(total=1000, desc="training", file=log)
    bar.update(37)
    bar.close()  # e.g. --minutes ran out
    assert log.getvalue().splitlines() == [log.getvalue().splitlines()[0]] and "37/1000 (4 %)" in log.getvalue()


def test_a_long_run_far_from_its_next_tenth_logs_about_every_minute():
    """`lcs train --steps 100000 --minutes 60` never reaches a tenth: in a pipe it still logs a line at least every
    EVERY_SECONDS, about a minute (a real progress_bar in a process whose stderr is a pipe, the interval set to 0.2 s)."""
    from LabelConditionedSegLib import progress
    assert 30 <= progress.EVERY_SECONDS <= 60
    code = ("import time\n"
            "from LabelConditionedSegLib import progress\n"
            "progress.EVERY_SECONDS = 0.2\n"
            "bar = progress.progress_bar(total=100000, desc='training')\n"
            "end = time.time() + 1.1\n"
            "while time.time() < end:\n"
            "    time.sleep(0.01)\n"
            "    bar.update()\n"
            "bar.close()\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    lines = result.stderr.splitlines()
    assert result.returncode == 0 and "\r" not in result.stderr, result.stderr
    assert 5 <= len(lines) <= 7, lines  # one by time at 0.2, 0.4, ... 1.0 s (+ one late on a loaded machine), one at the end
    assert all(line.startswith("training: ") and "/100000 (0 %)" in line for line in lines), lines
    steps = [int(line.split(" ")[1].split("/")[0]) for line in lines]
    assert steps == sorted(steps) and len(set(steps)) == len(steps), lines


def test_quiet_prints_nothing():
    log = io.StringIO()
    set_quiet(True)
    try:
        bar = progress_bar(total=10, desc="x", file=log)
        bar.update(10)
        bar.close()
    finally:
        set_quiet(False)
    assert log.getvalue() == ""


def test_the_cli_writes_lines_to_a_pipe():
    code = ("from LabelConditionedSegLib.cli import _console_progress\n"
            "update, bar = _console_progress()\n"
            "for i in range(101): update(i / 100, 'decoding')\n"
            "bar.close()\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and "\r" not in result.stderr
    assert 9 <= len(result.stderr.splitlines()) <= 11, result.stderr
