"""The drain window a replaced LLM replica gets (serve/options.py `drain_window`): long enough for
the longest stream serve.max_tokens_limit allows at the measured inter-token latency, never below
serve.graceful_shutdown_timeout_s, raised no further than DRAIN_CAP_S."""

from __future__ import annotations

import pytest

from raylm.config import load_config
from raylm.serve.options import (DRAIN_CAP_S, DRAIN_ITL_SAFETY, DRAIN_MARGIN_S, deployment_options, drain_window,
                                 edge_options)


def serve(*sets: str):
    return load_config(None, list(sets)).serve


def test_the_window_covers_the_longest_generation_at_the_measured_latency():
    s = serve("serve.max_tokens_limit=4096", "serve.graceful_shutdown_timeout_s=30")
    w = drain_window(s, 0.02)  # 4096 x 20 ms x 2 + 5 = 168.84 s
    assert w.needed_s == pytest.approx(4096 * 0.02 * DRAIN_ITL_SAFETY + DRAIN_MARGIN_S)
    assert w.seconds == 169.0 and w.seconds >= w.needed_s
    assert "needed: max_tokens_limit 4096 x ITL 20.0 ms x 2 + 5 s = 168.8 s" in w.line(s)


def test_the_configured_window_is_a_floor():
    s = serve("serve.max_tokens_limit=64", "serve.graceful_shutdown_timeout_s=30")
    w = drain_window(s, 0.01)  # 64 x 10 ms x 2 + 5 = 6.28 s
    assert w.seconds == 30.0 and w.needed_s == pytest.approx(6.28)
    assert "drain window 30 s (needed:" in w.line(s)


def test_beyond_the_cap_the_window_stops_there_and_says_the_error_event_takes_over():
    s = serve("serve.max_tokens_limit=32768", "serve.graceful_shutdown_timeout_s=30")
    w = drain_window(s, 0.05)  # 32768 x 50 ms x 2 + 5 = 3281.8 s
    assert w.seconds == DRAIN_CAP_S < w.needed_s
    assert "above the cap" in w.line(s) and "error event" in w.line(s)
    # a configured window above the cap is the user's choice and kept
    big = serve("serve.max_tokens_limit=32768", "serve.graceful_shutdown_timeout_s=4000")
    assert drain_window(big, 0.05).seconds == 4000.0


def test_without_a_measurement_the_configured_window_stands_and_says_why():
    s = serve("serve.graceful_shutdown_timeout_s=20")
    w = drain_window(s, None, "the probe failed: TimeoutError")
    assert (w.seconds, w.needed_s) == (20.0, None)
    assert "not measured: the probe failed: TimeoutError" in w.line(s)


def test_the_window_goes_to_both_deployments():
    s = serve("serve.graceful_shutdown_timeout_s=20")
    assert deployment_options(s)["graceful_shutdown_timeout_s"] == edge_options(s)["graceful_shutdown_timeout_s"] == 20
    assert deployment_options(s, 169.0)["graceful_shutdown_timeout_s"] == 169.0
    assert edge_options(s, 169.0)["graceful_shutdown_timeout_s"] == 169.0
    assert deployment_options(s, 0.0)["graceful_shutdown_timeout_s"] == 0.0  # an explicit 0 (tests) is kept
