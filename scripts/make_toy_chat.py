"""Write a toy arithmetic chat corpus (OpenAI `messages` records, or Alpaca records).

A learnable task for CPU fine-tuning runs and tests: `What is 12+7?` -> `19`. Deterministic.

    python scripts/make_toy_chat.py configs/data/arith_chat.jsonl --n 2000
    python scripts/make_toy_chat.py out.jsonl --format instruction
"""

from __future__ import annotations

import argparse
import json
import random


def records(n: int, fmt: str, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 49), rng.randint(0, 49)
        if fmt == "instruction":
            out.append({"instruction": "Add the two numbers.", "input": f"{a}+{b}", "output": str(a + b)})
        else:
            out.append({"messages": [{"role": "system", "content": "You add numbers."},
                                     {"role": "user", "content": f"What is {a}+{b}?"},
                                     {"role": "assistant", "content": str(a + b)}]})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--format", choices=["chat", "instruction"], default="chat")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    with open(args.out, "w") as f:
        for r in records(args.n, args.format, args.seed):
            f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
