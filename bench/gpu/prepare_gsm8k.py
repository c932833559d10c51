"""GSM8K as raylm prompt records, for bench/gpu/grpo_gsm8k_qwen05.yaml (the GPU GRPO recipe).

Reads `openai/gsm8k` (config "main") with Hugging Face datasets (the Hub once, or a copy saved with
`save_to_disk`: --from-disk) and writes <out>/train.jsonl (7473 records) and <out>/test.jsonl
(1319): each {"prompt": [{"role": "user", "content": question + INSTRUCTION}], "answer": the
dataset's answer text, ending "#### 72"}. `raylm.rewards:gsm8k` compares the number after the
completion's "####" with the answer's. The instruction is verl's GSM8K preprocessing's, so the
prompts are the ones its 36.4 -> 54.3 figures were measured on.

Why not `data.source: hf:openai/gsm8k` directly: the data stage loads a Hub dataset by name with
its default config, and gsm8k has two ("main", "socratic"), so it must be named; and verl's prompt
appends the instruction to the question, which `data.prompt.system_prompt` (a system turn) would not.

    python bench/gpu/prepare_gsm8k.py --out ~/data/gsm8k [--from-disk DIR]
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Iterable, Iterator

INSTRUCTION = 'Let\'s think step by step and output the final answer after "####".'


def gsm8k_records(rows: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """GSM8K rows ({question, answer}) -> raylm prompt records (data.format prompt)."""
    for row in rows:
        yield {"prompt": [{"role": "user", "content": f"{row['question'].strip()} {INSTRUCTION}"}],
               "answer": row["answer"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for train.jsonl and test.jsonl")
    parser.add_argument("--from-disk", default=None, help="a DatasetDict saved with save_to_disk (no Hub access)")
    args = parser.parse_args()
    import datasets

    ds = (datasets.load_from_disk(args.from_disk) if args.from_disk
          else datasets.load_dataset("openai/gsm8k", "main"))
    out = os.path.expanduser(args.out)
    os.makedirs(out, exist_ok=True)
    for split in ("train", "test"):
        path = os.path.join(out, f"{split}.jsonl")
        with open(path, "w") as f:
            n = 0
            for record in gsm8k_records(ds[split]):
                f.write(json.dumps(record) + "\n")
                n += 1
        print(f"{path}: {n} records")


if __name__ == "__main__":
    main()
