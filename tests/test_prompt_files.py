"""Prompt files (.txt, .jsonl, .parquet) read as a stream, the Ray Data embedding job that writes the sharded store,
and the training worker's view of it (whole, or one part at a time)."""

from __future__ import annotations

import json
import tracemalloc

import pytest
import torch

from workflows.prompt_files import iter_prompts, read_chunk, scan

PROMPTS = [f"a photo of a {c} {k}" for k in ("bag", "coat", "shirt", "boot") for c in ("red", "blue", "grey", "tiny")]


def _write(tmp_path, fmt: str, prompts=PROMPTS, blanks=(3, 9)) -> str:
    rows = list(prompts)
    for i in blanks:  # blank entries are skipped in every format
        rows.insert(i, "   ")
    p = tmp_path / f"prompts{fmt}"
    if fmt == ".txt":
        p.write_text("\n".join(rows) + "\n")
    elif fmt == ".jsonl":
        p.write_text("".join(json.dumps({"id": i, "text": r}) + "\n" for i, r in enumerate(rows)))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"id": list(range(len(rows))), "caption": rows}), p, row_group_size=5)
    return str(p)


@pytest.mark.parametrize("fmt", [".txt", ".jsonl", ".parquet"])
def test_every_format_gives_the_same_prompts_hash_and_chunks(tmp_path, fmt):
    path = _write(tmp_path, fmt)
    s = scan(path, chunk=5)
    assert list(iter_prompts(path)) == PROMPTS
    assert s.n == len(PROMPTS) and s.skipped_blank == 2 and len(s.starts) == 4
    assert s.sha256 == scan(_write(tmp_path, ".txt"), chunk=5).sha256  # the prompts, not the format, decide it
    chunks = [read_chunk(s, k) for k in range(len(s.starts))]
    assert [len(c) for c in chunks] == [5, 5, 5, 1] and sum(chunks, []) == PROMPTS


@pytest.mark.parametrize(
    "name, content, needle",
    [
        ("a.txt", b"fine\n\xff\xfe bad\n", r"a\.txt line 2 is not UTF-8"),
        ("a.txt", ("x" * 1001 + "\n").encode(), r"a\.txt line 1 is longer than 1000"),
        ("a.txt", b"\n \n", "holds no prompt"),
        ("a.jsonl", b'{"prompt": "ok"}\n{"prompt": "ok"}\n{"prompt": \n', r"a\.jsonl line 3 is not valid JSON"),
        ("a.jsonl", b'{"prompt": "ok"}\n{"text": "other field"}\n', r"a\.jsonl line 2 has no 'prompt' field"),
        ("a.jsonl", b'{"id": 1}\n', r"line 1 has none of the fields prompt, text, caption"),
        ("a.jsonl", b'{"prompt": 3}\n', r"line 1: 'prompt' is a int, not a string"),
        ("a.jsonl", b'["a list"]\n', r"line 1 is a JSON list, not an object"),
        ("a.csv", b"prompt\nx\n", r"suffix '\.csv'; expected one of \.txt, \.jsonl, \.parquet"),
        ("a.parquet", b"not parquet at all", r"a\.parquet is not a readable parquet file"),
    ],
)
def test_bad_prompt_files_are_named_with_the_line(tmp_path, name, content, needle):
    p = tmp_path / name
    p.write_bytes(content)
    with pytest.raises(ValueError, match=needle):
        scan(str(p))


def test_a_parquet_file_without_a_prompt_column_lists_its_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": [1], "label": ["x"]}), tmp_path / "p.parquet")
    with pytest.raises(ValueError, match=r"no column prompt / text / caption \(columns: id, label\)"):
        scan(str(tmp_path / "p.parquet"))
    with pytest.raises(FileNotFoundError, match="is not a file"):
        scan(str(tmp_path / "missing.txt"))


