"""Random-access reader for OFA's TSV data files.

OFA stores one example per line, columns separated by a tab, and picks the columns a
task needs with ``--selected-cols`` (e.g. ``0,2,3,4,5`` for SNLI-VE). Like OFA's
``FileDataset``, a reader sees only its own contiguous slice of the rows in distributed
training: with ``total`` rows and ``world`` slices, every slice gets ``total // world``
rows and the first ``total % world`` slices one more.

Unlike OFA's reader (which ignores the index and reads sequentially), rows are read by
index: the byte offset of every line is found once, in one pass over the file.
"""
import os
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from .errors import DataError

_CHUNK = 1 << 24


def parse_selected_cols(selected_cols: Union[None, str, Sequence[int]]) -> Optional[List[int]]:
    """``"0,2,3"`` / ``[0, 2, 3]`` → ``[0, 2, 3]``; ``None``/``""`` → ``None`` (all columns)."""
    if selected_cols is None:
        return None
    if isinstance(selected_cols, str):
        parts = [p.strip() for p in selected_cols.split(",") if p.strip()]
        if not parts:
            return None
        try:
            cols = [int(p) for p in parts]
        except ValueError:
            raise ValueError(
                f"--selected-cols must be comma-separated column numbers, got {selected_cols!r}"
            ) from None
    else:
        cols = [int(c) for c in selected_cols]
    if any(c < 0 for c in cols):
        raise ValueError(f"--selected-cols must not be negative, got {selected_cols!r}")
    return cols


def distributed_slice() -> Tuple[int, int]:
    """(rank, world size) of torch.distributed if initialised, else (0, 1)."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except Exception:
        pass
    return 0, 1


def slice_bounds(total: int, slice_id: int, slice_count: int) -> Tuple[int, int]:
    """First row and row count of slice ``slice_id`` of ``slice_count`` (OFA's split)."""
    if not 0 <= slice_id < slice_count:
        raise ValueError(f"slice_id {slice_id} outside 0..{slice_count - 1}")
    base, extra = divmod(total, slice_count)
    count = base + (1 if slice_id < extra else 0)
    start = slice_id * base + min(slice_id, extra)
    return start, count


def index_lines(path: str) -> np.ndarray:
    """Byte offsets (int64) of the start of every line; a final line without ``\\n`` counts."""
    starts = [np.zeros(1, dtype=np.int64)]
    size = 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_CHUNK)
            if not chunk:
                break
            newlines = np.flatnonzero(np.frombuffer(chunk, dtype=np.uint8) == 10)
            starts.append(newlines.astype(np.int64) + size + 1)
            size += len(chunk)
    offsets = np.concatenate(starts)
    # the offset after the last newline starts a line only if bytes follow it
    if offsets[-1] >= size:
        offsets = offsets[:-1]
    return offsets


class TSVRow:
    """One selected row: ``values[i]`` is TSV column ``columns[i]`` of line ``line`` of ``path``."""

    __slots__ = ("path", "line", "columns", "values", "fields")

    def __init__(self, path, line, columns, values, fields=None):
        self.path = path
        self.line = line
        self.columns = columns
        self.values = values
        self.fields = fields

    def __len__(self):
        return len(self.values)

    def __getitem__(self, i: int) -> str:
        return self.values[i]

    def field_name(self, i: int) -> Optional[str]:
        return self.fields[i] if self.fields else None

    def error(self, i: int, message: str) -> DataError:
        """A DataError located at the i-th selected value of this row."""
        return DataError(
            message, path=self.path, row=self.line, column=self.columns[i], field=self.field_name(i)
        )


class TSVReader:
    """Selected columns of the rows of one slice of a TSV file, by index.

    Args:
        path: the TSV file.
        selected_cols: columns to return, in this order (``"0,2,3"`` or a list); None: all
            columns of the first line.
        fields: optional names of the selected columns (used in error messages); when given,
            their count must match ``selected_cols``.
        slice_id, slice_count: which slice of the rows this reader sees; default: the
            torch.distributed rank and world size (0 and 1 without distributed training).
        separator: column separator.

    ``reader[i]`` → :class:`TSVRow` for the i-th row of the slice (``len(reader)`` rows);
    a row with too few columns raises :class:`DataError` naming file, line and column.
    """

    def __init__(
        self,
        path: str,
        selected_cols: Union[None, str, Sequence[int]] = None,
        fields: Optional[Sequence[str]] = None,
        slice_id: Optional[int] = None,
        slice_count: Optional[int] = None,
        separator: str = "\t",
    ):
        self.path = str(path)
        if not os.path.isfile(self.path):
            raise DataError("data file not found", path=self.path)
        self.separator = separator
        self._fh = None
        self._pid = None
        self.offsets = index_lines(self.path)
        self.total_row_count = len(self.offsets)

        cols = parse_selected_cols(selected_cols)
        if cols is None:
            first = self._read_line(0) if self.total_row_count else ""
            cols = list(range(len(first.split(separator))))
        self.selected_cols = cols
        self.fields = list(fields) if fields is not None else None
        if self.fields is not None and len(self.fields) != len(cols):
            raise ValueError(
                f"{self.path}: --selected-cols gives {len(cols)} columns {cols}, but "
                f"{len(self.fields)} are needed: {', '.join(self.fields)}"
            )

        if slice_id is None or slice_count is None:
            rank, world = distributed_slice()
            slice_id = rank if slice_id is None else slice_id
            slice_count = world if slice_count is None else slice_count
        self.slice_id, self.slice_count = slice_id, slice_count
        self.start, self.row_count = slice_bounds(self.total_row_count, slice_id, slice_count)

    # --- file handle, reopened after fork / unpickling (DataLoader workers) ---
    def _handle(self):
        if self._fh is None or self._pid != os.getpid():
            self._fh = open(self.path, "rb")
            self._pid = os.getpid()
        return self._fh

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_fh"] = None
        state["_pid"] = None
        return state

    def __del__(self):
        fh = getattr(self, "_fh", None)
        if fh is not None:
            try:
                fh.close()
            except Exception:
                pass

    def _read_line(self, file_row: int) -> str:
        fh = self._handle()
        fh.seek(int(self.offsets[file_row]))
        raw = fh.readline()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"not valid UTF-8 ({e.reason} at byte {e.start})",
                            path=self.path, row=file_row + 1) from None
        return text.rstrip("\r\n")

    def __len__(self) -> int:
        return self.row_count

    def get_total_row_count(self) -> int:
        """Rows in the whole file, all slices together."""
        return self.total_row_count

    def line_number(self, index: int) -> int:
        """1-based line number in the file of the slice's row ``index``."""
        return self.start + index + 1

    def __getitem__(self, index: int) -> TSVRow:
        if index < 0:
            index += self.row_count
        if not 0 <= index < self.row_count:
            raise IndexError(f"row {index} outside this slice of {self.row_count} rows of {self.path}")
        file_row = self.start + index
        columns = self._read_line(file_row).split(self.separator)
        values = []
        for i, col in enumerate(self.selected_cols):
            if col >= len(columns):
                raise DataError(
                    f"short row: it has {len(columns)} columns, but column {col} is selected",
                    path=self.path, row=file_row + 1, column=col,
                    field=self.fields[i] if self.fields else None,
                )
            values.append(columns[col])
        return TSVRow(self.path, file_row + 1, self.selected_cols, values, self.fields)

    def __repr__(self):
        return (f"TSVReader({self.path!r}, cols={self.selected_cols}, slice {self.slice_id}/"
                f"{self.slice_count}: rows {self.start}..{self.start + self.row_count - 1} "
                f"of {self.total_row_count})")
