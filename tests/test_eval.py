"""python -m eval: the quick mode end to end, traces, memory figures."""

from __future__ import annotations

import json

import pytest

from eval import cli
from eval.traces import Trace, generate_trace, load_traces, save_traces
from lragent_jax.cache import ALL_MODES, CacheSpec, abstract_cache, analytic_cache_bytes
from lragent_jax.config import LoraConfig, ModelConfig

MODES = [m.value for m in ALL_MODES]


@pytest.mark.slow
def test_quick_mode_runs_end_to_end_with_every_mode_and_metric(tmp_path):
    assert cli.main(["--quick", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    for key in ("environment", "rollout", "accuracy", "teacher_forced", "efficiency", "memory"):
        assert key in results, key
    assert set(results["rollout"]["modes"]) == set(MODES)
    for mode in MODES:
        acc = results["accuracy"]["modes"][mode]
        for metric in ("accuracy", "stderr", "unfinished_share", "per_level", "prefilled",
                       "cache_bytes", "malformed_per_episode"):
            assert metric in acc, (mode, metric)
        tf = results["teacher_forced"][mode]["all"]
        for metric in ("logprob_per_token", "token_accuracy", "logprob_gap_vs_non_shared"):
            assert metric in tf
        eff = [r for r in results["efficiency"]["rows"] if r["mode"] == mode]
        assert eff and all(k in eff[0] for k in ("e2e_s", "ttft_s", "gen_tok_s", "cache_bytes",
                                                 "cache_bytes_analytic", "prefilled"))
        assert eff[0]["cache_bytes"] == eff[0]["cache_bytes_analytic"]
    # non-shared is the reference: its gap to itself is exactly zero
    assert results["teacher_forced"]["non_shared"]["all"]["logprob_gap_vs_non_shared"] == 0
    # prefill accounting: sharing modes prefill fewer tokens than per-agent modes
    rows = {r["mode"]: r for r in results["efficiency"]["rows"]}
    assert rows["base_lowrank_shared"]["prefilled_total"] < rows["non_shared"]["prefilled_total"]
    assert rows["base_lowrank_shared"]["prefilled_total"] == rows["fully_shared"]["prefilled_total"]
    for plot in ("throughput.png", "ttft.png", "memory.png", "accuracy.png"):
        assert (tmp_path / plot).stat().st_size > 1000
    assert (tmp_path / "episodes.jsonl").read_text().count("\n") == 4 * 2
    # the rollouts are saved as replayable traces
    traces = load_traces(results["accuracy"]["traces_file"])
    assert len(traces) == 2 and all(t.turns[0].agent == "plan" for t in traces)


def test_trace_from_a_real_episode_counts_every_token():
    from eval.traces import trace_from_record
    from lragent_jax.tasks.kb import KBTask
    from tests.conftest import CharTokenizer

    tok = CharTokenizer()
    for record in KBTask(seed=3, num_train=0, num_valid=3, num_test=0).gold_episodes("valid"):
        trace = trace_from_record(record, tok)
        segments = list(record.segments)
        assert trace.total == sum(len(tok.encode(s.text)) for s in segments)
        assert [t.agent for t in trace.turns] == [s.writer for s in segments if s.writer != "env"]
        # each turn generates exactly its role segment; env text is appended before the next turn
        role_segments = [s for s in segments if s.writer != "env"]
        assert [t.generate for t in trace.turns] == [len(tok.encode(s.text)) for s in role_segments]


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for option in ("--parts", "--quick", "--modes", "--model", "--adapters", "--questions",
                   "--seeds", "--temperature", "--tf-episodes", "--lengths", "--trace-file",
                   "--out"):
        assert option in text


def test_bad_options_are_named(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--parts", "accuracy,speed"])
    assert "unknown part(s) ['speed']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--modes", "half_shared"])
    assert "unknown share mode 'half_shared'" in capsys.readouterr().err


@pytest.mark.parametrize("length", [256, 777, 4096, 32768])
def test_trace_generation_is_deterministic_and_exact(length, tmp_path):
    a, b = generate_trace(length, seed=3), generate_trace(length, seed=3)
    assert a == b and a.total == length
    assert generate_trace(length, seed=4) != a
    roles = [t.agent for t in a.turns]
    assert roles[0] == "plan" and "action" in roles and roles[-1] == "reflect"
    path = save_traces(tmp_path / "t.json", [a])
    assert load_traces(path) == [a]


def test_generate_scale_multiplies_every_turns_generation_and_keeps_the_total():
    base = generate_trace(16384, seed=5)
    assert generate_trace(16384, seed=5, generate_scale=1.0) == base  # the default, exactly
    long = generate_trace(16384, seed=5, generate_scale=8)
    assert long.total == 16384 and long.name == base.name + "-g8"
    assert [t.agent for t in long.turns] == [t.agent for t in base.turns]
    assert [t.generate for t in long.turns] == [max(1, round(t.generate * 8)) for t in base.turns]
    assert long.prompt < base.prompt  # the prompt and observations make room
    short = generate_trace(16384, seed=5, generate_scale=0.1)
    assert min(t.generate for t in short.turns) == 1 and short.total == 16384
    for bad in (0, -1, float("nan"), True, "2"):
        with pytest.raises(ValueError, match="generate_scale must be a number > 0"):
            generate_trace(16384, generate_scale=bad)
    with pytest.raises(ValueError, match="leaves no room for a 48-token prompt in a 256-token"):
        generate_trace(256, generate_scale=10)


def test_trace_errors(tmp_path):
    with pytest.raises(ValueError, match="must be >= 256 tokens; got 100"):
        generate_trace(100)
    bad = tmp_path / "bad.json"
    bad.write_text('[{"name": "x", "prompt": 5}]')
    with pytest.raises(ValueError, match="trace 0 is malformed"):
        load_traces(bad)
    with pytest.raises(FileNotFoundError, match="trace file not found"):
        load_traces(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="prompt must be >= 1"):
        Trace("t", 0, ())


@pytest.mark.parametrize("mode", MODES)
def test_memory_summary_equals_cache_pytree(mode):
    cfg = ModelConfig.smollm2_135m()
    lora = LoraConfig(rank=8, targets=("q", "v", "o"))
    spec = CacheSpec.create(cfg, mode, num_agents=3, batch=1, capacity=4096, lora=lora)
    measured = abstract_cache(spec)
    from lragent_jax.cache import measured_cache_bytes

    assert measured_cache_bytes(measured) == analytic_cache_bytes(cfg, mode, num_agents=3,
                                                                  capacity=4096, rank=8)


def _published_sample(i):
    head = ("Answer with Thought, Action, Observation steps.\nQuestion:Which one is a metal?\n"
            "Options:(A) Iron (B) Wood\nThought: \n### Response:\n")
    history = (f"I should search {i}.\nAciton: BingSearch[\n### Response:\nmetals {i}]\n"
               "Obversation: Iron is a metal.\nThought: \n### Response:\n")
    return head, history


def test_published_samples_are_segmented_by_writer():
    from eval.teacher_forced import segment_published_sample

    head, history = _published_sample(0)
    sample = {"input": head + history + "Iron is a metal.\nAciton: Finish[\n### Response:\n",
              "output": "A"}
    segments = segment_published_sample(sample, "action")
    assert "".join(s.text for s in segments[:-1]) == sample["input"]
    writers = [(s.writer, s.text) for s in segments if s.writer != "env"]
    assert writers == [("plan", "I should search 0."), ("plan", "BingSearch"), ("action", "metals 0"),
                       ("plan", "Iron is a metal."), ("plan", "Finish"), ("action", "A")]
    reflect = {"input": head + "x\nAciton: Finish[\n### Response:\nA]\nObversation: Please reflect "
                               "your answer.\nThought: \n### Response:\n", "output": "Fine."}
    assert segment_published_sample(reflect, "reflect")[-1].writer == "reflect"


@pytest.mark.slow
def test_scienceqa_part_on_published_format_files(tmp_path):
    import jax

    from lragent_jax.adapters_io import save_adapters
    from lragent_jax.lora import init_adapters

    data = tmp_path / "published"
    data.mkdir()
    ends = {"plan": "", "action": "Iron is a metal.\nAciton: Finish[\n### Response:\n",
            "reflect": "Iron is a metal.\nAciton: Finish[\n### Response:\nA]\nObversation: Please "
                       "reflect your answer.\nThought: \n### Response:\nIt is right.\n"}
    for role, output in (("plan", "Iron is a metal."), ("action", "A"), ("reflect", "Reflect[right]")):
        samples = []
        for i in range(40):
            head, history = _published_sample(i % 3)
            samples.append({"input": head + history + ends[role], "output": output})
        (data / f"{role}.json").write_text(json.dumps(samples))
    cfg = cli.tiny_config()
    lora = LoraConfig(rank=4, targets=("q", "v", "o"))
    save_adapters(tmp_path / "adapters", init_adapters(jax.random.key(0), cfg, lora, b_scale=0.1),
                  lora, cfg)
    out = tmp_path / "out"
    assert cli.main(["--model", "tiny", "--parts", "scienceqa", "--scienceqa-dir", str(data),
                     "--scienceqa-adapters", str(tmp_path / "adapters"), "--scienceqa-samples",
                     "5", "--batch", "3", "--no-plots", "--out", str(out)]) == 0
    result = json.loads((out / "results.json").read_text())["scienceqa"]
    # train's default split holds out round(0.05 * 40) = 2 samples per role: only those are scored
    assert result["samples"] == 6 and result["skipped_long"] == 0
    assert result["held_out"] == {"fraction": 0.05, "seed": 0}
    assert set(result["comparison"]) == set(MODES)
    assert result["comparison"]["non_shared"]["all"]["logprob_gap_vs_non_shared"] == 0
    assert result["comparison"]["non_shared"]["all"]["tokens"] > 0
