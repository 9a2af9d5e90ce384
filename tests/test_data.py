"""Reading records: every bad input names file and line; nothing is packed or split."""

from __future__ import annotations

import json

import pytest
from tiny import WORDS, word_level_tokenizer

from offsite.data import CLS, LM, MC, collate, lm_example, read_records
from offsite.errors import DataError

TOK = word_level_tokenizer(WORDS)


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_three_formats_one_record_per_line(tmp_path):
    j = _write(tmp_path / "d.jsonl", '{"text": "the cat"}\n\n{"text": "a dog"}\n')
    c = _write(tmp_path / "d.csv", 'text,label\n"the cat, red",1\na dog,0\n')
    t = _write(tmp_path / "d.txt", "the cat\n\na dog sat\n")
    assert [r.fields["text"] for r in read_records(j, LM)] == ["the cat", "a dog"]
    assert [r.fields["label"] for r in read_records(c, CLS)] == [1, 0]
    assert [r.fields["text"] for r in read_records(t, LM)] == ["the cat", "a dog sat"]
    mc = _write(tmp_path / "mc.csv", 'question,choices,answer\nis it red,"[""yes"", ""no""]",1\n')
    assert read_records(mc, MC)[0].fields["choices"] == ["yes", "no"]


@pytest.mark.parametrize(
    "content, kind, message",
    [
        ("", LM, "empty"),
        ('{"text": "a"}\n{"text": \n', LM, r"d.jsonl:2: malformed JSON"),
        ('{"txt": "a"}\n', LM, r"d.jsonl:1: missing field"),
        ("[1, 2]\n", LM, r"d.jsonl:1: each JSONL line must be an object"),
        ('{"prompt": "a", "completion": ""}\n', LM, "no loss tokens"),
        ('{"question": "q", "choices": ["a"], "answer": 0}\n', MC, "at least two"),
        ('{"question": "q", "choices": ["a", "b"], "answer": 2}\n', MC, "not a valid index"),
        ('{"text": "q", "label": "x"}\n', CLS, "non-integer field 'label'"),
    ],
)
def test_bad_input_names_file_and_line(tmp_path, content, kind, message):
    path = _write(tmp_path / "d.jsonl", content)
    with pytest.raises(DataError, match=message):
        read_records(path, kind)


def test_prompt_completion_masks_prompt_and_truncates_prompt_from_the_left(tmp_path):
    path = _write(
        tmp_path / "d.jsonl",
        json.dumps({"prompt": "the cat sat on the mat", "completion": "red blue"}) + "\n",
    )
    r = read_records(path, LM)[0]
    full = lm_example(TOK, r, 64)
    completion = TOK("red blue", add_special_tokens=False)["input_ids"]
    assert [t for t in full.labels if t != -100] == completion
    with pytest.warns(UserWarning, match="truncated from the left"):
        short = lm_example(TOK, r, 5)
    assert len(short.input_ids) == 5 and short.input_ids[-2:] == completion
    assert short.input_ids[:3] == TOK("on the mat", add_special_tokens=False)["input_ids"]


def test_record_without_loss_tokens_is_an_error(tmp_path):
    path = _write(tmp_path / "d.jsonl", '{"text": "cat"}\n{"text": ""}\n')
    first, second = read_records(path, LM)
    assert lm_example(TOK, first, 64).labels[1:] == TOK("cat", add_special_tokens=False)["input_ids"]
    with pytest.raises(DataError, match=r"d.jsonl:2: the record has no loss tokens"):
        lm_example(TOK, second, 64)


def test_collate_pads_right_and_never_mixes_records(tmp_path):
    path = _write(tmp_path / "d.txt", "the cat sat\na dog\n")
    ex = [lm_example(TOK, r, 64) for r in read_records(path, LM)]
    b = collate(ex, TOK.pad_token_id)
    assert b["input_ids"].shape == (2, 4)
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert b["labels"][1, 3].item() == -100


def test_a_record_over_1_mib_is_refused_with_file_and_line_without_being_held_whole(tmp_path):
    import tracemalloc

    from offsite.data import MAX_RECORD_BYTES

    path = tmp_path / "d.jsonl"
    with open(path, "w") as f:
        f.write('{"text": "the cat"}\n')
        f.write('{"text": "' + "a" * (10 * MAX_RECORD_BYTES) + '"}\n')  # a 10 MB line
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=r"d\.jsonl:2: record larger than 1048576 bytes"):
            read_records(path, LM)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * MAX_RECORD_BYTES  # the 10 MB line was never read whole


@pytest.mark.parametrize("suffix", [".txt", ".csv"])
def test_oversized_records_are_refused_in_every_format(tmp_path, suffix):
    from offsite.data import MAX_RECORD_BYTES

    big = "b" * (MAX_RECORD_BYTES + 1)
    content = {".txt": f"short\n{big}\n", ".csv": f'text,label\nshort,1\n"{big}",0\n'}[suffix]
    path = _write(tmp_path / f"d{suffix}", content)
    with pytest.raises(DataError, match=rf"d\{suffix}:[23]: record larger than"):
        read_records(path, CLS if suffix == ".csv" else LM)


def test_a_csv_record_spread_over_many_lines_is_bounded_too(tmp_path):
    from offsite.data import MAX_RECORD_BYTES

    line = "x" * 1000 + "\n"
    cell = line * (MAX_RECORD_BYTES // len(line) + 2)  # each line is short, the record is not
    path = _write(tmp_path / "d.csv", f'text,label\n"{cell}",0\n')
    with pytest.raises(DataError, match=r"d\.csv:\d+: record larger than"):
        read_records(path, CLS)


def test_large_records_under_the_limit_are_read(tmp_path):
    # The csv module's own cell limit (128 KiB) is below the record limit.
    cell = "c " * 200_000
    path = _write(tmp_path / "d.csv", f"text,label\n{cell},1\n")
    assert read_records(path, CLS)[0].fields["text"] == cell


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"text": "a"}\n\xff\xfe\n', r"d\.jsonl:2: not UTF-8 text"),
        (b"[" * 100_000 + b"\n", r"d\.jsonl:1: (JSON nested too deeply|malformed JSON)"),
    ],
)
def test_undecodable_or_too_deep_lines_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "d.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        read_records(path, LM)
