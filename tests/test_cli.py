"""The three command lines agree on exit codes: 0 done, 1 failed, 2 usage (the command line itself is wrong).

Run in-process through each ``main(argv)``; the real entry points run as subprocesses elsewhere
(tests/test_training.py, tests/test_evaluate.py, tests/test_predict.py, tests/test_install.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import SAMPLE_LESIONS
from train.cli import main as train_main
from train.evaluate import main as evaluate_main
from train.predict import main as predict_main


def usage_code(main, argv: list[str]) -> int:
    """The exit status for a command line argparse itself refuses (it raises SystemExit)."""
    with pytest.raises(SystemExit) as raised:
        main(argv)
    return raised.value.code


def test_usage_errors_exit_2_in_every_tool(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    image = str(next(SAMPLE_LESIONS.glob("*.jpg")))
    checkpoint = str(tmp_path / "model.pt")
    assert usage_code(train_main, ["--no-such-option=1"]) == 2
    assert usage_code(evaluate_main, ["--data", str(tmp_path)]) == 2  # --checkpoint missing
    assert usage_code(predict_main, ["--checkpoint", checkpoint, image]) == 2  # --out missing
    # Refused by the tools themselves, after parsing: a bad value, an unknown recipe, nothing to do.
    assert train_main(["--epochs=many"]) == 2
    assert train_main(["--recipe=no-such-recipe"]) == 2
    assert evaluate_main(["--checkpoint", checkpoint, "--data", str(tmp_path), "--batch-size", "0"]) == 2
    assert predict_main(["--checkpoint", checkpoint, "--out", str(tmp_path / "r.csv"), str(tmp_path)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) >= 4 and "Traceback" not in "\n".join(errors)


def test_failures_exit_1_in_every_tool(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bogus = tmp_path / "model.pt"
    bogus.write_bytes(b"not a checkpoint")
    image = str(next(SAMPLE_LESIONS.glob("*.jpg")))
    missing = str(tmp_path / "no-such-dataset")
    assert train_main(["--recipe=scratch", f"--data={missing}", f"--out={tmp_path / 'run'}", "--arch=resnet18"]) == 1
    assert "dataset folder not found" in capsys.readouterr().err
    assert evaluate_main(["--checkpoint", str(bogus), "--data", str(SAMPLE_LESIONS)]) == 1
    assert capsys.readouterr().err.startswith("error: ")
    assert predict_main(["--checkpoint", str(bogus), "--out", str(tmp_path / "r.csv"), image]) == 1
    assert capsys.readouterr().err.startswith("error: ")
