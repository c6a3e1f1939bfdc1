"""JSON text that is valid UTF-8 whatever file names it carries.

Python decodes a file name that is not valid UTF-8 with `surrogateescape`: each
undecodable byte 0xXY becomes the lone surrogate U+DCXY, which no UTF-8 encoder
accepts. Here such a character is written as the JSON escape `\\udcXY` instead:
still valid JSON on a valid UTF-8 line, and lossless, since
`os.fsencode(json.loads(text)[...])` gives back the original bytes.
"""

from __future__ import annotations

import json


def dumps(obj: object, *, indent: int | None = None) -> str:
    text = json.dumps(obj, ensure_ascii=False, indent=indent)
    # Only lone surrogates cannot be encoded; backslashreplace writes them as \udcXY, a JSON escape.
    return text.encode("utf-8", "backslashreplace").decode("utf-8")
