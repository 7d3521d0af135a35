"""lesion.files: the one atomic writer. Racing writers never share a temporary file; a failure leaves no trace."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from lesion.card import write_model_card
from lesion.files import atomic_write, write_text_atomic
from lesion_app.jobs import _write_json_atomic


def test_two_open_writers_of_one_file_use_different_temporary_files(tmp_path: Path) -> None:
    # The fixed ".name.tmp" names this replaced let the second writer truncate the first one's bytes.
    target = tmp_path / "job.json"
    with atomic_write(target) as first, atomic_write(target) as second:
        assert first.name != second.name  # mkstemp's unique names
        first.write("first")
        second.write("second")
    assert target.read_text() == "first"  # renamed last: the outer writer closes last
    assert [p.name for p in tmp_path.iterdir()] == ["job.json"]


def test_racing_threads_leave_one_whole_file(tmp_path: Path) -> None:
    target = tmp_path / "model_card.md"
    texts = [f"writer {n}\n" * 2000 for n in range(8)]
    barrier = threading.Barrier(len(texts))

    def write(text: str) -> None:
        barrier.wait()
        write_text_atomic(target, text)

    threads = [threading.Thread(target=write, args=(text,)) for text in texts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert target.read_text() in texts  # one writer's text, whole
    assert [p.name for p in tmp_path.iterdir()] == ["model_card.md"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path: Path) -> None:
    target = tmp_path / "metrics.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_write(target) as stream:
        stream.write("half")
        raise RuntimeError("killed midway")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_the_app_and_the_card_write_through_it(tmp_path: Path, trained_model: Path, monkeypatch) -> None:
    seen: list[Path] = []
    import lesion.files

    real = lesion.files.tempfile.mkstemp

    def watching(*args, **kwargs):
        handle, name = real(*args, **kwargs)
        seen.append(Path(name))
        return handle, name

    monkeypatch.setattr(lesion.files.tempfile, "mkstemp", watching)
    _write_json_atomic(tmp_path / "job.json", {"pid": 1})
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.pt").write_bytes(trained_model.read_bytes())
    write_model_card(run)
    assert [p.parent for p in seen] == [tmp_path, run] and (run / "model_card.md").read_text().startswith(
        "# Model card"
    )
