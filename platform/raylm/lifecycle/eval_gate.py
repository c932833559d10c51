"""The eval gate: the candidate and the served model evaluated on the same eval set, compared by
serve.promote.metric within serve.promote.tolerance."""

from __future__ import annotations

from raylm.config import RaylmConfig
from raylm.console import say
from raylm.errors import InputError

LOWER_IS_BETTER = {"val_loss": True, "perplexity": True, "exact_match": False, "contains": False}
EXIT_REFUSED = 3  # `raylm promote`: the candidate did not pass the gate (2 stays "bad input")


class PromotionRefused(Exception):
    """The candidate scored worse than the served model beyond serve.promote.tolerance."""


def compare(metric: str, tolerance: float, candidate: dict, served: dict) -> tuple[bool, str]:
    """Whether the candidate's eval is at least as good as the served model's by `metric`, within
    `tolerance` (in the metric's units), and a line giving both numbers."""
    ours, theirs = candidate.get(metric), served.get(metric)
    for name, result in (("candidate", ours), ("served model", theirs)):
        if not isinstance(result, (int, float)):
            raise InputError(f"serve.promote.metric={metric}: the {name}'s eval has no {metric} "
                             f"(it has {', '.join(sorted(k for k, v in (candidate if name == 'candidate' else served).items() if isinstance(v, (int, float))))})")
    lower = LOWER_IS_BETTER[metric]
    passed = ours <= theirs + tolerance if lower else ours >= theirs - tolerance
    line = (f"{metric}: candidate {ours:.4f} vs served {theirs:.4f} ({'lower' if lower else 'higher'} is better, "
            f"serve.promote.tolerance={tolerance:g})")
    return passed, line


def same_eval_set(a: dict, b: dict) -> None:
    if a.get("eval_set") != b.get("eval_set"):
        raise InputError(f"the evals of {a.get('checkpoint')} and {b.get('checkpoint')} are not on the same eval set "
                         f"({a.get('eval_set')} vs {b.get('eval_set')}): compare them with one config")


def eval_result(cfg: RaylmConfig, checkpoint: str) -> dict:
    """`raylm eval`'s result for the checkpoint on the config's eval set, reusing its eval.json when
    it already holds that (the served model was evaluated when it was promoted)."""
    from raylm.evaluate import evaluate_checkpoint, summary

    result = evaluate_checkpoint(cfg, checkpoint, reuse=True)
    say(f"eval of {checkpoint}{' (eval.json reused)' if result.get('reused') else ''}: {summary(result)}",
        event="evaluated", checkpoint=checkpoint, result=result)
    return result


def eval_results(cfg: RaylmConfig, candidate: str, served: str) -> tuple[dict, dict]:
    """The gate's two evaluations, at the same time: each starts its own vLLM engine (on 2 CPU
    cores, ~25 s of start-up that is mostly one process importing), and the served model's result
    is usually reused from its eval.json anyway. The eval set is prepared once first, so the two do
    not build the same cache together. Where the cluster has room for one engine only (one GPU),
    Ray Data runs the second after the first."""
    from concurrent.futures import ThreadPoolExecutor

    from raylm.data import prepare_data

    prepare_data(cfg.data, verbose=False, storage_path=cfg.train.storage_path)
    with ThreadPoolExecutor(2, thread_name_prefix="raylm-eval") as pool:
        ours, theirs = pool.submit(eval_result, cfg, candidate), pool.submit(eval_result, cfg, served)
        return ours.result(), theirs.result()


def gate(cfg: RaylmConfig, candidate: str, served: str) -> tuple[bool, str, dict]:
    """The gate itself: (passed, the line with both numbers, the metric and both values). Run by
    `raylm promote` before a rollout, and by `raylm eval --against` (the RayJob `raylm k8s promote`
    renders runs it on the cluster). Ray must be initialised."""
    ours, theirs = eval_results(cfg, candidate, served)
    same_eval_set(ours, theirs)
    metric = cfg.serve.promote.metric
    passed, line = compare(metric, cfg.serve.promote.tolerance, ours, theirs)
    return passed, line, {"metric": metric, "candidate": ours.get(metric), "served": theirs.get(metric)}
