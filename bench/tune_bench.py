"""Tune: the ASHA sweep versus the same sweep without early stopping (FIFO).

Both sweeps run `raylm.tune.run_sweep` on tune_configs/tiny_sweep.yaml (same seeded random search,
so the same sampled trials in the same order), on the same prepared data, one after the other
on the same Ray cluster. Reported: wall time of each sweep, total training steps over all
trials (the step of each trial's last evaluation), and whether both pick the same best trial
(same sampled parameters).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, stage_main  # noqa: E402
from report import ratio  # noqa: E402


def run(args) -> dict:
    from common import start_ray
    from raylm.config import load_config
    from raylm.data import prepare_data
    from raylm.tune import run_sweep

    storage = os.path.join(args.workdir, "sweeps")
    extra = ["train.max_steps=20", "train.eval_every_steps=5", "train.checkpoint_every_steps=10"] if args.quick else []
    ray = start_ray(num_cpus=4)

    def cfg_for(scheduler: str):
        return load_config(str(REPO / "tune_configs" / "tiny_sweep.yaml"), [
            f"train.storage_path={storage}", f"tune.scheduler={scheduler}", f"tune.sweep_name=bench-{scheduler}",
            *extra])

    prepared = prepare_data(cfg_for("asha").data, verbose=False)
    outcomes = {s: run_sweep(cfg_for(s), prepared) for s in ("asha", "fifo")}
    ray.shutdown()

    rows, info = [], {}
    for name, o in outcomes.items():
        steps = sum(t.steps for t in o.trials)
        info[name] = {"seconds": o.seconds, "steps": steps, "best": o.best.params if o.best else None,
                      "best_value": o.best.last_value if o.best else None,
                      "trials": [{"params": t.params, "status": t.status, "steps": t.steps, "best": t.best_value}
                                 for t in o.trials]}
        stopped = sum(1 for t in o.trials if t.status == "stopped early")
        rows.append([f"{name.upper()} ({'early stopping' if name == 'asha' else 'no early stopping'})",
                     len(o.trials), stopped, steps, o.seconds,
                     o.best.trial_id if o.best else "-",
                     ", ".join(f"{k.split('.')[-1]}={v:.3g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
                               for k, v in sorted((o.best.params if o.best else {}).items())),
                     o.best.last_value if o.best else None])
    a, f = info["asha"], info["fifo"]
    same = a["best"] == f["best"] and a["best"] is not None
    return {
        "title": "4. Tune: ASHA vs no early stopping",
        "note": __doc__.split("\n\n", 1)[1].strip() + (" --quick: 20 steps, an evaluation every 5." if args.quick else ""),
        "tables": [{"columns": ["sweep", "trials", "stopped early", "total steps", "wall s", "best trial",
                                "best params", "best val_loss"], "rows": rows},
                   {"columns": ["ASHA / FIFO wall time", "ASHA / FIFO steps", "same best trial"],
                    "rows": [[ratio(a["seconds"], f["seconds"]), ratio(a["steps"], f["steps"]), same]]}],
        "goals": [],
        "findings": [f"both sweeps picked {'the same' if same else 'different'} best parameters: "
                     f"ASHA {a['best']} vs FIFO {f['best']}"],
        "raw": info,
    }


if __name__ == "__main__":
    stage_main(run)
