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
                  "--random-weights", "loss.png", "Default: auto = mixed", "about a minute on a 2-core",
                  "tokens/s", "--valid-samples", "Ctrl-C"):
        assert words in " ".join(proc.stdout.split()), words
    assert build_parser().parse_args([]).view == "auto"


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
    assert "view: mixed (every sample records its writers)" in err  # --view auto chose
    assert main(_args(toy_dir, out)) == 2  # checkpoints there: refuse to start over silently
    assert "pass --resume to continue" in capsys.readouterr().err
    assert main(_args(toy_dir, out, "--resume")) == 0
    err = capsys.readouterr().err
    assert "resumed from step 2" in err and "tok/s" in err and "greedy exact match" in err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    events = [r["event"] for r in records]
    assert events[0] == "start" and events[-1] == "end" and events.count("validation") == 2
    assert records[0]["train"]["view"] == "mixed"  # what auto resolved to, as resume checks it
    steps = [r["step"] for r in records if r["event"] == "step"]
    assert steps == list(range(1, len(steps) + 1))
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    manifest = json.loads((out / "adapters" / "lragent_adapters.json").read_text())
    assert manifest["metadata"]["command"].startswith("python -m train --model tiny")
    assert manifest["metadata"]["validation"]["epoch"] == 2
    # python -m eval --model tiny builds the same model: the adapters load there, weights checked
    import warnings

    import jax
    import jax.numpy as jnp

    from lragent_jax.adapters_io import load_adapters
    from lragent_jax.config import ModelConfig
    from lragent_jax.model import init_params

    config = ModelConfig.tiny_byte()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_adapters(out / "adapters", config=config,
                      params=init_params(jax.random.key(0), config, jnp.float32))
    # and python -m train.score scores them per role (the base weights checked too)
    from train import score

    capsys.readouterr()
    assert score.main(["--adapters", str(out / "adapters"), "--model", "tiny", "--data",
                       str(toy_dir), "--valid-fraction", "0.25", "--max-len", "64",
                       "--batch-size", "8", "--dtype", "float32", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert set(json.loads(captured.out)["teacher_forced"]) == {"plan", "action", "reflect"}
    assert "scoring 18 samples teacher-forced" in captured.err
    with pytest.raises(SystemExit):
        score.main(["--adapters", "x", "--batch-size", "0"])
    assert "argument --batch-size: 0 is out of range" in capsys.readouterr().err


def test_bad_inputs_fail_with_clear_messages(tmp_path, toy_dir, capsys):
    assert main(["--model", "no-such-model"]) == 2
    assert "unknown base model 'no-such-model'" in capsys.readouterr().err
    assert main(["--model", "llama-3.1-8b"]) == 2
    assert "is a preset (shapes only): add --random-weights" in capsys.readouterr().err
    (toy_dir / "action.json").unlink()
    assert main(_args(toy_dir, tmp_path / "x")) == 2
    assert "action.json: role file is missing" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # a run that failed before writing leaves no folder
    assert main(_args(tmp_path / "nowhere", tmp_path / "x")) == 2
    assert "not 'kb' and not a directory" in capsys.readouterr().err
    assert main(_args(toy_dir, tmp_path / "x", "--targets", "q,k")) == 2
    assert "adapters on k cannot be shared" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value, message", [
    ("--clip-norm", "-1", r"argument --clip-norm: -1 is out of range; allowed: \(0, inf\)"),
    ("--min-lr-ratio", "-3", r"argument --min-lr-ratio: -3 is out of range; allowed: \[0, 1\]"),
    ("--weight-decay", "-5", r"argument --weight-decay: -5 is out of range; allowed: \[0, inf\)"),
    ("--warmup-steps", "-5", r"argument --warmup-steps: -5 is out of range; allowed: 0\.\."),
    ("--warmup-ratio", "2", r"argument --warmup-ratio: 2 is out of range; allowed: \[0, 1\)"),
    ("--adam-b1", "1", r"argument --adam-b1: 1 is out of range; allowed: \[0, 1\)"),
    ("--adam-b2", "1.5", r"argument --adam-b2: 1.5 is out of range"),
    ("--eval-batch-size", "0", r"argument --eval-batch-size: 0 is out of range; allowed: 1\.\."),
    ("--lr", "nan", r"argument --lr: nan is out of range; allowed: \(0, inf\)"),
    ("--batch-size", "x", r"argument --batch-size: 'x' is not an integer"),
    ("--valid-fraction", "1", r"argument --valid-fraction: 1 is out of range; allowed: \[0, 1\)"),
    ("--save-every", "0", r"argument --save-every: 0 is out of range"),
    ("--max-steps", "0", r"argument --max-steps: 0 is out of range"),
])
def test_numeric_flags_name_the_value_and_the_allowed_range(flag, value, message, capsys):
    import re

    with pytest.raises(SystemExit) as info:
        build_parser().parse_args([flag, value])
    assert info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_every_run_gets_its_own_folder_and_resume_finds_the_newest(tmp_path):
    from train.cli import default_out

    first = default_out("tiny", "joint", False, root=tmp_path)
    (first / "checkpoints").mkdir(parents=True)
    second = default_out("tiny", "joint", False, root=tmp_path)
    assert second != first and second.name.startswith("tiny-joint-")
    (second / "checkpoints").mkdir(parents=True)
    import os

    os.utime(first / "checkpoints", (1, 1))
    assert default_out("tiny", "joint", True, root=tmp_path) == second
    with pytest.raises(ValueError, match="no earlier run of tiny-frozen"):
        default_out("tiny", "frozen", True, root=tmp_path)


def test_the_recorded_command_is_the_one_typed(monkeypatch):
    from train.cli import typed_command

    monkeypatch.setattr(sys, "argv", ["/x/site-packages/train/__main__.py", "--lr", "1e-3"])
    assert typed_command("train", ["--lr", "1e-3"]) == "python -m train --lr 1e-3"
    monkeypatch.setattr(sys, "argv", ["/venv/bin/lragent-train", "--out", "a b"])
    assert typed_command("train", ["--out", "a b"]) == "lragent-train --out 'a b'"
