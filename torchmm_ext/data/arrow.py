"""Reader for the Arrow files of ViLT and METER (``vilt/utils/write_*.py``; METER writes the
same files), with errors that name the file, the row and the column.

One Arrow IPC file per split, one row per image (or image pair) with all of its texts:

============  =========================================================================
task          columns
============  =========================================================================
VQAv2         ``image`` (bytes), ``questions`` [str], ``answers`` [[str]],
              ``answer_labels`` [[int]], ``answer_scores`` [[float]], ``image_id``,
              ``question_id`` [int], ``split``
NLVR2         ``image_0``, ``image_1`` (bytes), ``questions`` [str], ``answers`` ["True" |
              "False"], ``identifier``
F30K / COCO   ``image`` (bytes), ``caption`` [str], ``image_id``, ``split``
pre-training  ``image`` (bytes), ``caption`` [str] (COCO, VG, SBU, GCC)
============  =========================================================================

:class:`ArrowTables` opens one or more files (memory-mapped, as ViLT does), checks that every
column a reader needs is there, and maps a global row index to ``(file, row)`` so that every
error can say where the bad record is. :func:`decode_image` turns a bytes cell into an RGB
image, raising :class:`~torchmm_ext.data.datasets.BadImageError` that names file, row and column.
"""

import io
from pathlib import Path
from typing import Any, List, Sequence, Tuple, Union

import pyarrow as pa
from PIL import Image, UnidentifiedImageError

from torchmm_ext.data.datasets import BadImageError

__all__ = ["ArrowColumnError", "ArrowTables", "decode_image", "VQA_COLUMNS", "NLVR2_COLUMNS", "CAPTION_COLUMNS"]

PathLike = Union[str, Path]

#: The columns each task's reader needs (those ViLT's and METER's dataset classes read).
VQA_COLUMNS: Tuple[str, ...] = ("image", "questions", "question_id", "answers", "answer_labels", "answer_scores")
NLVR2_COLUMNS: Tuple[str, ...] = ("image_0", "image_1", "questions", "answers")
CAPTION_COLUMNS: Tuple[str, ...] = ("image", "caption")


class ArrowColumnError(KeyError):
    """An Arrow file lacks a column the reader needs (or a cell has the wrong type)."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0])


def _read_table(path: Path) -> pa.Table:
    if not path.is_file():
        raise FileNotFoundError(f"arrow file not found: {path}")
    source = pa.memory_map(str(path), "r")
    try:
        return pa.ipc.RecordBatchFileReader(source).read_all()
    except pa.ArrowInvalid:
        pass
    try:  # the streaming format (what pa.ipc.new_stream writes)
        return pa.ipc.open_stream(pa.memory_map(str(path), "r")).read_all()
    except pa.ArrowInvalid as err:
        raise ValueError(f"{path} is not an Arrow IPC file or stream: {err}") from err


class ArrowTables:
    """Rows of one or more Arrow files, read column by column.

    Args:
        paths (Union[PathLike, Sequence[PathLike]]): Arrow files, concatenated in order.
        columns (Sequence[str]): columns the caller needs (others are not loaded).

    Raises:
        FileNotFoundError: a file does not exist.
        ArrowColumnError: a file lacks a needed column; the message names the file, the
            missing columns and those it has.
    """

    def __init__(self, paths: Union[PathLike, Sequence[PathLike]], columns: Sequence[str]) -> None:
        self.paths: List[Path] = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
        if not self.paths:
            raise ValueError("no arrow file given")
        self.columns = tuple(columns)
        self.tables: List[pa.Table] = []
        for path in self.paths:
            table = _read_table(path)
            missing = [c for c in self.columns if c not in table.column_names]
            if missing:
                raise ArrowColumnError(
                    f"{path}: no column {', '.join(map(repr, missing))} (it has {', '.join(table.column_names)}); "
                    f"this reader needs {', '.join(self.columns)}"
                )
            self.tables.append(table.select(list(self.columns)))
        self._offsets = [0]
        for table in self.tables:
            self._offsets.append(self._offsets[-1] + table.num_rows)

    def __len__(self) -> int:
        return self._offsets[-1]

    def locate(self, index: int) -> Tuple[int, int]:
        """``(file index, row in that file)`` of global row ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} out of range for {len(self)} rows")
        file_index = next(i for i in range(len(self.tables)) if index < self._offsets[i + 1])
        return file_index, index - self._offsets[file_index]

    def where(self, index: int, column: str) -> str:
        """``"<file>: row <r> column '<c>'"`` for messages."""
        file_index, row = self.locate(index)
        return f"{self.paths[file_index]}: row {row} column {column!r}"

    def cell(self, index: int, column: str) -> Any:
        """The Python value of one cell."""
        file_index, row = self.locate(index)
        return self.tables[file_index].column(column)[row].as_py()

    def column(self, column: str) -> List[Any]:
        """A whole column as Python values, all files concatenated."""
        return [v for table in self.tables for v in table.column(column).to_pylist()]

    def image(self, index: int, column: str = "image") -> Image.Image:
        """The decoded RGB image in ``column`` of row ``index``."""
        return decode_image(self.cell(index, column), self.where(index, column))


def decode_image(data: Any, where: str) -> Image.Image:
    """Decode an image stored as bytes (JPEG, PNG, ...) into RGB.

    Args:
        data (Any): the cell value (bytes expected).
        where (str): file, row and column, for the message.

    Raises:
        BadImageError: the cell is empty, not bytes, or not a decodable image.
    """
    if not isinstance(data, (bytes, bytearray)) or not data:
        kind = "empty" if data in (None, b"") else f"a {type(data).__name__}, not image bytes"
        raise BadImageError(f"{where}: the image cell is {kind}")
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise BadImageError(f"{where}: cannot decode image ({len(data)} bytes): {type(err).__name__}: {err}") from err
