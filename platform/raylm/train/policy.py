"""Checkpoint and export policy: when a checkpoint is saved, which ones get the Hugging Face export,
what a sweep trial's checkpoints are ranked by, and which checkpoint is the best one.

The one place that compares by `tune.mode`: the training workers (which checkpoints to export),
the sweep (each trial's best checkpoint, the best trial, best.json) and its progress bar ask here."""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Optional, TypeVar

from raylm import storage
from raylm.config import RaylmConfig
from raylm.train.checkpoint import is_exported, verified_checkpoints

T = TypeVar("T")

# What Ray Train ranks a sweep trial's checkpoints by (CheckpointConfig.checkpoint_score_attribute):
# tune.metric measured at the checkpoint's own step, the worst value when it was not measured.
CHECKPOINT_SCORE = "checkpoint_score"


def better(value: float, than: Optional[float], mode: str) -> bool:
    """`value` is at least as good as `than` by `mode` (min or max); anything beats no value."""
    return than is None or (value <= than if mode == "min" else value >= than)


def worst(mode: str) -> float:
    """The value every measured one beats: what an unmeasured checkpoint ranks as."""
    return float("inf") if mode == "min" else float("-inf")


def best(items: Iterable[T], mode: str, key: Optional[Callable[[T], Any]] = None) -> Optional[T]:
    """The best of `items` (by `key`) for `mode` (min or max), the first of equals; None when empty."""
    items = list(items)
    return (min if mode == "min" else max)(items, key=key) if items else None


def best_exported_checkpoint(run_dir: str, metric: str, mode: str) -> Optional[tuple[str, dict]]:
    """The run's servable checkpoint (hf/ present) with the best `metric` measured at its own step:
    what a sweep serves, rather than the newest."""
    scored = [(m["eval"][metric], path, m) for path, m in verified_checkpoints(run_dir, log=lambda _: None)
              if is_exported(m) and isinstance(m.get("eval", {}).get(metric), (int, float))]
    picked = best(scored, mode, key=lambda x: x[0])
    return None if picked is None else (picked[1], picked[2])


class Checkpointer:
    """A resumable checkpoint every train.checkpoint_every_steps (and at the end), into a local
    folder that the next Ray Train report uploads (`train.checkpoint_upload`).

    The consolidated HF export (train.export) goes with the final checkpoint, with every one under
    'every', and in a sweep trial (`keep_best`) with each checkpoint whose tune.metric, measured at
    its own step, is the best of the run so far: the one Ray Train keeps by score and best.json
    serves. `score` is what that checkpoint is ranked by (a checkpoint whose model was never
    evaluated ranks last: it cannot be the best one)."""

    def __init__(self, cfg: RaylmConfig, engine: Any, tokenizer: Any, resumed_from: Optional[str] = None,
                 keep_best: bool = False, identity: Optional[dict] = None, tracking: Optional[dict] = None):
        self.cfg, self.engine, self.tokenizer, self.keep_best = cfg, engine, tokenizer, keep_best
        # every manifest records them: the run's identity, and the tracker runs a resume goes on logging to
        self.identity, self.tracking = identity or {}, tracking or {}
        self.seconds = 0.0
        self.exported = False
        self.score: Optional[float] = None
        self.best: Optional[float] = None  # the best exported tune.metric so far, carried by the manifests
        if resumed_from:
            from raylm.train.checkpoint import MANIFEST

            self.best = storage.read_json(storage.join(resumed_from, MANIFEST)).get("best")

    def _better(self, value: float, than: Optional[float]) -> bool:
        return better(value, than, self.cfg.tune.mode)

    def plan(self, force: bool, evaluation: dict) -> bool:
        """Whether this checkpoint gets the HF export; sets `score` and carries `best` forward."""
        value = evaluation.get(self.cfg.tune.metric)
        best_so_far = self.keep_best and value is not None and self._better(value, self.best)
        self.exported = force or self.cfg.train.export == "every" or best_so_far
        if self.exported and value is not None and self._better(value, self.best):
            self.best = value
        self.score = (worst(self.cfg.tune.mode) if value is None else value) if self.keep_best else None
        return self.exported

    def maybe_save(self, pos: Any, force: bool, evaluation: Optional[dict] = None) -> Optional[str]:
        """`evaluation`: the numbers measured at this very step (an evaluation's, the logged loss)."""
        from raylm.train.checkpoint import SaveRecord, save_checkpoint

        if not (pos.step % self.cfg.train.checkpoint_every_steps == 0 or force):
            return None
        evaluation = {k: v for k, v in (evaluation or {}).items() if isinstance(v, (int, float))}
        export = self.plan(force, evaluation)
        t0 = time.perf_counter()
        local = save_checkpoint(self.engine, self.tokenizer, self.cfg, pos,
                                SaveRecord(export=export, evaluation=evaluation, best=self.best,
                                           identity=self.identity, tracking=self.tracking))
        self.seconds = time.perf_counter() - t0
        return local
