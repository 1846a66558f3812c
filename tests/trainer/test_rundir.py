"""The run directory: where each file lives, atomic writes, and read_result's answer for a
result.json that is missing, cut short, corrupt, or someone else's."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from xstilts.trainer.config import RunConfig, RunResult, Stage
from xstilts.trainer.rundir import (
    ProgressFile,
    ResultMissing,
    ResultProblem,
    RunDir,
    read_progress,
    read_result,
    run_dir,
    run_dirs_holding,
    write_atomic,
    write_config,
    write_result,
)


def config(tmp_path: Path, seed: int = 0) -> RunConfig:
    return RunConfig(model="tiny", stage=Stage.INTERMEDIATE, tasks=("mnli",), seed=seed,
                     storage_root=str(tmp_path / "root"))


def result(c: RunConfig) -> RunResult:
    return RunResult(run_id=c.run_id, config=c, metrics={"dev.accuracy": 0.5}, parameter_count=1, tokens_seen=2,
                     train_steps=3, wall_seconds=4.0, tokens_per_second=5.0, finished_at="2026-01-01T00:00:00Z")


def test_every_path_is_inside_the_run_directory_and_the_model_and_resume_dirs_differ(tmp_path: Path) -> None:
    c = config(tmp_path)
    d = RunDir.of(c)
    assert d == RunDir.at(c.storage_root, c.run_id) and d.path == tmp_path / "root" / "runs" / c.run_id
    paths = [d.run_config, d.config, d.progress, d.resume, d.model, d.result, d.failure, d.train_log, d.lock,
             d.tracking_buffer, d.tracking_synced, d.tracking_lock]
    assert all(p.parent == d.path for p in paths) and len({p.name for p in paths}) == len(paths)
    assert d.model.name != d.resume.name


def test_the_string_form_keeps_a_uri_storage_root_intact() -> None:
    assert run_dir("s3://bucket/exp/", "abc") == "s3://bucket/exp/runs/abc"
    target = RunConfig(model="tiny", stage=Stage.TARGET, tasks=("xnli",), init_from_run="0" * 12,
                       storage_root="s3://bucket/exp")
    assert target.init_model_dir == f"s3://bucket/exp/runs/{'0' * 12}/{RunDir.MODEL}"


def test_write_atomic_replaces_whole_files_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b.json"
    write_atomic(path, "one")
    write_atomic(path, b"two")
    assert path.read_text() == "two" and os.listdir(path.parent) == ["b.json"]


def test_a_progress_file_is_replaced_whole_without_fsync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # rewritten every second on the training thread: the rename keeps readers from a part,
    # and no fsync stalls the step (durable files, like result.json, still get theirs)
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    progress = ProgressFile(tmp_path / "progress.json", min_interval=0.0)
    progress.update(step=1, total_steps=2)
    progress.update(step=2)
    assert read_progress(tmp_path / "progress.json")["step"] == 2  # type: ignore[index]
    assert [p.name for p in tmp_path.iterdir()] == ["progress.json"] and synced == []
    write_atomic(tmp_path / "result.json", "{}")
    assert len(synced) == 2  # the file, then its directory


def test_a_written_result_reads_back(tmp_path: Path) -> None:
    c = config(tmp_path)
    assert write_config(c) == RunDir.of(c).config
    path = write_result(result(c))
    assert path == RunDir.of(c).result and RunDir.of(c).has_result()
    assert read_result(path) == result(c) == read_result(path, c.run_id)


def test_a_missing_result_says_the_run_has_not_finished(tmp_path: Path) -> None:
    path = RunDir.of(config(tmp_path)).result
    with pytest.raises(ResultMissing) as e:
        read_result(path)
    assert str(e.value) == f"{path}: no such file (the run has not finished)"
    assert isinstance(e.value, ResultProblem)


@pytest.mark.parametrize(("content", "expected"), [
    ("", "the file is empty: its writing was cut short"),
    ("  \n", "the file is empty: its writing was cut short"),
    ('{"run_id": "abc", "config": {', "not JSON: EOF while parsing"),  # cut short
    ("{not json", "not JSON: key must be a string"),  # corrupt
    ('{"run_id": "abc"}', "(config: Field required (and "),  # JSON, but not a result record
    ("[1, 2]", "((root): Input should be an object"),
])
def test_a_partial_or_corrupt_result_names_the_file_and_what_is_wrong(tmp_path: Path, content: str,
                                                                      expected: str) -> None:
    path = RunDir.of(config(tmp_path)).result
    path.parent.mkdir(parents=True)
    path.write_text(content)
    with pytest.raises(ResultProblem) as e:
        read_result(path)
    assert not isinstance(e.value, ResultMissing)
    message = str(e.value)
    assert message.startswith(f"{path}: not a valid result record") and expected in message, message
    assert e.value.path == path and message == f"{path}: {e.value.what}"
    assert "\n" not in message


def test_a_torn_write_is_reported_not_read(tmp_path: Path) -> None:
    c = config(tmp_path)
    path = write_result(result(c))
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    with pytest.raises(ResultProblem, match="cut short or corrupt"):
        read_result(path)


def test_another_runs_result_is_a_problem_when_the_run_id_is_given(tmp_path: Path) -> None:
    c, other = config(tmp_path), config(tmp_path, seed=1)
    path = RunDir.of(other).result
    write_atomic(path, result(c).model_dump_json())
    assert read_result(path).run_id == c.run_id
    with pytest.raises(ResultProblem) as e:
        read_result(path, other.run_id)
    assert str(e.value) == f"{path}: holds the result of run {c.run_id}, not {other.run_id}"


def test_an_unreadable_result_says_why(tmp_path: Path) -> None:
    path = RunDir.of(config(tmp_path)).result
    path.mkdir(parents=True)  # a directory where the file should be
    with pytest.raises(ResultProblem, match=r"cannot read it \(Is a directory\)"):
        read_result(path)


def test_run_dirs_holding_finds_them_under_a_root_or_a_directory_of_roots(tmp_path: Path) -> None:
    a, b = config(tmp_path), RunConfig(model="tiny", stage=Stage.INTERMEDIATE, tasks=("mnli",),
                                       storage_root=str(tmp_path / "other"))
    write_result(result(a))
    write_result(result(b))
    assert run_dirs_holding(tmp_path / "root", RunDir.RESULT) == [RunDir.of(a)]
    assert run_dirs_holding(tmp_path, RunDir.RESULT) == sorted([RunDir.of(a), RunDir.of(b)], key=lambda d: d.path)
    assert run_dirs_holding(tmp_path, RunDir.TRACKING_BUFFER) == []
