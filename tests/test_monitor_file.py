"""monitor.jsonl (bayes_adapter/monitor_file.py): its one writer, one reader and the rewind for a resumed run."""

import json

import pytest

from bayes_adapter.monitor_file import (
    MONITOR_SCHEMA,
    MonitorFileError,
    MonitorRecord,
    append_monitor_record,
    drop_records_after,
    read_monitor,
)


def _record(step: int, **extra) -> MonitorRecord:
    return MonitorRecord(step=step, fidelity=0.8, noise_energy=0.05, noise_whiteness=0.5, **extra)


def test_written_records_read_back_with_the_schema_and_without_absent_fields(tmp_path):
    path = tmp_path / "monitor.jsonl"
    first = _record(10, loss=0.12, copy_rate=0.25, fidelity_ceiling=0.92)
    append_monitor_record(path, first)
    append_monitor_record(path, _record(20))
    lines = path.read_text().splitlines()
    assert json.loads(lines[0]) == {
        "schema": MONITOR_SCHEMA,
        "step": 10,
        "fidelity": 0.8,
        "noise_energy": 0.05,
        "noise_whiteness": 0.5,
        "loss": 0.12,
        "copy_rate": 0.25,
        "fidelity_ceiling": 0.92,
    }
    assert "loss" not in json.loads(lines[1])
    assert read_monitor(path) == [first, _record(20)]


def test_the_reader_ignores_unknown_fields_and_blank_lines_and_takes_records_without_schema(tmp_path):
    path = tmp_path / "monitor.jsonl"
    rows = [
        {"step": 1, "fidelity": 0.5, "noise_energy": 0.1, "noise_whiteness": 0.3, "my_metric": "x"},
        {"schema": MONITOR_SCHEMA, "step": 2.0, "fidelity": 1, "noise_energy": 0, "noise_whiteness": 0, "loss": None},
    ]
    path.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")
    records = read_monitor(path)
    assert [r.step for r in records] == [1, 2] and isinstance(records[1].step, int)
    assert records[1].loss is None and records[1].fidelity == 1.0


GOOD = '{"step": 1, "fidelity": 0.5, "noise_energy": 0.1, "noise_whiteness": 0.3}'


@pytest.mark.parametrize(
    "second_line, message",
    [
        ('{"step": 2, "fidelity": 0.5, "noise_whiteness": 0.3}', "line 2: missing required field 'noise_energy'"),
        ('{"step": 2, "fidelity": "high", "noise_energy": 0.1, "noise_whiteness": 0.3}', "'fidelity' is \"high\""),
        ('{"step": 2, "fidelity": true, "noise_energy": 0.1, "noise_whiteness": 0.3}', "'fidelity' is true"),
        ('{"step": 2.5, "fidelity": 0.5, "noise_energy": 0.1, "noise_whiteness": 0.3}', "an integer >= 0"),
        ('{"step": 1, "fidelity": 0.5, "noise_energy": 0.1, "noise_whiteness": 0.3}', "line 2: step 1 does not inc"),
        ('{"step": 2, "fidelity": 0.5, "noise_energy": -0.1, "noise_whiteness": 0.3}', "'noise_energy' is -0.1"),
        ('{"step": 2, "fidelity": 1.5, "noise_energy": 0.1, "noise_whiteness": 0.3}', "expected a number <= 1"),
        ('{"step": 2, "fidelity": 0.5, "noise_energy": 0.1, "noise_whiteness": 0.3, "loss": "x"}', "'loss' is"),
        ('{"step": 2, "fidelity": 0.5, "noise_energy": 0.1, "noise_whiteness": 0.3, "schema": "v9"}', "schema 'v9'"),
        ("[1, 2]", "line 2: expected a JSON object, got list"),
        ("{step: 2}", "line 2: not JSON"),
    ],
)
def test_a_bad_line_gets_a_one_line_error_naming_file_and_line(tmp_path, second_line, message):
    path = tmp_path / "monitor.jsonl"
    path.write_text(GOOD + "\n" + second_line + "\n" + GOOD.replace('"step": 1', '"step": 9') + "\n")
    with pytest.raises(MonitorFileError, match=message) as error:
        read_monitor(path)
    assert "\n" not in str(error.value) and str(error.value).startswith(f"{path}, line 2: ")


