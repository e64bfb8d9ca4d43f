"""Errors raised for bad OFA input data."""
from typing import Optional


class DataError(ValueError):
    """Bad input data, located as precisely as known.

    ``path`` is the file, ``row`` the 1-based line number in that file and ``column``
    the 0-based TSV column index (the numbering ``--selected-cols`` uses); ``field``
    names what the column holds (``image``, ``label``, ...). ``str(error)`` reads e.g.
    ``data/snli_ve_train.tsv: row 17, column 2 (image): corrupt base64 ...``.
    """

    def __init__(
        self,
        message: str,
        *,
        path: Optional[str] = None,
        row: Optional[int] = None,
        column: Optional[int] = None,
        field: Optional[str] = None,
    ):
        self.message = message
        self.path = path
        self.row = row
        self.column = column
        self.field = field
        super().__init__(self._format())

    def _format(self) -> str:
        where = []
        if self.row is not None:
            where.append(f"row {self.row}")
        if self.column is not None:
            col = f"column {self.column}"
            if self.field:
                col += f" ({self.field})"
            where.append(col)
        prefix = str(self.path) if self.path is not None else ""
        if where:
            prefix = f"{prefix}: {', '.join(where)}" if prefix else ", ".join(where)
        return f"{prefix}: {self.message}" if prefix else self.message

    def __reduce__(self):  # keep keyword-only fields through pickling (DataLoader workers)
        return (_rebuild, (type(self), self.message, self.path, self.row, self.column, self.field))


def _rebuild(cls, message, path, row, column, field):
    return cls(message, path=path, row=row, column=column, field=field)


class MissingFileError(DataError, FileNotFoundError):
    """A required file is absent; the message names the file and the option that sets it."""

    def __init__(self, path: str, option: str, what: str = "file"):
        self.option = option
        self.what = what
        super().__init__(f"{what} not found (set by {option})", path=path)

    def __reduce__(self):
        return (type(self), (self.path, self.option, self.what))
