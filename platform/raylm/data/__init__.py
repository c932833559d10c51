"""The data stage: read a corpus with Ray Data, tokenize, pack into fixed rows, split; then shard
the result for Ray Train. One module per concern, in import order (each imports only those above):

    sources.py    data.source -> Source (files | URI | HF dataset | embedded); DataError
    reading.py    Source -> documents (raw text) or records (chat / instruction), counters on rows
    tokenizer.py  load a named tokenizer or train a BPE on the corpus; its files travel to workers
    chat.py       chat / instruction record -> messages -> ids + trained-token mask -> example
    preference.py preference record -> (prompt, chosen, rejected) -> one row per pair
    prompts.py    prompt record (GRPO) -> prompt ids + the columns reward functions read -> one row
    packing.py    tokens -> fixed rows: raw-text blocks of seq_len + 1, SFT rows of packed examples
    cache.py      the packed-token cache in storage: fingerprint, Parquet shards, manifest last
    prepare.py    prepare_data: reuse the cache, or build it on Ray -> PreparedData (DataStats)
    stream.py     a rank's share of the cache for Ray Train: per-epoch shuffle, exact position

Callers import from here (`from raylm.data import prepare_data`): this file re-exports every
public name of the modules. Ray is imported lazily: unit tests and config errors never start it.
"""

from raylm.data.chat import (IGNORE, ROLES, chat_messages, instruction_messages, record_messages, render,
                             skipped_summary, to_example)
from raylm.data.packing import (COUNTERS, TokenizePack, files_to_documents, pack_batch, pack_examples, pack_remainders, packed_logits,
                                render_and_pack, tokenize_and_pack)
from raylm.data.preference import PAIR_COLUMNS, encode_pair, pair_rows, preference_messages, render_pairs
from raylm.data.prompts import PROMPT_COLUMNS, encode_prompt, prompt_batch, prompt_messages, render_prompts
from raylm.data.cache import fingerprint
from raylm.data.prepare import DataStats, PreparedData, cached_data, prepare_data, stats_dict
from raylm.data.reading import (decode_counting, file_to_rows, jsonl_lines, parse_jsonl, read_records,
                                rows_to_records, split_text)
from raylm.data.stream import CacheStream, TrainStream
from raylm.data.sources import (REMOTE_PREFIXES, TEXT_EXTS, DataError, Source, embedded_documents,
                                load_hf_split, resolve_source)
from raylm.data.tokenizer import (EOS_TOKEN, PAD_TOKEN, check_tokenizer_fits, load_tokenizer, tokenizer_files, train_tokenizer,
                                  write_tokenizer_files)

__all__ = [
    "COUNTERS", "EOS_TOKEN", "IGNORE", "PAD_TOKEN", "PAIR_COLUMNS", "PROMPT_COLUMNS", "REMOTE_PREFIXES", "ROLES", "TEXT_EXTS",
    "CacheStream", "DataError", "check_tokenizer_fits", "TokenizePack", "files_to_documents", "DataStats", "PreparedData", "Source", "TrainStream",
    "cached_data", "chat_messages", "decode_counting", "embedded_documents", "encode_pair", "file_to_rows", "fingerprint", "instruction_messages",
    "jsonl_lines", "load_hf_split", "load_tokenizer", "pack_batch", "pack_examples",
    "pack_remainders", "packed_logits", "pair_rows", "encode_prompt", "prompt_batch", "prompt_messages", "render_prompts", "parse_jsonl", "preference_messages", "prepare_data", "read_records",
    "record_messages", "render", "render_and_pack", "render_pairs", "resolve_source", "rows_to_records",
    "skipped_summary", "split_text", "stats_dict", "to_example", "tokenize_and_pack",
    "tokenizer_files", "train_tokenizer", "write_tokenizer_files",
]
