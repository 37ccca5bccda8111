"""``python -m train``: help, an end-to-end tiny run with resume, and clear failures."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.test_train_loop import REPO
from tests.test_train_toys import toy_samples, write_role_dir
from train.cli import build_parser, main


def test_help_documents_every_option():
    proc = subprocess.run([sys.executable, "-m", "train", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for action in build_parser()._actions:
        for flag in action.option_strings:
            assert flag in proc.stdout
        assert action.help, f"{action.option_strings} has no help"
    for words in ("--variant", "joint", "frozen", "independent", "--resume", "--mesh-model",
                  "--random-weights", "loss.png"):
        assert words in proc.stdout


@pytest.fixture
def toy_dir(tmp_path):
    return write_role_dir(tmp_path / "data", toy_samples(24))


def _args(toy_dir, out, *extra):
    return ["--model", "tiny", "--random-weights", "--dtype", "float32", "--data", str(toy_dir),
            "--valid-fraction", "0.25", "--max-len", "64", "--bucket-multiple", "64",
            "--batch-size", "8", "--epochs", "2", "--lr", "1e-2", "--out", str(out), *extra]


def test_tiny_run_end_to_end_then_kill_and_resume(tmp_path, toy_dir, capsys):
    out = tmp_path / "run"
    assert main(_args(toy_dir, out, "--stop-after", "3", "--save-every", "2")) == 0
    err = capsys.readouterr().err
    assert "continue with: python -m train --model tiny" in err and err.rstrip().endswith("--resume")
    assert main(_args(toy_dir, out)) == 2  # checkpoints there: refuse to start over silently
    assert "pass --resume to continue" in capsys.readouterr().err
    assert main(_args(toy_dir, out, "--resume")) == 0
    err = capsys.readouterr().err
    assert "resumed from step 2" in err and "tok/s" in err and "greedy exact match" in err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    events = [r["event"] for r in records]
    assert events[0] == "start" and events[-1] == "end" and events.count("validation") == 2
    steps = [r["step"] for r in records if r["event"] == "step"]
    assert steps == list(range(1, len(steps) + 1))
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    manifest = json.loads((out / "adapters" / "lragent_adapters.json").read_text())
    assert manifest["metadata"]["command"].startswith("python -m train --model tiny")
    assert manifest["metadata"]["validation"]["epoch"] == 2


def test_bad_inputs_fail_with_clear_messages(tmp_path, toy_dir, capsys):
    assert main(["--model", "no-such-model"]) == 2
    assert "unknown base model 'no-such-model'" in capsys.readouterr().err
    assert main(["--model", "llama-3.1-8b"]) == 2
    assert "is a preset (shapes only): add --random-weights" in capsys.readouterr().err
    (toy_dir / "action.json").unlink()
    assert main(_args(toy_dir, tmp_path / "x")) == 2
    assert "action.json: role file is missing" in capsys.readouterr().err
    assert main(_args(tmp_path / "nowhere", tmp_path / "x")) == 2
    assert "not 'kb' and not a directory" in capsys.readouterr().err
    assert main(_args(toy_dir, tmp_path / "x", "--targets", "q,k")) == 2
    assert "adapters on k cannot be shared" in capsys.readouterr().err
