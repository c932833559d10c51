"""The data stage: read a corpus with Ray Data, tokenize, pack into fixed rows, split; then shard
the result for Ray Train. One module per concern, in import order (each imports only those above):

    sources.py    data.source -> Source (files | URI | HF dataset | embedded); DataError
    reading.py    Source -> documents (raw text) or records (chat / instruction), counters on rows
    tokenizer.py  load a named tokenizer or train a BPE on the corpus; its files travel to workers
    chat.py       chat / instruction record -> messages -> ids + trained-token mask -> example
    preference.py preference record -> (prompt, chosen, rejected) -> one row per pair
    packing.py    tokens -> fixed rows: raw-text blocks of seq_len + 1, SFT rows of packed examples
    prepare.py    prepare_data: the whole stage on Ray -> PreparedData (train / val, DataStats)
    sharding.py   disjoint per-worker shards for Ray Train (make_data_config)

Callers import from here (`from raylm.data import prepare_data`): this file re-exports every
public name of the modules. Ray is imported lazily: unit tests and config errors never start it.
"""

from raylm.data.chat import (IGNORE, ROLES, chat_messages, instruction_messages, record_messages, render,
                             skipped_summary, to_example)
from raylm.data.packing import (COUNTERS, pack_batch, pack_examples, pack_remainders, packed_logits,
                                render_and_pack, tokenize_and_pack)
from raylm.data.preference import PAIR_COLUMNS, encode_pair, pair_rows, preference_messages, render_pairs
from raylm.data.prepare import (DataStats, PreparedData, prepare_data, prepare_preference, prepare_sft, split_blocks,
                                stats_dict)
from raylm.data.reading import (decode_counting, file_to_rows, jsonl_lines, parse_jsonl, read_records,
                                rows_to_records, split_text)
from raylm.data.sharding import make_data_config, shard_indices
from raylm.data.sources import (REMOTE_PREFIXES, TEXT_EXTS, DataError, Source, embedded_documents,
                                load_hf_split, resolve_source)
from raylm.data.tokenizer import (EOS_TOKEN, PAD_TOKEN, load_tokenizer, tokenizer_files, train_tokenizer,
                                  write_tokenizer_files)

__all__ = [
    "COUNTERS", "EOS_TOKEN", "IGNORE", "PAD_TOKEN", "PAIR_COLUMNS", "REMOTE_PREFIXES", "ROLES", "TEXT_EXTS",
    "DataError", "DataStats", "PreparedData", "Source",
    "chat_messages", "decode_counting", "embedded_documents", "encode_pair", "file_to_rows", "instruction_messages",
    "jsonl_lines", "load_hf_split", "load_tokenizer", "make_data_config", "pack_batch", "pack_examples",
    "pack_remainders", "packed_logits", "pair_rows", "parse_jsonl", "preference_messages", "prepare_data",
    "prepare_preference", "prepare_sft", "read_records",
    "record_messages", "render", "render_and_pack", "render_pairs", "resolve_source", "rows_to_records", "shard_indices",
    "skipped_summary", "split_blocks", "split_text", "stats_dict", "to_example", "tokenize_and_pack",
    "tokenizer_files", "train_tokenizer", "write_tokenizer_files",
]
