"""The CLI's output modes: plain lines (not a terminal) stay few, --json prints only JSON events."""

from __future__ import annotations

import json

import pytest

from raylm import console


@pytest.fixture
def mode(monkeypatch):
    """console.configure, with everything it touches in this process put back afterwards."""
    import logging

    for key in ("PYTHONWARNINGS", "RAY_DATA_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY"):
        monkeypatch.delenv(key, raising=False)  # recorded: restored at teardown
    levels = {name: logging.getLogger(name).level for name in console.NOISY_LOGGERS}
    saved = console._mode
    yield console.configure
    console._mode = saved
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def test_a_progress_bar_without_a_terminal_prints_a_line_per_quarter(mode, capsys):
    mode()
    bar = console.Progress("train: run", total=100, unit="steps")
    for step in range(1, 101):
        bar.update(step, loss=5.0 - step / 50)
    bar.close("done")
    lines = capsys.readouterr().out.splitlines()
    assert lines[:3] == ["train: run: 25/100 steps  loss 4.5", "train: run: 50/100 steps  loss 4",
                         "train: run: 75/100 steps  loss 3.5"]
    assert len(lines) == 4 and lines[3].startswith("train: run: 100/100 steps, done, ")


def test_json_mode_prints_only_json_events(mode, capsys):
    mode(json_events=True)
    console.say("for people only")
    console.say("trained", event="trained", step=3)
    bar = console.Progress("data", total=None)
    bar.update(1, blocks=10)
    bar.close("ok")
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["event"] for e in events] == ["trained", "progress", "stage_done"]
    assert events[0]["step"] == 3 and events[1]["blocks"] == 10 and events[2]["result"] == "ok"


def test_only_verbose_or_a_library_caller_gets_the_workers_logs(mode):
    console._mode = None  # tests, notebooks: nothing configured
    assert console.forward_worker_logs() and not console.quiet()
    mode(verbose=True)
    assert console.forward_worker_logs()
    mode()
    assert not console.forward_worker_logs() and console.quiet()
