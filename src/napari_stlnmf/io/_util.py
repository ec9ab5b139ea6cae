"""Small helpers shared by the readers: file names, delimited tables, error-message lists."""

from __future__ import annotations

import gzip
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import CoordinateError, FileFormatError

TABLE_SUFFIXES = (".csv", ".tsv", ".txt")
_N_EXAMPLES = 5


def examples(values: Sequence[Any] | np.ndarray | pd.Index, n: int = _N_EXAMPLES) -> str:
    """Format up to ``n`` values for an error message."""
    values = list(values)
    shown = ", ".join(repr(str(v)) for v in values[:n])
    return shown + (", ..." if len(values) > n else "")


def table_suffix(path: Path) -> str | None:
    """Return the table suffix ('.csv', '.tsv', '.txt') of ``path``, ignoring '.gz'."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    if suffixes and suffixes[-1] in TABLE_SUFFIXES:
        return suffixes[-1]
    return None


def stem(path: Path) -> str:
    """File name without table/compression suffixes ('counts.csv.gz' -> 'counts')."""
    name = path.name
    for suffix in (".gz", *TABLE_SUFFIXES, ".h5ad"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return name


def _sniff_sep(path: Path) -> str:
    """Guess the delimiter from the header line (pandas' own sniffer is slow on wide tables)."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rt") as fh:
        header = fh.readline()
    for sep in ("\t", ",", ";"):
        if sep in header:
            return sep
    return r"\s+"


def _header(path: Path) -> str:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rt") as fh:
        return fh.readline().rstrip("\n")


def _has_decimal_commas(df: pd.DataFrame) -> bool:
    """Text columns that all become numbers with ',' read as the decimal separator."""
    text = [c for c in df.columns if not pd.api.types.is_numeric_dtype(df[c])]
    if not text:
        return False
    for column in text:
        values = df[column].dropna().astype(str)
        if not values.str.fullmatch(r"[-+]?\d+(,\d+)?([eE][-+]?\d+)?").all():
            return False
    return True


def read_table(path: Path, sep: str | None) -> pd.DataFrame:
    """Read a delimited table with the first column as string index."""
    if sep is None:
        sep = _sniff_sep(path)
    try:
        df = pd.read_csv(path, sep=sep, index_col=0)
    except pd.errors.EmptyDataError as err:
        raise FileFormatError(
            f"{str(path)!r} is empty: a table needs a header line and one row per entry."
        ) from err
    except (pd.errors.ParserError, UnicodeDecodeError, OSError, EOFError) as err:
        raise FileFormatError(f"Cannot read {str(path)!r} as a delimited table: {err}") from err
    if df.shape[1] == 0:
        raise FileFormatError(
            f"{str(path)!r} reads as a single column (delimiter {sep!r}): its header "
            f"{_header(path)[:80]!r} has no tab, comma, semicolon or space between the "
            "columns. Save it as CSV (comma) or TSV (tab), or pass sep= to read_slide."
        )
    if sep == ";" and _has_decimal_commas(df):
        # ';' with decimal commas is the spreadsheet export of comma-decimal locales
        df = pd.read_csv(path, sep=sep, index_col=0, decimal=",")
    df.index = df.index.astype(str)
    df.columns = df.columns.astype(str)
    return df


def require_numeric(df: pd.DataFrame, path: Path, what: str) -> None:
    """Raise FileFormatError naming the non-numeric columns of ``df``."""
    bad = [c for c in df.columns if not pd.api.types.is_numeric_dtype(df[c])]
    if bad:
        raise FileFormatError(
            f"{what} {str(path)!r} has {len(bad)} non-numeric column(s): {examples(bad)}. "
            "Expected the ids in the first column and only numbers elsewhere; "
            "remove annotation columns (e.g. a trailing gene-name column) first."
        )


def rows_in_order(table: pd.DataFrame, names: pd.Index, what: str, hint: str) -> pd.DataFrame:
    """``table``'s rows for ``names``, in their order; names without a row are a
    CoordinateError (``what``: e.g. "barcodes of x.h5 have no position in '…'", then
    ``hint``). ``get_indexer``, not ``.loc``: Visium HD lists millions of 2 µm bins."""
    rows = table.index.get_indexer(names)
    missing = names[rows < 0]
    if len(missing):
        raise CoordinateError(
            f"{len(missing)} of {len(names)} {what}, e.g. {examples(missing)}. {hint}"
        )
    return table.iloc[rows]
