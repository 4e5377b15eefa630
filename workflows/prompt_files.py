"""Prompt files (``prompts:`` of a distillation config), read as a stream: the driver and the embedding job never
hold a whole file, so a 200k-prompt file costs the driver a list of chunk offsets, not the prompts.

Formats, by suffix:

- ``.txt``: one prompt per line;
- ``.jsonl``: one JSON object per line, the prompt in its ``prompt``, ``text`` or ``caption`` field (the first of
  these the first object has; every line must have it);
- ``.parquet``: a string column named ``prompt``, ``text`` or ``caption`` (read column-only, batch by batch).

Every prompt is stripped; blank ones are skipped (counted). ``builtin`` is the built-in teacher's list. Errors name
the file and the line (or row) and what is wrong with it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

MAX_PROMPT_CHARS = 1000
FIELDS = ("prompt", "text", "caption")
FORMATS = (".txt", ".jsonl", ".parquet")
PARQUET_BATCH = 8192


@dataclass
class Scan:
    """One validating pass over a prompt source: how many prompts, where each chunk of ``chunk`` prompts starts
    (``(byte offset, line)`` for text formats, ``(row, row)`` for parquet and builtin), and the content hash."""

    spec: str
    fmt: str  # "builtin" | ".txt" | ".jsonl" | ".parquet"
    field: str | None
    chunk: int
    n: int = 0
    skipped_blank: int = 0
    starts: list[tuple[int, int]] = field(default_factory=list)
    sha256: str = ""


def source_path(spec: str) -> Path | None:
    """The file behind ``spec`` (None for ``builtin``), checked: it exists and has a known suffix."""
    if spec == "builtin":
        return None
    path = Path(spec).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"prompts: {path} is not a file (.txt: one prompt per line; .jsonl; .parquet)")
    if path.suffix.lower() not in FORMATS:
        raise ValueError(f"prompts: {path} has suffix {path.suffix!r}; expected one of {', '.join(FORMATS)}")
    return path


def _builtin() -> list[str]:
    from workflows.prompts import train_prompts

    return [p for p, _ in train_prompts()]


def _check(path: Path, where: str, text: str) -> str:
    if len(text) > MAX_PROMPT_CHARS:
        raise ValueError(f"prompts: {path} {where} is longer than {MAX_PROMPT_CHARS} characters")
    return text


def _jsonl_prompt(path: Path, line_no: int, raw: bytes, fld: str | None) -> tuple[str, str]:
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"prompts: {path} line {line_no} is not valid JSON ({e.__class__.__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"prompts: {path} line {line_no} is a JSON {type(obj).__name__}, not an object")
    if fld is None:
        fld = next((f for f in FIELDS if f in obj), None)
        if fld is None:
            raise ValueError(f"prompts: {path} line {line_no} has none of the fields {', '.join(FIELDS)}")
    if fld not in obj:
        raise ValueError(f"prompts: {path} line {line_no} has no {fld!r} field (the first object's prompt field)")
    if not isinstance(obj[fld], str):
        raise ValueError(f"prompts: {path} line {line_no}: {fld!r} is a {type(obj[fld]).__name__}, not a string")
    return obj[fld], fld


def _text_lines(path: Path, offset: int = 0, line_no: int = 1) -> Iterator[tuple[int, int, bytes]]:
    """(byte offset, line number, raw line) from ``offset`` on, read in binary (offsets are exact)."""
    with open(path, "rb") as f:
        f.seek(offset)
        for raw in f:
            yield offset, line_no, raw
            offset += len(raw)
            line_no += 1


def _parquet_field(path: Path) -> str:
    import pyarrow.parquet as pq

    try:
        names = pq.ParquetFile(path).schema_arrow.names
    except Exception as e:  # pyarrow raises several types for a file that is not parquet
        raise ValueError(f"prompts: {path} is not a readable parquet file ({e})") from None
    fld = next((f for f in FIELDS if f in names), None)
    if fld is None:
        raise ValueError(f"prompts: {path} has no column {' / '.join(FIELDS)} (columns: {', '.join(names)})")
    return fld


def _parquet_rows(path: Path, fld: str, start: int = 0) -> Iterator[tuple[int, object]]:
    import pyarrow.parquet as pq

    row = 0
    for batch in pq.ParquetFile(path).iter_batches(columns=[fld], batch_size=PARQUET_BATCH):
        if row + batch.num_rows <= start:
            row += batch.num_rows
            continue
        for v in batch.column(0).to_pylist():
            if row >= start:
                yield row, v
            row += 1


def _records(spec: str, fld: str | None = None, start: tuple[int, int] = (0, 1)):
    """(position, line or row number, prompt or None for a blank, field) in file order, from ``start``."""
    path = source_path(spec)
    if path is None:
        for i, p in enumerate(_builtin()[start[0] :], start=start[0]):
            yield (i, i), i, p.strip() or None, None
        return
    fmt = path.suffix.lower()
    if fmt == ".parquet":
        fld = fld or _parquet_field(path)
        for row, v in _parquet_rows(path, fld, start[0]):
            if v is not None and not isinstance(v, str):
                raise ValueError(f"prompts: {path} row {row}: {fld!r} is a {type(v).__name__}, not a string")
            text = (v or "").strip()
            yield (row, row), row, _check(path, f"row {row}", text) if text else None, fld
        return
    for offset, line_no, raw in _text_lines(path, *start):
        if not raw.strip():
            yield (offset, line_no), line_no, None, fld
            continue
        if fmt == ".jsonl":
            text, fld = _jsonl_prompt(path, line_no, raw, fld)
        else:
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"prompts: {path} line {line_no} is not UTF-8 text") from None
        text = text.strip()
        yield (offset, line_no), line_no, _check(path, f"line {line_no}", text) if text else None, fld


def scan(spec: str, chunk: int = 256) -> Scan:
    """Validate the whole source in one streamed pass; record the start of every ``chunk`` prompts."""
    path = source_path(spec)
    fmt = "builtin" if path is None else path.suffix.lower()
    s = Scan(spec, fmt, None, chunk)
    h = hashlib.sha256()
    for pos, _, text, fld in _records(spec):
        s.field = fld
        if text is None:
            s.skipped_blank += 1
            continue
        if s.n % chunk == 0:
            s.starts.append(pos)
        s.n += 1
        h.update(text.encode() + b"\x00")  # the prompts themselves: the same ones in another format hash alike
    if s.n == 0:
        raise ValueError(f"prompts: {path or spec} holds no prompt")
    s.sha256 = h.hexdigest()
    return s


def read_chunk(s: Scan, k: int) -> list[str]:
    """Chunk ``k`` of a scanned source (``s.chunk`` prompts, fewer in the last), read from its recorded start."""
    out: list[str] = []
    want = min(s.chunk, s.n - k * s.chunk)
    for _, _, text, _ in _records(s.spec, s.field, s.starts[k]):
        if text is not None:
            out.append(text)
            if len(out) == want:
                break
    return out


def iter_prompts(spec: str) -> Iterator[str]:
    """Every prompt of the source, in order (validated as :func:`scan` does)."""
    for _, _, text, _ in _records(spec):
        if text is not None:
            yield text
