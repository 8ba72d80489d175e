"""The one exception type for errors a user can cause.

Every message names the file, line or field at fault and the fix. Command-line
doors catch :class:`CalibError`, print ``error: <message>`` on one line and exit 2.
Anything else escaping is a bug and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path


class CalibError(Exception):
    """A problem with the user's input (files, flags, data), not a bug in calib."""

    def __init__(
        self,
        message: str,
        *,
        path: str | Path | None = None,
        line: int | None = None,
        field: str | None = None,
        fix: str | None = None,
    ):
        where = []
        if path is not None:
            where.append(f"{path}" + (f":{line}" if line is not None else ""))
        if field is not None:
            where.append(f"field {field!r}")
        text = (", ".join(where) + ": " if where else "") + message
        if fix:
            text += f" (fix: {fix})"
        super().__init__(text)
        self.path = None if path is None else str(path)
        self.line = line
        self.field = field
        self.fix = fix