def test_a_200k_prompt_file_is_scanned_without_holding_it(tmp_path):
    p = tmp_path / "big.txt"
    with open(p, "w") as f:
        for i in range(200_000):
            f.write(f"a photo of garment number {i} in a studio\n")
    tracemalloc.start()
    s = scan(str(p), chunk=256)
    _, streamed = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    held = list(iter_prompts(str(p)))
    _, whole = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert s.n == len(held) == 200_000 and len(s.starts) == 782
    assert read_chunk(s, 781) == held[781 * 256 :]
    assert streamed < 2 * 2**20 < 10 * 2**20 < whole  # the scan keeps chunk offsets; the list is the whole file


def test_the_embedding_job_writes_parts_the_store_serves_whole_or_streamed(ray_cluster, tmp_path):
    from cdm_core.reference_loop import prompt_batch
    from workflows.embedding_job import INDEX, prompt_embeddings
    from workflows.embeddings import encode_prompts
    from workflows.prompt_store import PromptStore

    prompts = [f"{p} number {i}" for i in range(3) for p in PROMPTS]  # 48 prompts
    path = _write(tmp_path, ".jsonl", prompts, blanks=(0, 20))
    store = prompt_embeddings(path, "t0", tmp_path / "runs", rows_per_part=10)
    index = json.loads((store / INDEX).read_text())
    assert index["total"] == 48 and [p["rows"] for p in index["parts"]] == [10, 10, 10, 10, 8]
    want = encode_prompts(prompts)
    # held whole (small): rank r of w draws from rows r::w, as the workers always have
    whole = PromptStore(store, rank=1, world=2)
    assert whole.whole and len(whole) == 24
    assert torch.allclose(whole.shard.tokens, want.tokens[1::2], atol=1e-5)
    assert torch.equal(whole.batch(4, 7, 3).tokens, prompt_batch(whole.shard, 4, 7, 3).tokens)
    assert torch.allclose(whole.head(10).tokens, want.tokens[:10], atol=1e-5)
    assert torch.allclose(whole.empty.tokens, encode_prompts([""]).tokens, atol=1e-5)
    # streamed (large): rank 1 of 2 owns parts 1 and 3, holds one at a time, two batches of 5 per part of 10
    s = PromptStore(store, rank=1, world=2, hold_whole_mib=0)
    assert not s.whole and [p.name for p in s.parts] == ["part-00001.pt", "part-00003.pt"] and len(s) == 20
    assert [s.part_of(i, 5) for i in range(6)] == [0, 0, 1, 1, 0, 0]

    def drawn_from(rows: torch.Tensor, lo: int, hi: int) -> bool:  # every drawn row is one of prompts[lo:hi]
        return bool((torch.cdist(rows.float(), want.pooled[lo:hi]).min(dim=1).values < 1e-4).all())

    for i in (0, 1, 4):  # this rank's first part is part 1: prompts 10-19
        assert drawn_from(s.batch(5, 7, i).pooled, 10, 20) and not drawn_from(s.batch(5, 7, i).pooled, 0, 10)
    assert drawn_from(s.batch(5, 7, 2).pooled, 30, 40) and s._held[0] == 1  # then part 3, the only one held
    # the draw depends on the iteration only: a fresh reader (a resumed worker) draws the same rows
    assert torch.equal(PromptStore(store, 1, 2, hold_whole_mib=0).batch(5, 7, 3).tokens, s.batch(5, 7, 3).tokens)
    # fewer parts than ranks: every rank reads every part, rows r::w of each
    t = PromptStore(store, rank=2, world=8, hold_whole_mib=0)
    assert len(t.parts) == 5 and len(t) == 5  # row 2 of each part
    assert drawn_from(t.batch(3, 7, 0).pooled, 2, 3)
    # a finished store is reused as it is (no second job), in any format of the same prompts
    mtime = (store / INDEX).stat().st_mtime_ns
    assert prompt_embeddings(_write(tmp_path, ".txt", prompts), "t0", tmp_path / "runs", rows_per_part=10) == store
    assert (store / INDEX).stat().st_mtime_ns == mtime
