"""Writing ArrayRecord files (for tests, and for converting corpora to a random-access format)."""
from __future__ import annotations

import json
import os
from typing import Iterable

# group_size:1 makes every record individually seekable, which grain's random access needs to be fast.
_WRITER_OPTIONS = "group_size:1"


def write_array_record(path: str, records: Iterable[str | bytes | dict], *, text_field: str = "text") -> int:
    """Writes one ArrayRecord file; returns the number of records.

    str records are stored as UTF-8, bytes as is, dicts as JSON objects (read back by
    DataConfig(source='array_record') with record_format 'json' or 'auto'). A dict must hold `text_field`.
    The file is written to a temporary name and renamed, so readers never see a partial file.
    """
    from array_record.python import array_record_module

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    writer = array_record_module.ArrayRecordWriter(tmp, _WRITER_OPTIONS)
    n = 0
    try:
        for rec in records:
            if isinstance(rec, dict):
                if text_field not in rec:
                    raise ValueError(f"record {n} has no field {text_field!r}")
                rec = json.dumps(rec, ensure_ascii=False)
            if isinstance(rec, str):
                rec = rec.encode("utf-8")
            if not isinstance(rec, (bytes, bytearray)):
                raise TypeError(f"record {n} is {type(rec).__name__}; expected str, bytes or dict")
            writer.write(bytes(rec))
            n += 1
    except BaseException:
        writer.close()
        os.remove(tmp)
        raise
    writer.close()
    os.replace(tmp, path)
    return n
