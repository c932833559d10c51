import json

import numpy as np
import pytest

from raylm.config import DataConfig
from raylm.data import (DataError, decode_counting, embedded_documents, file_to_rows, load_tokenizer,
                        pack_batch, pack_remainders, parse_jsonl, resolve_source, split_text, tokenize_and_pack,
                        train_tokenizer)


def test_decode_counts_replacements_only_for_bad_bytes():
    assert decode_counting("héllo".encode()) == ("héllo", 0)
    text, n = decode_counting(b"ok \xff\xfe end \xc3")
    assert n == 3 and text.startswith("ok ") and "end" in text  # \xff, \xfe, truncated \xc3
    already = "a\ufffdb".encode()  # a real U+FFFD in the input is not a replacement
    assert decode_counting(already + b"\xff")[1] == 1


def test_jsonl_skips_and_counts_bad_lines():
    lines = [json.dumps({"text": "one"}), "{not json", json.dumps({"other": 1}), "", json.dumps({"text": "two"}),
             json.dumps([1, 2]), '{"text": "trunc']
    docs, skipped = parse_jsonl("\n".join(lines), "text")
    assert docs == ["one", "two"] and skipped == 4


def test_split_modes():
    text = "a b\nc\n\n\nd\n\n"
    assert split_text(text, "paragraph") == ["a b\nc", "d"]
    assert split_text(text, "line") == ["a b", "c", "d"]
    assert split_text(text, "file") == ["a b\nc\n\n\nd"]


def test_file_rows_carry_counters_once():
    rows = file_to_rows({"bytes": b"x\n\ny\xff", "path": "f.txt"}, "text", "text", "paragraph")
    assert [r["text"] for r in rows if r["text"]] == ["x", "y\ufffd"]
    assert sum(r["replaced"] for r in rows) == 1 and sum(r["files"] for r in rows) == 1


@pytest.mark.parametrize("block_len", [3, 5, 8])
def test_packing_round_trips_tokens(block_len):
    rng = np.random.default_rng(block_len)
    batches = [[rng.integers(0, 100, rng.integers(1, 9)).astype(np.int32) for _ in range(7)] for _ in range(4)]
    full, leftovers = [], []
    for docs in batches:
        blocks, tail = pack_batch(docs, block_len)
        full += list(blocks)
        leftovers.append(tail)
        assert len(tail) < block_len
    extra, dropped = pack_remainders(leftovers, block_len)
    assert all(len(b) == block_len for b in full + extra)
    assert 0 <= dropped < block_len
    total = sum(len(d) for docs in batches for d in docs)
    assert (len(full) + len(extra)) * block_len + dropped == total
    # order within a batch is preserved: the first block is the first tokens of the first batch
    first = np.concatenate(batches[0])
    if len(first) >= block_len:
        assert np.array_equal(full[0], first[:block_len])


def test_tokenize_and_pack_rows_and_counters(tmp_path):
    out_dir = train_tokenizer(["the quick brown fox jumps over the lazy dog"] * 40, 300, str(tmp_path / "tok"))
    tok = load_tokenizer(out_dir)
    texts = ["the quick brown fox", "", "jumps over the lazy dog " * 3, "dog"]
    batch = {"text": np.array(texts, dtype=object), "replaced": np.array([0, 0, 2, 0]),
             "skipped": np.array([0, 1, 0, 0]), "files": np.array([0, 1, 0, 0]), "truncated": np.array([0, 0, 0, 1])}
    out = tokenize_and_pack(batch, tok.backend_tokenizer.to_str(), tok.eos_token_id, block_len=5)
    expected = np.concatenate([tok.encode(t, add_special_tokens=False) + [tok.eos_token_id] for t in texts if t])
    n_full = len(expected) // 5
    assert out["input_ids"].shape == (n_full + 1, 5) and list(out["length"][:-1]) == [5] * n_full
    tail_len = int(out["length"][-1])
    assert tail_len == len(expected) % 5
    assert np.array_equal(np.concatenate([out["input_ids"][:-1].ravel(), out["input_ids"][-1, :tail_len]]), expected)
    counts = {k: out[k].tolist() for k in ("documents", "tokens", "replaced", "skipped", "files", "truncated")}
    assert counts == {"documents": [0] * n_full + [3], "tokens": [0] * n_full + [len(expected)],
                      "replaced": [0] * n_full + [2], "skipped": [0] * n_full + [1],
                      "files": [0] * n_full + [1], "truncated": [0] * n_full + [1]}


