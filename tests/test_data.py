import csv
import io
import json
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from intentlora.config import BUNDLED_DATA
from intentlora.data import BOM, DataError, Problem, label_counts, load_file, load_splits, normalize, stratified_split, summarize
from tests.bad_inputs import CASES, LABELS, materialize
from tests.conftest import write_jsonl

HYPOTHESIS_EXAMPLES = 300  # per file format; quoted in docs/RELIABILITY.md


def messages(result):
    return [str(p) for p in result.problems]


def test_each_problem_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(
        b'{"text": "ok", "label": "refund"}\n'
        b'{"text": "no closing brace"\n'
        b'{"label": "refund"}\n'
        b'{"text": 5, "label": "refund"}\n'
        b'{"text": "   ", "label": "refund"}\n'
        b'{"text": "hi", "label": "weather"}\n'
        b'{"text": "caf\xe9", "label": "refund"}\n'
        b'["a list"]\n'
    )
    result = load_file(path, LABELS)
    got = messages(result)
    assert [e.text for e in result.examples] == ["ok"]
    assert got[0].startswith(f"{path}:7: not valid UTF-8")  # decoding runs first
    expected = {
        2: "invalid JSON",
        3: "missing field 'text'",
        4: "field 'text' must be a string, got number",
        5: "field 'text' is empty",
        6: "unknown label 'weather'",
        8: "expected a JSON object, got array",
    }
    for line, fragment in expected.items():
        assert any(m.startswith(f"{path}:{line}: ") and fragment in m for m in got), (line, got)
    assert len(result.errors) == 7


def test_bom_crlf_and_blank_lines_are_accepted(tmp_path):
    path = tmp_path / "win.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "a", "label": "x"}\r\n\r\n{"text": "b", "label": "y"}\r\n')
    result = load_file(path)
    assert [(e.text, e.source) for e in result.examples] == [("a", f"{path}:1"), ("b", f"{path}:3")]
    assert result.problems == []


def test_missing_file_directory_and_empty_file(tmp_path):
    assert "file not found" in messages(load_file(tmp_path / "nope.jsonl"))[0]
    assert "not a regular file" in messages(load_file(tmp_path))[0]
    (tmp_path / "empty.jsonl").write_text("")
    assert "no examples" in messages(load_file(tmp_path / "empty.jsonl"))[0]


def test_drop_unknown_reports_every_dropped_row(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": "refund"}, {"text": "b", "label": "zzz"}, {"text": "c", "label": "zzz"}])
    result = load_file(path, LABELS, drop_unknown=True)
    assert [e.text for e in result.examples] == ["a"]
    assert result.errors == []
    assert [str(p) for p in result.problems] == [
        f"{path}:2: dropped: unknown label 'zzz' (expected one of: {', '.join(LABELS)})",
        f"{path}:3: dropped: unknown label 'zzz' (expected one of: {', '.join(LABELS)})",
    ]


def test_duplicates_are_warnings_that_point_back(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "我的卡丢了!", "label": "card_lost"}, {"text": "x", "label": "other"}, {"text": "我的卡 丢了", "label": "other"}])
    result = load_file(path)
    assert len(result.examples) == 3
    [warning] = result.problems
    assert str(warning) == f"{path}:3: warning: duplicate of {path}:1 with a different label ('card_lost' vs 'other')"


