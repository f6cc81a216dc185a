"""Data files: where a dataset is found, how a user's text file is read, and the one error
every reader raises (``DataError``, naming the file, the line and what was expected).

Every task reads its files through ``open_text`` (UTF-8, CRLF, gzip whatever the name) and
``numbered_lines`` / ``json_lines``, and gathers bad records in ``InvalidRecords``.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import warnings
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ..config import RunConfig
from ..errors import FedpeftError

PACKAGE_DATA = Path(__file__).resolve().parent.parent / "data"
REPO_SHARED_DATA = Path(__file__).resolve().parents[4] / "shared" / "data"


class DataError(FedpeftError, ValueError):
    """A data file is missing or malformed. The message names the file, the line and the cause."""

    def __init__(self, path: str | Path, message: str, line: int | None = None) -> None:
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {message}")
        self.path, self.line = str(path), line
        self.gzip = False  # the file's gzip data is corrupt (see ``open_text``)


def data_root(cfg: RunConfig) -> Path | None:
    """The user's data folder: ``data-dir``, else ``$FEDPEFT_DATA``, else None."""
    explicit = cfg.data_dir or os.environ.get("FEDPEFT_DATA")
    if explicit:
        root = Path(explicit).expanduser()
        if not root.is_dir():
            source = "data-dir" if cfg.data_dir else "$FEDPEFT_DATA"
            what = "is not a folder" if root.exists() else "does not exist"
            raise DataError(root, f"data folder given by {source} {what}")
        return root
    return None


def find_dataset(cfg: RunConfig, folder: str, files: Sequence[str]) -> dict[str, Path]:
    """Locate ``files`` of dataset ``folder``.

    Search order: the user's data folder (``data-dir`` / ``$FEDPEFT_DATA``) if given, else the
    ``shared/data`` folder beside the repository, else the copy embedded in the package (SemEval
    and WNUT-2017 only, gzipped). A file may also be present gzipped (``name.gz``).
    """
    root = data_root(cfg)
    roots = [root] if root is not None else [REPO_SHARED_DATA, PACKAGE_DATA]
    tried = []
    for base in roots:
        found = {}
        for name in files:
            for candidate in (base / folder / name, base / folder / f"{name}.gz"):
                if candidate.is_file():
                    found[name] = candidate
                    break
        if len(found) == len(files):
            return found
        tried.append(str(base / folder))
        if root is not None:
            missing = [n for n in files if n not in found]
            raise DataError(base / folder / missing[0], "file not found (expected dataset "
                            f"{folder!r} with files {', '.join(files)})")
    raise DataError(folder, f"dataset not found; looked in {', '.join(tried)}; "
                    "pass data-dir=... or set $FEDPEFT_DATA")


def open_text(path: str | Path) -> TextFile:
    """Open a text file for reading: UTF-8 (a leading byte-order mark is dropped), universal
    newlines (CRLF ok), gzip-compressed data un-gzipped whatever the file's name.

    Every failure, at opening or while reading, is a ``DataError`` naming the file (and the line
    where known) and what was expected: a missing file, a folder, no permission, text that is
    not UTF-8, a ``.gz`` file that is not gzip or is truncated.
    """
    path = Path(path)
    if path.is_dir():
        raise DataError(path, "is a folder; expected a file")
    if not path.exists():
        raise DataError(path, "file not found")
    if not path.is_file():
        raise DataError(path, "is not a regular file (a pipe or a device?); fedpeft reads its "
                        "data files more than once, so pass a file")
    try:
        raw = open(path, "rb")  # noqa: SIM115
    except PermissionError:
        raise DataError(path, "cannot be read: permission denied") from None
    except OSError as err:
        raise DataError(path, f"cannot be opened: {err.strerror or err}") from None
    try:
        magic = raw.peek(2)[:2]
    except OSError as err:
        raw.close()
        raise DataError(path, f"cannot be read: {err.strerror or err}") from None
    gzipped = magic == GZIP_MAGIC
    if path.suffix == ".gz" and not gzipped:
        raw.close()
        raise DataError(path, "is empty; expected gzip-compressed data" if not magic else
                        "is not a gzip file, although its name ends in .gz")
    stream: Any = gzip.GzipFile(fileobj=raw, mode="rb") if gzipped else raw
    text = io.TextIOWrapper(stream, encoding="utf-8-sig", newline=None)
    return TextFile(path, text, raw, gzipped)


GZIP_MAGIC = b"\x1f\x8b"


