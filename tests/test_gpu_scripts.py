"""The device scripts' commands parse: every ``python3 -m MODULE ...`` line of
``eval/gpu_suite.sh`` and ``eval/gpu_inference.sh``, its shell variables given sample values, is
accepted by that module's own argument parser. A renamed or removed flag then fails here, on the
CPU, instead of costing a device call."""

from __future__ import annotations

import argparse
import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("eval/gpu_suite.sh", "eval/gpu_inference.sh")
# sample values of the scripts' shell variables; "$@" (no more flags) and TRAIN_EXTRA are empty
VALUES = {"OUT": "/tmp/out", "DATA": "/tmp/data", "2": "mixed", "3": "joint", "EPOCHS": "1",
          "RUNS": "1", "QUESTIONS": "360", "ALL_MODES": "non_shared,base_lowrank_shared",
          "mode": "base_lowrank_shared", "1": "agent", "src": "agent", "name": "agent",
          "best": "mixed", "adapters": "/tmp/adapters", "length": "8192", "TRAIN_EXTRA": "",
          "episodes": "8"}
NOT_PARSED = {"pytest", "eval.check_gpu_paths"}  # pytest's own flags; a module without options


def _value(match: re.Match) -> str:
    """A variable's sample value; ``${NAME:-default}`` falls back to its default."""
    name = match[1] or match[3]
    if name in VALUES:
        return VALUES[name]
    return match[2] if match[2] is not None else f"<unknown ${name}>"


def _commands() -> list[tuple[str, str, list[str]]]:
    found = []
    for script in SCRIPTS:
        text = (ROOT / script).read_text().replace("\\\n", " ")
        text = text.replace("$GEN", "python3 -m eval.bench_generate").replace('"$@"', "")
        for line in text.splitlines():
            if line.lstrip().startswith("GEN="):  # the definition of $GEN
                continue
            match = re.search(r"python3 -m ([\w.]+)(.*)", line)
            if not match or match[1] in NOT_PARSED:
                continue
            rest = re.split(r"\s(?:2>&1|\||;|&&|\|\|)\s|\s\|$|;$", match[2])[0]
            rest = re.sub(r"\$\{(\w+)(?::-([^}]*))?\}|\$(\w+)", _value, rest)
            found.append((script, match[1], shlex.split(rest)))
    return found


COMMANDS = _commands()


class _Parsed(Exception):
    pass


def test_the_scripts_are_valid_bash_and_have_commands():
    for script in SCRIPTS:
        subprocess.run(["bash", "-n", str(ROOT / script)], check=True)
    modules = {module for _, module, _ in COMMANDS}
    assert {"eval", "train", "eval.throughput", "eval.bench_serve", "eval.bench_generate"} <= modules
    unknown = [(s, m, a) for s, m, a in COMMANDS if any("<unknown" in x for x in a)]
    assert not unknown, f"add sample values for these variables: {unknown}"


@pytest.mark.parametrize("script,module,args", COMMANDS,
                         ids=[f"{s.split('/')[-1]}:{m}:{i}" for i, (s, m, _) in
                              enumerate(COMMANDS)])
def test_each_command_parses(script, module, args, monkeypatch):
    original = argparse.ArgumentParser.parse_args

    def parse_only(self, argv=None, namespace=None):
        raise _Parsed(original(self, argv, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_only)
    monkeypatch.setattr(sys, "argv", [f"python -m {module}", *args])
    with pytest.raises(_Parsed):
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=False)
        except SystemExit as e:  # argparse's error exit: the message is on stderr
            pytest.fail(f"{script}: python -m {module} {shlex.join(args)} does not parse "
                        f"(exit {e.code})")