def test_csv_is_loaded_with_line_numbers(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('text,label\n"hello, there",other\nbad row\n查余额,balance\n', encoding="utf-8")
    result = load_file(path)
    assert [(e.text, e.label) for e in result.examples] == [("hello, there", "other"), ("查余额", "balance")]
    assert str(result.problems[0]).startswith(f"{path}:3: expected 2 columns")


def test_load_splits_collects_all_errors_and_defaults_labels(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": f"t{i}", "label": "ab"[i % 2]} for i in range(20)])
    test = write_jsonl(tmp_path / "test.jsonl", [{"text": "t1", "label": "a"}, {"text": "new", "label": "c"}])
    with pytest.raises(DataError) as err:
        load_splits(str(train), str(test))
    assert [str(p) for p in err.value.problems] == [f"{test}:2: unknown label 'c' (expected one of: a, b)"]

    test.write_text(json.dumps({"text": "T1 ", "label": "b"}) + "\n")
    splits = load_splits(str(train), str(test), valid_fraction=0.2)
    assert splits.labels == ["a", "b"]
    assert (len(splits.train), len(splits.valid), len(splits.test)) == (16, 4, 1)
    every = load_splits(str(train), str(test), valid_fraction=None)  # no validation: every text trains, test stays test
    assert (len(every.train), len(every.valid), len(every.test)) == (20, 0, 1)
    small = load_splits(str(train), str(test), valid_fraction=0.05)  # 10 texts a label: 5% of one is no text
    assert (len(small.train), len(small.valid)) == (20, 0)
    assert any("same text as" in str(p) and p.severity == "warning" for p in splits.problems)


def test_stratified_split_keeps_every_label_and_loses_nothing():
    from intentlora.data import Example

    examples = [Example(f"t{i}", "abc"[i % 3] if i < 30 else "d", f"f:{i}") for i in range(31)]
    train, valid = stratified_split(examples, 0.2, seed=1)
    assert sorted(train + valid, key=lambda e: e.source) == sorted(examples, key=lambda e: e.source)
    assert {e.label for e in valid} == {"a", "b", "c"}  # 'd' has one example: it stays in train
    assert stratified_split(examples, 0.2, seed=1) == (train, valid)


def test_stratified_split_never_takes_more_than_the_fraction_of_a_label():
    """5 texts at 0.1: none held out (rounding up took 1 of 5, a fifth of a rare intent); 10: one; 10 at 0.3: three."""
    from intentlora.data import Example

    examples = [Example(f"{label}{i}", label, f"f:{label}{i}") for label, n in (("rare", 5), ("ten", 10), ("many", 84)) for i in range(n)]
    held = Counter(e.label for e in stratified_split(examples, 0.1, seed=1)[1])
    assert held == {"ten": 1, "many": 8}
    assert Counter(e.label for e in stratified_split(examples, 0.3, seed=1)[1]) == {"rare": 1, "ten": 3, "many": 25}


def test_normalize_ignores_case_width_space_and_punctuation():
    assert normalize("Ｈello， World！") == normalize("hello world") == "helloworld"


def test_bundled_data_is_clean_balanced_and_disjoint():
    train, test = (load_file(BUNDLED_DATA / f"{s}.jsonl", LABELS) for s in ("train", "test"))
    assert train.problems == [] and test.problems == []
    for result, minimum in ((train, 80), (test, 20)):
        counts = {label: sum(e.label == label for e in result.examples) for label in LABELS}
        assert min(counts.values()) >= minimum, counts
    assert {normalize(e.text) for e in train.examples}.isdisjoint(normalize(e.text) for e in test.examples)
    assert (Path(BUNDLED_DATA) / "README.md").is_file()


def test_load_splits_counts_dropped_rows(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": f"t{i}", "label": "ab"[i % 2]} for i in range(10)] + [{"text": "z", "label": "zzz"}])
    test = write_jsonl(tmp_path / "test.jsonl", [{"text": "q", "label": "zzz"}, {"text": "r", "label": "a"}])
    splits = load_splits(str(train), str(test), labels=["a", "b"], drop_unknown=True, valid_fraction=0)
    dropped = [str(p) for p in splits.problems if p.severity == "dropped"]
    assert dropped[:2] == [f"{train}:11: dropped: unknown label 'zzz' (expected one of: a, b)", f"{test}:1: dropped: unknown label 'zzz' (expected one of: a, b)"]
    assert dropped[2] == f"{train}: dropped: 2 row(s) with unknown labels dropped in all (listed above)"
    assert [e.text for e in splits.test] == ["r"]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_bad_input_corpus_is_reported_line_by_line(case, tmp_path):
    """Each file of the corpus gives exactly its expected FILE:LINE messages, in order, and keeps its good rows."""
    path = materialize(case, tmp_path)
    result = load_file(path, LABELS)
    got = messages(result)
    expected = case.expected_lines(path)
    assert len(got) == len(expected), got
    assert all(line.startswith(start) for line, start in zip(got, expected)), got
    assert len(result.examples) == case.examples
    assert all(p.severity == "error" for p in result.problems)


def record_line(text: str, label: str, csv_format: bool) -> bytes:
    if not csv_format:
        return json.dumps({"text": text, "label": label}, ensure_ascii=False).encode()
    out = io.StringIO()
    csv.writer(out, lineterminator="").writerow([text, label])
    return out.getvalue().encode()


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["text", "label", "x"]), inner, max_size=3),
    max_leaves=6,
)


