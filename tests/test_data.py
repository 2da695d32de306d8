"""Datasets: JSONL and Parquet, configurable fields, bad rows skipped and counted, exact resume."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.data import PromptStream, load_dataset
from tasks.verifiers import exact_match


def test_jsonl_skips_and_counts_bad_rows(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [json.dumps({"q": "1+1=", "a": "2"}), "{not json", json.dumps({"q": "2+2="}), json.dumps({"a": "3"}),
             json.dumps({"q": "3+3=", "a": 6}), "[1, 2]"]
    path.write_bytes("\n".join(lines).encode() + b'\n{"q": "\xff\xfe", "a": "1"}\n')
    ds = load_dataset(str(path), ["q", "a"])
    assert [r["q"] for r in ds.rows] == ["1+1=", "3+3="] and ds.rows[1]["a"] == "6"
    assert ds.skipped == 5
    assert ds.skip_reasons == {"not JSON": 1, "not a JSON object": 1, "not UTF-8": 1, "missing field 'a'": 1,
                               "missing field 'q'": 1}


def test_parquet_with_field_names(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"question": ["a", "b", None], "solution": ["x", "y", "z"]}), path)
    ds = load_dataset(str(path), ["question", "solution"])
    assert len(ds.rows) == 2 and ds.skipped == 1


def test_no_usable_rows_is_an_error_naming_fields(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"x": 1}) + "\n")
    with pytest.raises(ValueError, match=r"no usable rows.*\['prompt'\]"):
        load_dataset(str(path), ["prompt"])


def test_prompt_stream_resumes_exactly():
    rows = [{"i": str(i)} for i in range(7)]
    a = PromptStream(rows, seed=3)
    a.next_batch(5)
    state = a.state_dict()
    expected = a.next_batch(9)  # crosses an epoch boundary
    b = PromptStream(rows, seed=3)
    b.load_state_dict(state)
    assert b.next_batch(9) == expected
    assert sorted(r["i"] for r in PromptStream(rows, 3).next_batch(7)) == sorted(r["i"] for r in rows)


def test_exact_match_verifier():
    assert exact_match(" 240", "240") == 1.0 and exact_match("241", "240") == 0.0


def test_last_digits_match_verifier():
    from tasks.verifiers import last_digits_match
    assert last_digits_match("is 2630", "2630") == 1.0 and last_digits_match("2630", "2630") == 1.0
    assert last_digits_match("02630", "2630") == 0.0 and last_digits_match("2631", "2630") == 0.0
    assert last_digits_match("2630 or 11", "2630") == 0.0 and last_digits_match("none", "2630") == 0.0
