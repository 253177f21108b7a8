"""Deterministic, streamed CSV.gz writing and MIMIC value formats for the synthetic world.

MIMIC-IV ships gzip CSVs with unquoted values, 'YYYY-MM-DD HH:MM:SS' times, dates without a time and empty
fields for NULL. :class:`CsvGzWriter` writes pyarrow tables that way, chunk by chunk (a 50-million-row
labevents never sits in memory), with a gzip header free of time stamps and file names, so the same seed
gives byte-identical files.
"""

from __future__ import annotations

import io
import math
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv

DAY = 86400


class CsvGzWriter:
    """Stream pyarrow tables (or DataFrames) into one deterministic ``.csv.gz`` file with a fixed header.

    Values never get quoted unless they must (as in MIMIC's files); a chunk with a comma, quote or newline
    in a value is written by pandas with minimal quoting instead of pyarrow.
    """

    def __init__(self, path: str | Path, columns: list[str], level: int = 6):
        self.columns = list(columns)
        self._file = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._zip = zlib.compressobj(level, zlib.DEFLATED, 31)  # 31 = gzip container, mtime 0, no name
        self._file.write(self._zip.compress((",".join(self.columns) + "\n").encode()))
        self.rows = 0

    def write(self, table: pa.Table | pd.DataFrame) -> None:
        if isinstance(table, pd.DataFrame):
            table = pa.Table.from_pandas(table, preserve_index=False)
        if table.column_names != self.columns:
            raise ValueError(f"columns {table.column_names} differ from the file's header {self.columns}")
        sink = pa.BufferOutputStream()
        try:
            pacsv.write_csv(table, sink, pacsv.WriteOptions(include_header=False, quoting_style="none"))
            data = memoryview(sink.getvalue())
        except pa.ArrowInvalid:  # a value needs quoting
            text = io.StringIO()
            table.to_pandas().to_csv(
                text,
                index=False,
                header=False,
                lineterminator="\n",
                float_format="%.15g",
                date_format="%Y-%m-%d %H:%M:%S",
            )
            data = text.getvalue().encode()
        self._file.write(self._zip.compress(data))
        self.rows += table.num_rows

    def close(self) -> None:
        self._file.write(self._zip.flush())
        self._file.close()


def write_table(path: Path, table: pa.Table | pd.DataFrame, level: int = 6) -> int:
    """Write one whole table; returns its row count."""
    columns = table.column_names if isinstance(table, pa.Table) else list(table.columns)
    writer = CsvGzWriter(path, columns, level)
    writer.write(table)
    writer.close()
    return writer.rows


def ts(seconds, null=None) -> pa.Array:
    """Epoch seconds -> timestamp array ('YYYY-MM-DD HH:MM:SS' in CSV); negative means missing."""
    seconds = np.asarray(seconds, dtype=np.int64)
    mask = seconds < 0 if null is None else null
    return pa.array(seconds, mask=mask).cast(pa.timestamp("s"))


def dates(seconds) -> pa.Array:
    """Epoch seconds -> date array ('YYYY-MM-DD'); negative means missing."""
    seconds = np.asarray(seconds, dtype=np.int64)
    return pa.array((seconds // DAY).astype(np.int32), mask=seconds < 0).cast(pa.date32())


def strings(values, null=None) -> pa.Array:
    return pa.array(np.asarray(values, dtype=object).astype(str), mask=null)


def providers(rng: np.random.Generator, n: int = 800) -> np.ndarray:
    """A pool of MIMIC-style provider ids ('P' + 5 characters)."""
    chars = np.array(list("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"))
    return np.array(["P" + "".join(row) for row in chars[rng.integers(0, 36, (n, 5))]])


def choice(rng, options, n, p=None) -> np.ndarray:
    return np.asarray(options, dtype=object)[rng.choice(len(options), size=n, p=p)]


def perm_ids(n: int, offset: int, modulus: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` distinct, scrambled ids in [offset, offset + modulus): an affine permutation of 0..n-1."""
    if n > modulus:
        raise ValueError(f"cannot draw {n} distinct ids from a range of {modulus}")
    mult = int(rng.integers(modulus // 3, modulus))
    while math.gcd(mult, modulus) != 1:
        mult += 1
    return offset + (mult * np.arange(n, dtype=np.int64) + int(rng.integers(0, modulus))) % modulus
