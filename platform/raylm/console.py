"""What raylm prints for people, and how loud the libraries under it may be.

Three modes, set once by the CLI (`configure`):
- default: a short story. The header with the derived numbers, one progress bar per stage
  (a live bar on a terminal; a few plain lines when the output is a file or a CI log), results.
  Ray's, DeepSpeed's and vLLM's own logs and Python warnings are kept out.
- `-v`: the libraries' logs come back (Ray forwards every worker's output), as before.
- `--json`: one JSON object per line (`{"event": ..., ...}`), for machines; nothing else on stdout.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import warnings
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator, Optional

if TYPE_CHECKING:  # a hint only: importing the whole config imports Ray Serve, which every Ray Data
    from raylm.config import RaylmConfig  # and Train worker importing raylm.data would pay for

_mode: Optional[str] = None  # "default" | "verbose" | "json"; None: not a CLI (tests, a notebook): as verbose
NOISY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve", "deepspeed", "DeepSpeed", "transformers",
                 "vllm", "httpx", "filelock", "torch")


QUIET_ENV = {"PYTHONWARNINGS": "ignore", "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error",
             "RAY_AIR_NEW_OUTPUT": "0"}  # Tune's legacy reporter: verbose=0 silences it (the new one prints a box)
_user_err: Any = None  # where our own errors go while fd 2 is redirected to the log file
log_path: Optional[str] = None


def configure(verbose: bool = False, json_events: bool = False) -> None:
    """Set the mode; outside verbose mode, silence what the libraries print in this process (the
    Ray workers' output is not forwarded either: see `forward_worker_logs`)."""
    global _mode
    _mode = "json" if json_events else "verbose" if verbose else "default"
    if _mode == "verbose":
        return
    warnings.simplefilter("ignore")
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)  # also inherited by the processes Ray starts from here
    silence()


def silence() -> None:
    """Quiet the libraries' loggers (again: Ray Data and Serve set their own levels when they start)."""
    if quiet():
        for name in NOISY_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)


@contextmanager
def session(verb: str, verbose: bool = False, json_events: bool = False, restore: bool = True) -> Iterator[None]:
    """One CLI command's output. Quiet modes send everything written to file descriptor 2 (the
    libraries' logs and warnings, Ray's and vLLM's processes started from here) to a log file
    named at start-up; raylm's own errors still reach the terminal (`error`). Everything is put
    back afterwards, so a caller in the same process (a test) is not changed by it; the CLI process
    itself (`restore=False`) keeps the log file to the end, for what libraries print at exit."""
    global _user_err, log_path
    saved_env = {k: os.environ.get(k) for k in QUIET_ENV}
    saved_levels = {name: logging.getLogger(name).level for name in NOISY_LOGGERS}
    saved_fd = None
    with warnings.catch_warnings():
        configure(verbose, json_events)
        if quiet() and sys.stderr is sys.__stderr__:  # a real terminal or pipe, not a test's capture
            log_dir = os.path.expanduser("~/.cache/raylm/logs")
            os.makedirs(log_dir, exist_ok=True)
            log_path = os.path.join(log_dir, f"{verb}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log")
            sys.stderr.flush()
            saved_fd = os.dup(2)
            _user_err = os.fdopen(os.dup(2), "w", buffering=1)
            with open(log_path, "a") as log:
                os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            if restore:
                _restore(saved_fd, saved_env, saved_levels)


def _restore(saved_fd: Optional[int], saved_env: dict, saved_levels: dict) -> None:
    global _mode, _user_err, log_path
    if saved_fd is not None:
        sys.stderr.flush()
        os.dup2(saved_fd, 2)
        os.close(saved_fd)
        _user_err.close()
    _mode, _user_err, log_path = None, None, None
    for key, value in saved_env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    for name, level in saved_levels.items():
        logging.getLogger(name).setLevel(level)


def error(text: str) -> None:
    """raylm's own error line, on the terminal's stderr even while the libraries' go to the log."""
    where = f" (full log: {log_path})" if log_path else ""
    print(f"error: {text}{where}", file=_user_err or sys.stderr, flush=True)