class TextFile:
    """A text file open for reading (from ``open_text``): iterate over its lines, or ``read``.
    Reading errors (text that is not UTF-8, corrupt or truncated gzip data, I/O errors) become
    ``DataError``s naming the file and, where known, the line."""

    def __init__(self, path: Path, text: io.TextIOWrapper, raw: Any, gzipped: bool) -> None:
        self.path, self._text, self._raw, self.gzipped = path, text, raw, gzipped
        self.line = 0  # lines returned so far

    def __iter__(self) -> TextFile:
        return self

    def __next__(self) -> str:
        try:
            line = next(self._text)
        except StopIteration:
            raise
        except Exception as err:  # noqa: BLE001 - translated or re-raised by _error
            raise self._error(err) from None
        self.line += 1
        return line

    def readline(self, size: int = -1) -> str:
        try:
            line = self._text.readline(size)
        except Exception as err:  # noqa: BLE001
            raise self._error(err) from None
        self.line += line.endswith("\n")
        return line

    def read(self, size: int = -1) -> str:
        try:
            return self._text.read(size)
        except Exception as err:  # noqa: BLE001
            raise self._error(err) from None

    def close(self) -> None:
        try:
            self._text.close()
        finally:
            self._raw.close()

    def __enter__(self) -> TextFile:
        return self

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> None:
        try:
            if isinstance(exc, DataError) and self.gzipped and not exc.gzip:
                self._check_gzip()  # garbage read from corrupt gzip data: say that instead
        finally:
            self.close()

    def _check_gzip(self) -> None:
        """Read the rest of the gzip stream; a ``DataError`` if it is corrupt or truncated."""
        try:
            while self._text.buffer.read(1 << 20):
                pass
        except Exception as err:  # noqa: BLE001
            raise self._error(err) from None

    def _error(self, err: Exception) -> Exception:
        """``err``, raised while reading, as a ``DataError`` (unexpected errors are returned)."""
        path, line = self.path, self.line + 1
        if isinstance(err, UnicodeDecodeError):
            return undecodable(path, self.gzipped, err)
        if isinstance(err, EOFError | gzip.BadGzipFile | zlib.error):
            error = DataError(path, "gzip data ends early (a truncated file: an interrupted "
                              "download or copy?)" if isinstance(err, EOFError) else
                              f"corrupt gzip data ({err})",
                              None if isinstance(err, gzip.BadGzipFile) else line)
            error.gzip = True
            return error
        if isinstance(err, OSError):
            return DataError(path, f"cannot be read: {err.strerror or err}", line)
        return err


def numbered_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, line without its newline) of a text file."""
    with open_text(path) as fh:
        for number, line in enumerate(fh, start=1):
            yield number, line.rstrip("\n")


def json_lines(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(1-based line number, parsed value) of each non-blank line of a JSONL file; a line that is
    not JSON is a ``DataError`` naming it (the caller checks what the value must be)."""
    for number, line in numbered_lines(path):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(path, f"expected one JSON object per line: {err.msg} (column "
                            f"{err.colno})", number) from None
        except RecursionError:
            raise DataError(path, "expected one JSON object per line: nested too deeply",
                            number) from None


def undecodable(path: Path, gzipped: bool, err: UnicodeDecodeError) -> DataError:
    """A ``DataError`` saying where ``path`` stops being UTF-8 (line and byte offset)."""
    try:
        with open(path, "rb") as fh:
            data = gzip.decompress(fh.read()) if gzipped else fh.read()
        data.decode("utf-8")
    except UnicodeDecodeError as located:
        start = located.start
        line: int | None = data.count(b"\n", 0, start) + 1
        where = f"byte 0x{data[start]:02x} at offset {start}"
    except Exception:  # noqa: BLE001 - the first error's position is all we have then
        line, where, data = None, f"byte 0x{err.object[err.start]:02x}", b""
    else:  # decodable as a whole (cannot happen); report the original error
        line, where = None, str(err)
    hint = ""
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        hint = " (it looks like UTF-16; save it as UTF-8)"
    elif b"\x00" in data[:4096]:
        hint = " (it looks like a binary file)"
    return DataError(path, f"is not UTF-8 text: {where}{hint}; expected a UTF-8 text file", line)


class InvalidRecords:
    """Invalid records (sentences, questions) of one user file, gathered while it is read.

    By default reading stops at the ``limit``-th problem with one ``DataError`` listing them all
    (so a user fixes several per attempt, not one); with ``skip`` (``skip-invalid=true``) the
    records are dropped and only counted. A reader calls ``add`` per bad record, then ``check``.
    """

    def __init__(self, path: str | Path, skip: bool = False, limit: int = 5) -> None:
        self.path, self.skip, self.limit = path, skip, limit
        self.found: list[tuple[int | None, str]] = []  # (line or None, message naming id/value)

    def add(self, message: str, line: int | None = None) -> None:
        self.found.append((line, message))
        if not self.skip and len(self.found) >= self.limit:
            self.check()

    def check(self) -> int:
        """Raise the gathered problems (unless skipping); return how many records were dropped."""
        if self.found and not self.skip:
            listed = "; ".join(m if n is None else f"line {n}: {m}" for n, m in self.found)
            stopped = ", stopped there" if len(self.found) >= self.limit else ""
            raise DataError(self.path, f"{len(self.found)} invalid record(s){stopped}: {listed} "
                            "(fix them, or pass skip-invalid=true to skip and count them)",
                            self.found[0][0])
        return len(self.found)

    def finish(self, records: list[Any], what: str) -> list[Any]:
        """``check``, warn how many ``what`` records were skipped, and return ``records``;
        a ``DataError`` if none is left."""
        skipped = self.check()
        if skipped:
            warnings.warn(f"{self.path}: skipped {skipped} invalid {what}(s) "
                          "(skip-invalid=true)", stacklevel=3)
        if not records:
            raise DataError(self.path, f"no {what}s found")
        return records