def test_a_bad_last_line_that_ends_with_a_newline_is_an_error_not_a_truncation(tmp_path):
    path = tmp_path / "monitor.jsonl"
    path.write_text(GOOD + "\n" + '{"step": 2, "fid' + "\n")
    with pytest.raises(MonitorFileError, match="line 2: not JSON"):
        read_monitor(path)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_an_empty_file_is_an_error(tmp_path, content):
    path = tmp_path / "monitor.jsonl"
    path.write_text(content)
    with pytest.raises(MonitorFileError, match="monitor.jsonl: empty; expected one JSON record per line"):
        read_monitor(path)


def test_a_missing_file_or_a_folder_is_an_error(tmp_path):
    with pytest.raises(MonitorFileError, match="no such file"):
        read_monitor(tmp_path / "absent.jsonl")
    with pytest.raises(MonitorFileError, match="is a folder"):
        read_monitor(tmp_path)


def test_a_truncated_last_line_is_skipped_with_a_warning(tmp_path):
    path = tmp_path / "monitor.jsonl"
    path.write_text(GOOD + "\n" + '{"step": 2, "fidelity": 0.')
    with pytest.warns(UserWarning, match=r"monitor.jsonl, line 2: skipped the truncated last line"):
        records = read_monitor(path)
    assert [r.step for r in records] == [1]


def test_appending_after_a_truncated_line_drops_it_first(tmp_path):
    path = tmp_path / "monitor.jsonl"
    path.write_text(GOOD + "\n" + '{"step": 2, "fidel')
    append_monitor_record(path, _record(3))
    assert [r.step for r in read_monitor(path)] == [1, 3]
    path.write_text(GOOD)  # a whole last line without its newline is kept
    append_monitor_record(path, _record(3))
    assert [r.step for r in read_monitor(path)] == [1, 3]


def test_the_writer_refuses_what_the_reader_would_refuse(tmp_path):
    path = tmp_path / "monitor.jsonl"
    append_monitor_record(path, _record(5))
    with pytest.raises(ValueError, match=r"record step 5 must be above the last step .* \(5\)"):
        append_monitor_record(path, _record(5))
    with pytest.raises(ValueError, match="'noise_whiteness' is 2.0; expected a number in \\[0, 1\\]"):
        append_monitor_record(path, MonitorRecord(step=6, fidelity=0.5, noise_energy=0.1, noise_whiteness=2.0))
    with pytest.raises(ValueError, match="record must be a MonitorRecord, got dict"):
        append_monitor_record(path, {"step": 6})
    assert [r.step for r in read_monitor(path)] == [5]


def test_nan_measures_are_written_and_read_back(tmp_path):
    path = tmp_path / "monitor.jsonl"
    append_monitor_record(path, MonitorRecord(step=1, fidelity=float("nan"), noise_energy=0.1, noise_whiteness=0.5))
    assert read_monitor(path)[0].fidelity != read_monitor(path)[0].fidelity


def test_drop_records_after_keeps_earlier_lines_unchanged(tmp_path):
    path = tmp_path / "monitor.jsonl"
    for step in (10, 20, 30, 40):
        append_monitor_record(path, _record(step, loss=0.1))
    lines = path.read_text().splitlines()
    drop_records_after(path, 25)
    assert path.read_text().splitlines() == lines[:2]
    drop_records_after(path, 0)
    assert path.read_text() == ""
    append_monitor_record(path, _record(30))  # the rewound file takes new records
    assert [r.step for r in read_monitor(path)] == [30]
    drop_records_after(tmp_path / "absent.jsonl", 10)
    assert not (tmp_path / "absent.jsonl").exists()
    with pytest.raises(ValueError, match="step must be an integer >= 0, got '10'"):
        drop_records_after(path, "10")
    assert [p.name for p in tmp_path.iterdir()] == ["monitor.jsonl"]  # no temporary file left behind
