"""The bad-input corpus (tests/data/bad/) and what the loader must say about each file.

Small files are committed; the big or odd ones (a 1 MB line, a directory, a
missing file) are made in a temporary folder by `materialize`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

BAD = Path(__file__).parent / "data" / "bad"
LABELS = ["fraud_risk", "refund", "balance", "card_lost", "other"]
GOOD_LINE = '{"text": "我的卡丢了", "label": "card_lost"}\n'.encode()


@dataclass(frozen=True)
class Case:
    name: str
    problems: tuple[tuple[int | None, str], ...]  # (line, or None for the whole file; start of the message)
    examples: int = 0  # rows that load despite the problems

    @property
    def accepted(self) -> bool:
        return not self.problems

    def expected_lines(self, path: Path) -> list[str]:
        return [f"{path}:{line}: {message}" if line else f"{path}: {message}" for line, message in self.problems]


CASES = [
    Case("invalid_json.jsonl", ((2, "invalid JSON: Expecting value"), (3, "invalid JSON: Expecting property name"), (4, "invalid JSON: Extra data")), 1),
    Case("truncated_last_line.jsonl", ((2, "invalid JSON: Unterminated string"),), 1),
    Case("missing_keys.jsonl", ((2, "missing field 'label'"), (3, "missing field 'text'"), (4, "missing field 'text'"), (4, "missing field 'label'")), 1),
    Case("wrong_types.jsonl", (
        (2, "field 'text' must be a string, got number"), (3, "field 'label' must be a string, got null"),
        (4, "field 'text' must be a string, got array"), (5, "expected a JSON object, got string"), (6, "expected a JSON object, got null"),
    ), 1),
    Case("empty_text.jsonl", ((2, "field 'text' is empty"), (3, "field 'text' is empty"), (4, "field 'text' is empty"), (5, "field 'label' is empty")), 1),
    Case("unknown_label.jsonl", ((2, "unknown label 'weather'"), (3, "unknown label 'Refund'")), 1),
    Case("json_array.jsonl", ((1, "expected a JSON object, got array"),)),
    Case("surrogate.jsonl", ((2, "field 'text' holds an unpaired surrogate"),), 1),
    Case("gbk.jsonl", ((2, "not valid UTF-8 (byte 0xce at column 11); save the file as UTF-8"),), 1),
    Case("cp1252.jsonl", ((2, "not valid UTF-8 (byte 0xe9 at column 14); save the file as UTF-8"),), 1),
    Case("gbk.csv", ((2, "not valid UTF-8 (byte 0xb2 at column 1)"),)),
    Case("utf16.jsonl", ((None, "UTF-16 text"),)),
    Case("nul_bytes.jsonl", ((2, "contains NUL bytes"),), 1),
    Case("empty.jsonl", ((None, "no examples in file"),)),
    Case("blank_lines.jsonl", ((None, "no examples in file"),)),
    Case("header_only.csv", ((None, "no examples in file"),)),
    Case("bad_columns.csv", (
        (3, "expected 2 columns (header on line 1), got 1"), (4, "invalid CSV: unexpected end of data"),
        (5, "expected 2 columns (header on line 1), got 3"), (6, "invalid CSV: ',' expected after '\"'"),
    ), 1),
    Case("wrong_header.csv", ((1, "the header lacks column(s) 'text', 'label' (it has: utterance, intent)"), (1, "no rows read: 2 line(s) after the header"))),
    # Made by `materialize`:
    Case("huge_line.jsonl", ((2, "line is 1,048,607 bytes long, over the 1,048,576 limit"),), 1),
    Case("deep_nesting.jsonl", ((2, "invalid JSON: nested too deeply"),), 1),
    Case("huge_integer.jsonl", ((2, "invalid JSON: Exceeds the limit (4300 digits)"),), 1),
    Case("huge_csv_field.csv", ((2, "invalid CSV: field larger than field limit (131072)"),), 1),
    Case("huge_csv_header.csv", ((1, "invalid CSV: field larger than field limit (131072)"), (1, "no rows read: 1 line(s) after the header"))),
    Case("directory.jsonl", ((None, "not a regular file (is it a directory?)"),)),
    Case("missing.jsonl", ((None, "file not found"),)),
    # Accepted as they are (documented): a UTF-8 BOM and CRLF line ends, as Excel and Notepad write them.
    Case("bom.jsonl", (), 2),
    Case("crlf.jsonl", (), 2),
    Case("excel_bom_crlf.csv", (), 2),
]

GENERATED = {
    "huge_line.jsonl": GOOD_LINE + b'{"text": "' + b"x" * 2**20 + b'", "label": "refund"}\n',
    "deep_nesting.jsonl": GOOD_LINE + b"[" * 100_000 + b"\n",
    "huge_integer.jsonl": GOOD_LINE + b'{"text": ' + b"1" * 5000 + b', "label": "refund"}\n',
    "huge_csv_field.csv": b"text,label\n" + b"x" * 200_000 + b",refund\nok,refund\n",
    "huge_csv_header.csv": b"x" * 200_000 + b",label\nok,refund\n",
}


def materialize(case: Case, folder: Path) -> Path:
    """The path to hand to the loader: the committed file, or one made in `folder`."""
    if case.name in GENERATED:
        path = folder / case.name
        path.write_bytes(GENERATED[case.name])
        return path
    if case.name == "directory.jsonl":
        path = folder / case.name
        path.mkdir()
        return path
    if case.name == "missing.jsonl":
        return folder / case.name
    return BAD / case.name