def note(text: str) -> None:
    """A line for people beside the command's output (stdout stays what scripts read), on the
    terminal's stderr even while the libraries' go to the log."""
    print(text, file=_user_err or sys.stderr, flush=True)


def quiet() -> bool:
    """The CLI without -v: progress comes from raylm, not from the libraries' logs."""
    return _mode in ("default", "json")


def forward_worker_logs() -> bool:
    """Whether Ray should copy every worker's stdout/stderr to this terminal (not when quiet)."""
    return not quiet()


def say(text: str = "", event: Optional[str] = None, **fields: Any) -> None:
    """A line for people, or (with --json) the event with its fields."""
    if _mode == "json":
        if event:
            print(json.dumps({"event": event, **fields}, default=str), flush=True)
        return
    print(text, flush=True)


def print_header(verb: str, cfg: RaylmConfig) -> None:
    """nanoGPT-style: the derived quantities a user wants to check before anything runs."""
    t, d = cfg.train, cfg.data
    say(f"raylm {verb}: data={d.source} seq_len={d.seq_len} model={cfg.model.name} "
        f"workers={t.num_workers} ({'GPU' if t.use_gpu else 'CPU'}) zero={cfg.deepspeed.zero_stage} "
        f"precision={cfg.precision} global_batch={t.effective_global_batch} "
        f"(micro {t.micro_batch_size} x accum {t.grad_accum_steps} x workers {t.num_workers}) "
        f"tokens/step={t.effective_global_batch * d.seq_len} storage={t.storage_path}"
        + (f"\n(Ray's, DeepSpeed's and vLLM's logs: {log_path}; -v shows them here)" if log_path else ""),
        event="start", verb=verb, config=cfg.model_dump(mode="json"))


class Progress:
    """One stage's progress: a live bar on a terminal, else a plain line at each quarter of the way
    (and at the end), so a CI log gets a few lines instead of hundreds. `total=None`: a stage
    whose length is unknown (a spinner with the elapsed time; plain: start and end lines)."""

    def __init__(self, desc: str, total: Optional[int] = None, unit: str = "it"):
        self.desc, self.total, self.unit = desc, total, unit
        self.n, self.t0, self.postfix = 0, time.perf_counter(), ""
        self._next_quarter = 1
        self.bar = None
        if _mode != "json" and sys.stdout.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=True, file=sys.stdout)
        elif _mode != "json" and total is None:
            say(f"{desc} ...")

    def update(self, n: int, **postfix: Any) -> None:
        """Move to position `n` (absolute), showing `postfix` (e.g. loss=..., tok/s=...)."""
        self.postfix = "  ".join(f"{k} {_fmt(v)}" for k, v in postfix.items())
        delta, self.n = n - self.n, n
        if _mode == "json":
            print(json.dumps({"event": "progress", "stage": self.desc, "n": n, "total": self.total, **postfix},
                             default=str), flush=True)
        elif self.bar is not None:
            self.bar.set_postfix_str(self.postfix, refresh=False)
            self.bar.update(delta)
        elif self.total and n >= self._next_quarter * self.total / 4 and n < self.total:
            while self._next_quarter * self.total / 4 <= n:
                self._next_quarter += 1
            say(f"{self.desc}: {n}/{self.total} {self.unit}  {self.postfix}".rstrip())

    def close(self, result: str = "", show_elapsed: bool = True) -> None:
        """End the stage with its result line and (unless the result has it) the elapsed time."""
        elapsed = time.perf_counter() - self.t0
        if self.bar is not None:
            self.bar.close()
        if _mode == "json":
            print(json.dumps({"event": "stage_done", "stage": self.desc, "seconds": round(elapsed, 2),
                              "result": result}), flush=True)
            return
        parts = [f"{self.n}/{self.total} {self.unit}" if self.total else "", result,
                 f"{elapsed:.0f}s" if show_elapsed else ""]
        say(f"{self.desc}: {', '.join(p for p in parts if p)}")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    return str(v)