def any_line(csv_format: bool) -> st.SearchStrategy[bytes]:
    """Mostly plausible lines (so parsing gets past the first check), some arbitrary bytes."""
    record = st.builds(record_line, st.text(max_size=12), st.sampled_from(LABELS * 2 + ["weather", "", " "]), st.just(csv_format))
    return st.one_of(
        record,
        record,
        JSON_VALUES.map(lambda v: json.dumps(v).encode()),
        st.text(max_size=20).map(lambda t: t.encode("utf-8", "surrogatepass")),
        st.binary(max_size=20),
    )


@st.composite
def file_bytes(draw, csv_format: bool) -> bytes:
    """Whole files: optional BOM and header, any mix of lines, LF or CRLF, with or without a final newline; or any bytes."""
    if draw(st.integers(0, 4)) == 0:
        return draw(st.binary(max_size=200))
    lines = draw(st.lists(any_line(csv_format), max_size=8))
    if csv_format and draw(st.integers(0, 4)):
        lines.insert(0, b"text,label")
    end = draw(st.sampled_from([b"\n", b"\r\n"]))
    data = end.join(lines) + (end if draw(st.booleans()) else b"")
    return (BOM if draw(st.booleans()) else b"") + data


def line_number(problem) -> int | None:
    """The LINE of FILE:LINE, or None for a problem with the whole file."""
    _, sep, tail = problem.where.rpartition(":")
    return int(tail) if sep and tail.isdigit() else None


def check_nothing_is_silently_dropped(path, data: bytes, result, csv_format: bool) -> None:
    """Every non-blank line is an example or a reported problem (the CSV header aside), unless the whole file is refused."""
    lines = data.removeprefix(BOM).split(b"\n")
    non_blank = {n for n, raw in enumerate(lines, start=1) if raw.decode("utf-8", "replace").strip()}
    example_lines = {int(ex.source.rpartition(":")[2]) for ex in result.examples}
    reported = {line_number(p) for p in result.problems if p.severity != "warning"}
    assert reported - {None} <= non_blank  # problems point at real lines
    assert not example_lines & reported
    if None in reported or not non_blank:
        assert result.errors  # a file refused as a whole says so
        return
    unaccounted = non_blank - example_lines - reported
    if csv_format:
        if any(p.message.startswith("no rows read") for p in result.problems):
            return  # a bad header is one problem that says how many rows it leaves unread
        assert len(unaccounted) <= 1 and all(header < min(example_lines, default=header + 1) for header in unaccounted)
    else:
        assert unaccounted == set()
    if not result.examples:
        assert result.errors  # a file never yields nothing without an error


def check_examples_are_clean(result) -> None:
    for ex in result.examples:
        assert isinstance(ex.text, str) and ex.text.strip() and isinstance(ex.label, str) and ex.label.strip()
        ex.text.encode("utf-8")  # no lone surrogates reach the tokenizer


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
@settings(max_examples=HYPOTHESIS_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), labels=st.sampled_from([None, LABELS]), drop_unknown=st.booleans())
def test_any_bytes_give_clean_examples_or_reported_problems(tmp_path, suffix, data, labels, drop_unknown):
    """The loader's contract on arbitrary input: never an exception, and no line silently lost."""
    csv_format = suffix == ".csv"
    content = data.draw(file_bytes(csv_format), label="content")
    path = tmp_path / f"data{suffix}"
    path.write_bytes(content)
    result = load_file(path, labels, drop_unknown=drop_unknown)
    check_examples_are_clean(result)
    check_nothing_is_silently_dropped(path, content, result, csv_format)


