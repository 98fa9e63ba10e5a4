"""Where records come from: JSON/JSONL files, files and directories of the ``datasets`` library,
and the Hugging Face hub.

    rows = load_rows("train.parquet")            # [(where, record), ...]
    rows = load_rows("hf:tatsu-lab/alpaca:train")

``where`` names the record in error messages: ``file:line`` for JSON/JSONL (line 0 for the
records of a JSON array), ``file, row N`` (0-based, as ``ds[N]``) for everything read with
``datasets``. JSON and JSONL keep loralab's own reader for its line-numbered errors.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from loralab.errors import DataError

# file suffix -> the datasets builder that reads it
DATASETS_READERS = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv"}
HF_PREFIX = "hf:"


def read_with_datasets(path: str) -> bool:
    """Whether a data.path / data.val_path is read with the ``datasets`` library (parquet, arrow,
    CSV, a saved dataset directory, the hub) rather than loralab's own JSON reader."""
    return path.startswith(HF_PREFIX) or Path(path).is_dir() or Path(path).suffix.lower() in DATASETS_READERS


def load_rows(path: str) -> list[tuple[str, dict]]:
    """(where, record) pairs of a data.path / data.val_path (not builtin:)."""
    if path.startswith(HF_PREFIX):
        return _hub_rows(path)
    p = Path(path)
    if p.is_dir():
        return _rows(path, _saved_dataset(p))
    if p.suffix.lower() in DATASETS_READERS:
        if not p.is_file():
            raise DataError(f"dataset file {p} does not exist")
        rows = _rows(path, _datasets_file(p))
        return _csv_lines(path, rows) if p.suffix.lower() == ".csv" else rows
    return json_rows(p)


def _csv_lines(path: str, rows: list[tuple[str, dict]]) -> list[tuple[str, dict]]:
    """A CSV's rows named ``file:LINE``, the line an editor shows each record starting on
    (after the header, blank lines skipped as pandas skips them; a quoted field may span lines);
    as ``file, row N`` where the file cannot be read that way."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader, starts, end = csv.reader(f), [], 0
            for record in reader:
                if record:
                    starts.append(end + 1)
                end = reader.line_num
    except (OSError, UnicodeDecodeError, csv.Error):
        return rows
    lines = starts[1:]  # the first is the header
    if len(lines) != len(rows):
        return rows
    return [(f"{path}:{line}", rec) for line, (_, rec) in zip(lines, rows, strict=True)]


def json_rows(path: str | Path) -> list[tuple[str, dict]]:
    """read_records with each record's ``where``: file:line (JSONL), file (record N) (JSON array)."""
    return [(f"{path}:{line}" if line else f"{path} (record {i})", rec)
            for i, (line, rec) in enumerate(read_records(path), 1)]


def read_records(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, record) pairs from a JSON array or JSONL file."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"dataset file {p} does not exist")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark (some editors write one) is no record
    except UnicodeDecodeError as exc:
        body = exc.object  # after a byte-order mark, if any
        line = body[: exc.start].count(b"\n") + 1
        raise DataError(f"{p}:{line}: not UTF-8 text (byte 0x{body[exc.start]:02x} at offset "
                        f"{exc.start + len(raw) - len(body)}); save the file as UTF-8") from None
    if not text.strip():
        raise DataError(f"{p}: the file is empty")
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{p}:{exc.lineno}: malformed JSON ({exc.msg}, column {exc.colno})") from None
        return [(0, r) for r in items]
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((n, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise DataError(f"{p}:{n}: malformed JSON line ({exc.msg}, column {exc.colno})") from None
    return out


def _datasets():
    try:
        import datasets
    except ImportError:
        raise DataError("reading parquet, arrow, CSV, saved datasets or hf: paths needs the datasets library: "
                        "pip install 'loralab[datasets]'") from None
    return datasets


def _rows(path: str, ds) -> list[tuple[str, dict]]:
    return [(f"{path}, row {i}", rec) for i, rec in enumerate(ds.to_list())]


def _datasets_file(p: Path):
    datasets = _datasets()
    kind = DATASETS_READERS[p.suffix.lower()]
    options = _csv_as_text(p, datasets) if kind == "csv" else {}
    try:
        return datasets.load_dataset(kind, data_files=str(p), split="train", **options)
    except Exception as exc:  # pyarrow and datasets raise many types for a damaged file
        raise DataError(f"{p}: cannot be read as {kind} ({type(exc).__name__}: {_first_line(exc)})") from None


def _csv_as_text(p: Path, datasets) -> dict:
    """load_dataset options that read every column of a CSV as text, as written: pandas would
    otherwise read an answer column of numbers as floats ("007" as 7.0) and the words NA, None or
    null as missing. Only an empty cell is missing. {} where the header cannot be read; a
    DataError for a file with no header or no rows (datasets' own errors name neither)."""
    try:
        with open(p, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            has_rows = any(row for row in reader)
    except (OSError, UnicodeDecodeError, csv.Error):
        return {}
    if not header:
        raise DataError(f"{p}: the file is empty")
    if not has_rows:
        raise DataError(f"{p}: a header ({', '.join(header)}) but no rows under it")
    if len(set(header)) != len(header):
        return {}
    return {"features": datasets.Features({name: datasets.Value("string") for name in header}),
            "keep_default_na": False, "na_values": [""]}


def _saved_dataset(p: Path):
    """A directory written by Dataset.save_to_disk (a DatasetDict's "train" split)."""
    datasets = _datasets()
    try:
        ds = datasets.load_from_disk(str(p))
    except FileNotFoundError as exc:
        raise DataError(
            f"{p}: a directory, but not one written by datasets' save_to_disk ({_first_line(exc)})") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"{p}: a saved DatasetDict without a train split (splits: {', '.join(ds)}); "
                            f"point data.path at one split's directory, e.g. {p / next(iter(ds))}")
        ds = ds["train"]
    return ds


def _hub_rows(path: str) -> list[tuple[str, dict]]:
    """hf:owner/name[:split] (split defaults to train); needs network unless datasets has it cached."""
    name, _, split = path[len(HF_PREFIX):].partition(":")
    split = split or "train"
    if not name:
        raise DataError(f"data.path {path!r}: expected hf:owner/name or hf:owner/name:split")
    datasets = _datasets()
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as exc:  # offline, unknown name, unknown split, gated dataset ...
        raise DataError(
            f"data.path {path}: cannot load {name} (split {split}) from the Hugging Face hub "
            f"({type(exc).__name__}: {_first_line(exc)}). Without network, save it on a connected machine "
            "with datasets' save_to_disk (or to_parquet) and set data.path to that directory or file"
        ) from None
    return _rows(path, ds)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "no message"