def test_resolve_source_errors_name_the_path(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        resolve_source(DataConfig(source=str(tmp_path / "missing.txt")))
    with pytest.raises(DataError, match="glob matches no files"):
        resolve_source(DataConfig(source=str(tmp_path / "*.jsonl")))
    (tmp_path / "a.txt").write_text("x")
    (tmp_path / "b.jsonl").write_text("{}")
    with pytest.raises(DataError, match="mixes formats"):
        resolve_source(DataConfig(source=str(tmp_path)))
    (tmp_path / "c.bin").write_text("x")
    with pytest.raises(DataError, match="data.format"):
        resolve_source(DataConfig(source=str(tmp_path / "c.bin")))
    src = resolve_source(DataConfig(source=str(tmp_path / "*.txt")))
    assert src.kind == "text" and src.paths == (str(tmp_path / "a.txt"),)
    assert resolve_source(DataConfig(source="s3://bucket/corpus.parquet")).kind == "parquet"
    assert resolve_source(DataConfig(source="hf:roneneldan/TinyStories")).kind == "hf"


def test_embedded_corpus_is_offline_english():
    docs = embedded_documents()
    assert len(docs) > 50 and sum(map(len, docs)) > 200_000
    assert any("for" in d and "statement" in d for d in docs)


def test_trained_tokenizer_round_trips(tmp_path):
    texts = ["To be, or not to be, that is the question."] * 50 + ["Whether 'tis nobler in the mind"] * 50
    out = train_tokenizer(texts, 300, str(tmp_path / "tok"))
    tok = load_tokenizer(out)
    ids = tok.encode(texts[0], add_special_tokens=False)
    assert tok.decode(ids) == texts[0]
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id


def test_fused_file_udf_packs_like_documents_one_by_one(tmp_path, monkeypatch):
    """TokenizePack on whole files (split inside the UDF, no row per document) gives the blocks
    and counters of splitting first and tokenizing the documents, handed out in pieces of at most
    CHUNK_BYTES (here 2 rows of 4 tokens), in order."""
    from raylm.data import TokenizePack, file_to_rows, packing

    monkeypatch.setattr(packing, "CHUNK_BYTES", 2 * 4 * 4)

    out_dir = train_tokenizer(["the quick brown fox jumps over the lazy dog"] * 40, 300, str(tmp_path / "tok"))
    tok = load_tokenizer(out_dir)
    files = {"path": np.array(["a.txt", "b.txt"], dtype=object),
             "bytes": np.array([b"the fox\n\njumps over\n\n", b"the lazy \xff dog\n\nquick"], dtype=object)}
    pieces = list(TokenizePack(tok.backend_tokenizer.to_str(), tok.eos_token_id, 4, threads=1, fmt="text")(files))
    assert len(pieces) > 1 and all(len(p["length"]) <= 2 for p in pieces)
    fused = {k: np.concatenate([p[k] for p in pieces]) for k in pieces[0]}
    rows = [r for p, b in zip(files["path"], files["bytes"])
            for r in file_to_rows({"path": p, "bytes": b}, "text", "text", "paragraph")]
    docs = {"text": np.array([r["text"] for r in rows], dtype=object),
            **{k: np.array([r[k] for r in rows]) for k in ("replaced", "skipped", "files", "truncated")}}
    one_by_one = tokenize_and_pack(docs, tok.backend_tokenizer.to_str(), tok.eos_token_id, block_len=4)
    assert fused.keys() == one_by_one.keys()
    assert all(np.array_equal(fused[k], one_by_one[k]) for k in fused)
    assert fused["documents"][-1] == 4 and fused["files"][-1] == 2 and fused["replaced"][-1] == 1