def test_another_label_set_is_summarized_not_listed_row_by_row(tmp_path):
    """3,080 rows of other labels: both label sets, rows per unknown label, the first 20 lines, "... and 3,060 more"."""
    other = ["weather", "music", "Refund"]
    path = write_jsonl(tmp_path / "other.jsonl", [{"text": f"t{i}", "label": other[i % 3]} for i in range(3080)] + [{"text": "ok", "label": "refund"}])
    result = load_file(path, LABELS)
    assert len(result.errors) == 3080  # programs still get every row
    text = summarize(result.errors, "the model's labels", {result.source: label_counts(result)})
    lines = text.splitlines()
    counts = {label: sum(1 for i in range(3080) if other[i % 3] == label) for label in other}
    assert lines[:4] == [
        f"{path}: 3,080 row(s) with a label outside the model's labels",
        f"  the model's labels ({len(LABELS)}): {', '.join(LABELS)}",
        f"  labels in {path} (4): Refund, music, refund, weather",
        "  rows per unknown label: " + ", ".join(f"{label!r} {n:,}" for label, n in sorted(counts.items(), key=lambda kv: -kv[1])),
    ]
    row_lines = lines[4:-1]
    assert len(row_lines) == 20 and lines[-1] == "... and 3,060 more"
    assert row_lines[0] == f"{path}:1: unknown label 'weather'"  # the expected set is shown once, above
    assert row_lines[2] == f"{path}:3: unknown label 'Refund'; 'refund' differs only in case"
    everything = summarize(result.errors, limit=None).splitlines()  # no `found`: no line for the file's own labels
    assert len(everything) == 3 + 3080 and not any(line.startswith("  labels in") for line in everything)


def test_summary_shows_whole_file_problems_and_plain_lines(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join('{"text": "x"\n' for _ in range(25)), encoding="utf-8")
    problems = load_file(bad).problems + [Problem(str(tmp_path / "b.jsonl"), "file not found")]
    lines = summarize(problems).splitlines()
    assert lines[:20] == [str(p) for p in problems[:20]] and lines[0] == f"{bad}:1: invalid JSON: Expecting ',' delimiter (column 13)"
    assert lines[20:] == [f"{tmp_path / 'b.jsonl'}: file not found", "... and 5 more"]  # a whole-file problem is never cut


def test_load_splits_error_carries_each_files_labels(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": f"t{i}", "label": "ab"[i % 2]} for i in range(10)])
    test = write_jsonl(tmp_path / "test.jsonl", [{"text": "x", "label": "c"}, {"text": "y", "label": "c"}, {"text": "z", "label": "a"}])
    with pytest.raises(DataError) as err:
        load_splits(str(train), str(test))
    assert err.value.found == {str(train): {"a": 5, "b": 5}, str(test): {"c": 2, "a": 1}}
    text = summarize(err.value.problems, "the training file's labels", err.value.found)
    assert f"{test}: 2 row(s) with a label outside the training file's labels" in text
    assert "  rows per unknown label: 'c' 2" in text


def test_labels_with_surrounding_whitespace_are_stripped_with_a_warning(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": f"t{i}", "label": label} for i, label in enumerate(["refund", " refund", "refund\t", "balance", " refund"])])
    result = load_file(path, LABELS)
    assert [ex.label for ex in result.examples] == ["refund", "refund", "refund", "balance", "refund"]
    assert result.errors == []
    assert [str(p) for p in result.problems] == [
        f"{path}: warning: label ' refund' has surrounding whitespace on 2 row(s) (line(s) 2, 5): read as 'refund'",
        f"{path}: warning: label 'refund\\t' has surrounding whitespace on 1 row(s) (line(s) 3): read as 'refund'",
    ]


def test_labels_equal_but_for_case_are_reported_not_merged(tmp_path):
    rows = [("Refund", 2), ("refund", 3), ("REFUND", 1), ("balance", 2)]
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": f"text {j}", "label": label} for j, label in enumerate(label for label, n in rows for _ in range(n))])
    result = load_file(path)
    assert sorted({ex.label for ex in result.examples}) == ["REFUND", "Refund", "balance", "refund"]  # still three classes
    [warning] = result.problems
    assert warning.severity == "warning" and warning.where == str(path)
    assert warning.message.startswith("labels differ only in case: 'Refund' (2 row(s)) and 'refund' (3 row(s)) and 'REFUND' (1 row(s))")
    unknown = load_file(path, ["refund", "balance"])
    assert "unknown label 'Refund' (expected one of: refund, balance); 'refund' differs only in case" in messages(unknown)[0]


def test_many_padded_rows_are_named_then_counted(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": f"t{i}", "label": "a "} for i in range(8)] + [{"text": "u", "label": "b"}])
    [warning] = load_file(path).problems
    assert warning.message == "label 'a ' has surrounding whitespace on 8 row(s) (line(s) 1, 2, 3, 4, 5, ... (8 in all)): read as 'a'"
