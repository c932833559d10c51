"""Write a toy arithmetic preference corpus: chosen is the right sum, rejected a wrong one.

A learnable task for DPO runs and tests: prompt `What is 12+7?`, chosen `19`, rejected e.g. `23`.
Chat form (prompt as messages, answers as assistant messages, like the Hugging Face preference
datasets) or plain form (three strings). Deterministic.

    python scripts/make_toy_preference.py configs/data/arith_pref.jsonl --n 1000 --max-operand 9
    python scripts/make_toy_preference.py out.jsonl --format plain
"""

from __future__ import annotations

import argparse
import json
import random


def records(n: int, fmt: str = "chat", seed: int = 0, max_operand: int = 49) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        right = a + b
        wrong = right + rng.choice([-1, 1]) * rng.randint(1, 9)
        wrong = wrong if wrong >= 0 else right + rng.randint(1, 9)
        if fmt == "plain":
            out.append({"prompt": f"What is {a}+{b}?", "chosen": str(right), "rejected": str(wrong)})
        else:
            out.append({"prompt": [{"role": "system", "content": "You add numbers."},
                                   {"role": "user", "content": f"What is {a}+{b}?"}],
                        "chosen": [{"role": "assistant", "content": str(right)}],
                        "rejected": [{"role": "assistant", "content": str(wrong)}]})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--format", choices=["chat", "plain"], default="chat")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-operand", type=int, default=49)
    args = p.parse_args()
    with open(args.out, "w") as f:
        for r in records(args.n, args.format, args.seed, args.max_operand):
            f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
