"""The ScienceQA task: writers of published prompts, the offline tools, the workflow and its scoring."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import pytest

from lragent_jax.tasks import scienceqa as sqa
from lragent_jax.tokenizer import ByteTokenizer
from lragent_jax.workflow import ENV, ScriptedPolicy, Segment, run_episodes
from tests.conftest import data_dir
from train import data as data_lib

ROLES = ("plan", "action", "reflect")


def published(name: str) -> Path:
    root = data_dir()
    if root is None or not (Path(root) / name).is_dir():
        pytest.skip("published trajectories not present (set LRAGENT_DATA_DIR)")
    return Path(root) / name


# -- hand-made prompts in the published template (the real ones are used when present)

HEAD = "Answer with interleaving Thought, Action, Observation steps."
QUESTION = "\nQuestion:Which one is a metal?\nOptions:(A) Iron (B) Wood\n"
T = sqa.THOUGHT_MARK


def plan_history():  # the plan's rendering: the whole action after its marker
    return (HEAD + QUESTION + T + "I should look.\nAction: \n### Response:\nImage2Text[image]"
            "\nObversation: This question doesn't have an image.\n" + T)


def action_history():  # action's and reflect's rendering: the argument after its own marker
    return (HEAD + QUESTION + T + "I should look.\nAciton: Image2Text[\n### Response:\nimage]\n"
            "Obversation: This question doesn't have an image.\n" + T + "Iron is a metal.\n"
            "Aciton: Finish[\n### Response:\nA]\nObversation: Please reflect your answer.\n" + T)


def handmade_samples():
    return {
        "plan": [{"input": plan_history(), "output": "Iron is a metal."},
                 {"input": plan_history() + "Iron is a metal." + sqa.ACTION_MARK,
                  "output": "Finish"}],
        "action": [{"input": action_history()[:action_history().index("A]\nObv")], "output": "A"}],
        "reflect": [{"input": action_history(), "output": "Iron is a metal: A is right."},
                    {"input": action_history() + "Iron is a metal: A is right.\n",
                     "output": "Reflect[right]"}],
    }


def writers_of(segments):
    return [(s.writer, s.text) for s in segments if s.writer != ENV]


def test_handmade_prompts_are_segmented_by_the_template():
    samples = handmade_samples()
    plan = sqa.segment_published_sample(samples["plan"][1], "plan")
    assert writers_of(plan) == [("plan", "I should look."), ("plan", "Image2Text"),
                                ("action", "image"), ("plan", "Iron is a metal."),
                                ("plan", "Finish")]
    # the first three env segments are the ones the workflow appends: instruction, question, marker
    assert [s.text for s in plan[:3]] == [HEAD, QUESTION, T]
    reflect = sqa.segment_published_sample(samples["reflect"][1], "reflect")
    assert writers_of(reflect)[-2:] == [("reflect", "Iron is a metal: A is right."),
                                        ("reflect", "Reflect[right]")]
    assert writers_of(reflect)[:3] == [("plan", "I should look."), ("plan", "Image2Text"),
                                       ("action", "image")]
    for role, items in samples.items():
        for sample in items:
            segments = sqa.segment_published_sample(sample, role)
            assert "".join(s.text for s in segments) == sample["input"] + sample["output"]
            assert segments[-1] == Segment(role, sample["output"])


def test_a_reflect_step_is_reflects():
    text = (HEAD + QUESTION + T + "All is known.\nAction: Reflect[right]\nObversation: Invalid "
            "action. Reflect only follows the Finish action.\n" + T)
    assert writers_of(sqa.segment_prompt(text, "plan")) == [("reflect", "All is known."),
                                                            ("reflect", "Reflect[right]")]


@pytest.mark.parametrize("broken, role, reason", [
    (QUESTION + T + "x\nAciton: BingSearch[\n### Response:\nmetals\nObversation: y\n" + T, "plan",
     "does not end with ']'"),
    (QUESTION + T + "x\nAction: \n### Response:\nFinish[A]\n" + T, "plan", "not one line followed"),
    (QUESTION + T + "x\nSomething else\n", "plan", "expected an action marker"),
    (QUESTION + T + "x" + sqa.ACTION_MARK, "action", "continued by plan or reflect, not 'action'"),
])
def test_malformed_prompts_are_refused_with_file_and_index(tmp_path, broken, role, reason):
    samples = handmade_samples()
    samples[role] = samples[role] + [{"input": HEAD + broken, "output": "z"}]
    index = len(samples[role]) - 1
    for name, items in samples.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(items))
    with pytest.raises(data_lib.DataError,
                       match=rf"{role}\.json: record {index}: .*" + re.escape(reason)):
        data_lib.load_published_dir(tmp_path, ROLES, log=lambda message: None)


def test_handmade_files_train_in_the_shared_view_and_plain_files_are_refused(tmp_path):
    samples = handmade_samples()
    for name, items in samples.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(items))
    logged = []
    loaded = data_lib.load_published_dir(tmp_path, ROLES, log=logged.append)
    assert "plan 2 of 2, action 1 of 1, reflect 2 of 2" in logged[0]
    tok = ByteTokenizer()
    examples, _ = data_lib.tokenize_samples(loaded, tok, agents=ROLES, eos_id=2, max_len=10_000,
                                            data_view="shared")
    plan_turn = [e for e in examples if e.role == "reflect"][0]
    # "image" (the action's argument) is prefilled by action, reflect's own thought by reflect
    sample = loaded["reflect"][0]
    start = sum(len(tok.encode(t)) for t in sample["segments"][:sample["writers"].index("action")])
    assert set(plan_turn.token_agents[start:start + len(tok.encode("image"))]) == {1}
    plain = {r: [{"input": "Q: 1+1?\n", "output": "2"}] for r in ROLES}
    for view in ("shared", "mixed"):
        with pytest.raises(data_lib.DataError, match=rf"--view {view} needs to know who wrote.*"
                                                      r"plan: 1 of 1 \(first: sample 0"):
            data_lib.tokenize_samples(plain, tok, agents=ROLES, eos_id=2, max_len=100,
                                      data_view=view)
    data_lib.tokenize_samples(plain, tok, agents=ROLES, eos_id=2, max_len=100, data_view="agent")


def test_published_prompts_all_segment_and_agree_with_the_role_files():
    folder = published("scienceqa")
    samples = data_lib.load_published_dir(folder, ROLES, log=lambda message: None)
    assert {r: len(v) for r, v in samples.items()} == {"plan": 944, "action": 518, "reflect": 520}
    tok = ByteTokenizer()
    encode = data_lib.SegmentEncoder(tok)
    by_question = defaultdict(list)
    for role, items in samples.items():
        for sample in items:
            assert "".join(sample["segments"]) == sample["input"]
            assert set(sample["writers"]) <= {ENV, *ROLES}
            # every prompt token has exactly one writer: the per-segment tokens are the prompt
            prompt, _ = data_lib.encode_sample(encode, sample, 2)
            assert sum(len(encode(t)) for t in sample["segments"]) == len(prompt)
            assert all(t for t, w in zip(sample["segments"], sample["writers"]) if w != ENV)
            by_question[sample["input"].split("\n" + sqa.THOUGHT_MARK)[0]].append((role, sample))
    # in a later prompt of the same trajectory, the span where an earlier sample's output went is
    # written by that sample's role, and holds its output (where the files render it unchanged)
    pairs = same_text = 0
    for items in by_question.values():
        for role, s in items:
            anchor = s["input"] if s["input"].endswith(sqa.RESPONSE) else s["input"][:-1]
            for _, t in items:
                if t is s or len(t["input"]) <= len(s["input"]) or not t["input"].startswith(anchor):
                    continue
                starts = [0]
                for text in t["segments"]:
                    starts.append(starts[-1] + len(text))
                k = starts.index(len(anchor))
                if t["writers"][k] == ENV:  # "\nAction: " before reflect's Reflect[...]
                    k += 1
                assert t["writers"][k] == role, (role, s["output"], t["segments"][k])
                pairs += 1
                same_text += t["segments"][k] == s["output"]
    assert pairs > 7000 and same_text / pairs > 0.93, (pairs, same_text)


def test_workflow_prompts_segment_back_to_their_writers():
    # the writers recovered from a ScienceQAWorkflow trajectory are exactly the ones it recorded
    question = sqa.ScienceQuestion("q", "Which one is a metal?\nOptions:(A) Iron (B) Wood", "A",
                                   ("Iron", "Wood"), None, "", "grade1-4", 3, "natural science")
    script = ["t", "Image2Text", "image", "u", "Finish", "B", "v", "Reflect[wrong]", "w", "Fly",
              "x", "Finish", "A", "y", "Reflect[right]"]
    [record] = run_episodes(sqa.ScienceQAWorkflow(), [question],
                            ScriptedPolicy.from_outputs({0: script}))
    assert record.answer == "A" and record.malformed == 1
    endings = set()
    for k, segment in enumerate(record.segments):
        if segment.writer == ENV:
            continue
        prefix = "".join(s.text for s in record.segments[:k])
        assert sqa.segment_prompt(prefix, segment.writer) == list(record.segments[:k])
        endings.add((segment.writer, sqa.parse_prompt(prefix).ending))
    assert endings == {("plan", "thought"), ("plan", "action"), ("action", "argument"),
                       ("reflect", "thought"), ("reflect", "reflect_action")}


def test_published_instruction_and_endings_are_the_workflows():
    samples = sqa.load_role_files(published("scienceqa"))
    assert sqa.ScienceQAWorkflow().instruction == sqa.published_instruction(samples["plan"])
    # each role's published prompts end the way the workflow asks that role to continue
    endings = {(r, sqa.parse_prompt(s["input"]).ending) for r in ROLES for s in samples[r]}
    assert endings == {("plan", "thought"), ("plan", "action"), ("action", "argument"),
                       ("reflect", "thought"), ("reflect", "reflect_action")}


def test_eval_questions_load_and_cover_the_bands():
    questions = sqa.load_eval_questions(published("scienceqa-eval"))
    assert len(questions) == 360 and len({q.id for q in questions}) == 360
    assert {q.band for q in questions} == set(sqa.GRADE_BANDS)
    assert all("\nOptions:(A) " in q.question and q.answer in sqa.LETTERS for q in questions)
    first = sqa.select_questions(questions, 6)
    assert [q.band for q in first] == list(sqa.GRADE_BANDS) * 2
    assert 0.3 < sqa.chance_level(questions) < 0.5
    with_text = next(q for q in questions if q.caption and q.ocr not in ("[]", ""))
    assert "[[" not in with_text.ocr  # OCR boxes reduced to their texts


def write_eval_files(directory: Path, records_per_band: int = 2) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for b, band in enumerate(sqa.GRADE_BANDS):
        records = []
        for i in range(records_per_band):
            image = i % 2 == 0
            records.append({
                "Question": f"Which is heavier, {band} {i}?\nOptions: (A) lead (B) feather",
                "choices": ["lead", "feather"], "Answer": "A", "pid": f"{b}-{i}",
                "caption": "A scale with lead." if image else "no img",
                "orc": "[([[0, 0], [1, 1]], 'LEAD', 0.9), ([[2, 2], [3, 3]], '10g', 0.8)]"
                if image else "no img",
                "metadata": {"has_image": image, "grade": 3 * b + 2, "subject": "natural science",
                             "topic": "physics", "category": "mass", "skill": "compare"}})
        (directory / f"{band}.json").write_text(json.dumps(records))
    return directory


def test_eval_file_errors_name_file_and_record(tmp_path):
    folder = write_eval_files(tmp_path / "e")
    assert len(sqa.load_eval_questions(folder)) == 6
    bad = json.loads((folder / "grade5-8.json").read_text())
    bad[1]["Answer"] = "C"
    (folder / "grade5-8.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"grade5-8\.json: record 1: answer 'C' is not one of"):
        sqa.load_eval_questions(folder)
    (folder / "grade9-12.json").unlink()
    with pytest.raises(ValueError, match=r"grade9-12\.json: evaluation file is missing"):
        sqa.load_eval_questions(folder, bands=("grade9-12",))


# -- tools


def corpus():
    return sqa.PublishedCorpus(
        ["Lead is a heavy metal with a high density.", "Feathers are light and soft."],
        {"Lead": "Lead is a chemical element with symbol Pb.", "Feather": "Feathers cover birds."})


def test_tools_answer_from_the_records_and_the_corpus(tmp_path):
    [with_image, without] = sqa.load_eval_questions(write_eval_files(tmp_path / "e"))[:2]
    assert sqa.image2text(with_image) == "Image caption: A scale with lead. OCR result: LEAD,10g"
    assert sqa.image2text(without) == sqa.NO_IMAGE
    c = corpus()
    assert c.bing_search("density of lead") == "Lead is a heavy metal with a high density."
    assert c.bing_search("capital of Delaware") == \
        "BingSearch found no results for [capital of Delaware]."
    assert c.retrieve("lead.") == "Lead is a chemical element with symbol Pb."
    assert c.retrieve("feather") == "Feathers cover birds."
    assert c.retrieve("lead poisoning") == "Could not find [lead poisoning]. Similar: ['Lead']"
    assert c.retrieve("Delaware") == sqa.RETRIEVE_NOT_FOUND


def test_corpus_from_published_trajectories():
    c = sqa.PublishedCorpus.from_folder(published("scienceqa"))
    assert c.describe()["search_documents"] > 100 and c.describe()["pages"] > 30
    assert c.retrieve("photosynthesis").startswith("Photosynthesis")
    assert not any(d.startswith(("Invalid", "Could not find")) for d in c.search_documents)


# -- the workflow and its scoring, on scripted episodes


def run_scripted(scripts, questions, **options):
    workflow = sqa.ScienceQAWorkflow(corpus(), **options)
    policy = ScriptedPolicy.from_outputs(dict(enumerate(scripts)))
    records = run_episodes(workflow, questions, policy)
    return records, [sqa.score_question(r) for r in records]


def test_scoring_of_handmade_episodes(tmp_path):
    questions = sqa.load_eval_questions(write_eval_files(tmp_path / "e"))[:1] * 5
    right = ["Let me look.", "Image2Text", "image", "Lead is heavier.", "Finish", "A",
             "A is right.", "Reflect[right]"]
    wrong = ["t", "Finish", "(B)", "ok", "Reflect[right]"]
    unfinished = ["t", "BingSearch", "lead density", "t", "Retrieve", "Lead"] + ["t", "Fly"] * 4
    malformed = ["t", "Fly", "t", "Finish[A].", "maybe", "Reflect[right/wrong]", "t", "Finish",
                 "A", "yes", "Reflect[right]"]
    lowercase = ["t", "Finish", "a.", "ok", "Reflect[right]"]
    records, outcomes = run_scripted([right, wrong, unfinished, malformed, lowercase], questions,
                                     max_steps=6)
    assert [o.status for o in outcomes] == ["correct", "wrong", "unfinished", "correct", "correct"]
    assert [o.malformed for o in outcomes] == [0, 0, 4, 2, 0]
    text = records[0].text
    assert "\nAciton: Image2Text[\n### Response:\nimage]\nObversation: Image caption: A scale " \
           "with lead. OCR result: LEAD,10g\n" in text
    assert text.endswith("Please reflect your answer.\nThought: \n### Response:\nA is right.\n"
                         "Reflect[right]")
    assert "Obversation: Lead is a heavy metal with a high density.\n" in records[2].text
    assert "Obversation: Lead is a chemical element" in records[2].text
    assert f"Obversation: {sqa.INVALID_ACTION}\n" in records[3].text
    # a verdict other than right/wrong counts as wrong, as in the paper's loop: the plan retries
    assert "Obversation: The answer maybe wrong, please try to solve the question again." \
           in records[3].text
    assert records[1].answer == "(B)" and records[4].answer == "a."


def test_wrong_task_type_is_refused():
    with pytest.raises(ValueError, match="must be a ScienceQuestion"):
        run_episodes(sqa.ScienceQAWorkflow(), ["plain text"], ScriptedPolicy(lambda r, t: "x"))


# -- on a tiny random model


def tiny_model(shared_a: bool = True, b_scale: float = 0.05):
    import jax

    from eval.cli import tiny_config
    from lragent_jax.config import LoraConfig
    from lragent_jax.lora import init_adapters
    from lragent_jax.model import init_params
    from lragent_jax.pretrained import Model

    cfg = tiny_config()
    lora = LoraConfig(rank=4, targets=("q", "v", "o"), shared_a=shared_a)
    model = Model(cfg, init_params(jax.random.key(0), cfg), ByteTokenizer())
    return model.with_adapters(init_adapters(jax.random.key(1), cfg, lora, b_scale=b_scale), lora)


@pytest.mark.slow
def test_workflow_on_a_tiny_model_is_deterministic(tmp_path):
    from eval.scienceqa_agents import rollout

    model = tiny_model()
    questions = sqa.load_eval_questions(write_eval_files(tmp_path / "e"))[:2]
    workflow = sqa.ScienceQAWorkflow(corpus(), max_steps=1)

    def episodes(seed):  # the shapes of the part's test below: compiled once for both
        session = model.session("non_shared", batch=4, capacity=2560, seed=seed,
                                min_chunk_bucket=512, min_new_bucket=64)
        return rollout(workflow, questions * 2, session, temperature=1.0, top_p=1.0)

    first, again, other = episodes(0), episodes(0), episodes(1)
    assert [r.to_dict() for r in first] == [r.to_dict() for r in again]
    assert [r.text for r in first] != [r.text for r in other]
    for record in first:
        assert record.text.startswith(workflow.instruction + "\nQuestion:" + record.task.question)
        assert sqa.score_question(record).status in ("correct", "wrong", "unfinished")
        assert record.turns[0].agent == "plan" and len(record.turns[0].output) <= 64 * 4


@pytest.mark.slow
def test_scienceqa_agents_part_on_a_tiny_model(tmp_path):
    from eval import cli
    from eval.traces import load_traces

    data = tmp_path / "scienceqa"
    data.mkdir()
    for role, items in handmade_samples().items():
        (data / f"{role}.json").write_text(json.dumps(items))
    write_eval_files(tmp_path / "scienceqa-eval")
    out = tmp_path / "out"
    assert cli.main(["--model", "tiny", "--parts", "scienceqa_agents", "--scienceqa-dir", str(data),
                     "--scienceqa-adapters", "random", "--sqa-questions", "2", "--sqa-runs", "2",
                     "--sqa-max-steps", "1", "--sqa-batch", "4", "--min-bucket", "512",
                     "--sqa-capacity", "2560",
                     "--modes", "non_shared", "--no-plots",
                     "--out", str(out)]) == 0
    result = json.loads((out / "results.json").read_text())["scienceqa_agents"]
    assert set(result["modes"]) == {"non_shared", "no_adapter"}
    assert result["questions"] == 2 and result["runs"] == 2 and result["chance"] == 0.5
    for summary in result["modes"].values():
        assert summary["n"] == 4 and len(summary["outcomes"]) == 4
        assert set(summary["per_band"]) == {"grade1-4", "grade5-8"}
        assert sum(s["n"] for s in summary["per_band"].values()) == 4
        assert 0 <= summary["unfinished_share"] <= 1
    assert result["modes"]["non_shared"]["vs_non_shared"]["difference"] == 0
    assert len(load_traces(result["traces_file"])) == 4
    lines = (out / "scienceqa_episodes.jsonl").read_text().splitlines()
    assert len(lines) == 8 and {json.loads(x)["run"] for x in lines} == {0, 1}
    assert json.loads((out / "scienceqa_agents.json").read_text())["modes"].keys() == \
        result["modes"].keys()


def test_scienceqa_agents_part_skips_what_cannot_run(tmp_path, monkeypatch):
    import argparse

    from eval import cli
    from eval.scienceqa_agents import paired_difference, run_scienceqa_agents

    write_eval_files(tmp_path / "scienceqa-eval")
    data = tmp_path / "scienceqa"
    data.mkdir()
    for role, items in handmade_samples().items():
        (data / f"{role}.json").write_text(json.dumps(items))
    args = cli.build_parser().parse_args(["--scienceqa-dir", str(data), "--no-sqa-baseline",
                                          "--scienceqa-adapters", "x", "--sqa-questions", "2"])
    # independent A cannot share the low-rank cache: that mode is skipped with the reason
    result = run_scienceqa_agents(args, ["base_lowrank_shared"],
                                  lambda a: tiny_model(shared_a=False), tmp_path, log=lambda m: None)
    assert "shared-A" in result["skipped_modes"]["base_lowrank_shared"] and not result["modes"]
    for flag, value, message in (("sqa_runs", 0, "--sqa-runs must be >= 1"),
                                 ("sqa_temperature", float("nan"), "--sqa-temperature must be"),
                                 ("sqa_questions", 0, "--sqa-questions must be >= 1")):
        bad = argparse.Namespace(**{**vars(args), flag: value})
        with pytest.raises(SystemExit, match=message):
            run_scienceqa_agents(bad, ["non_shared"], lambda a: None, tmp_path)
    missing = argparse.Namespace(**{**vars(args), "scienceqa_eval_dir": str(tmp_path / "none")})
    assert "skipped" in run_scienceqa_agents(missing, ["non_shared"], lambda a: None, tmp_path,
                                             log=lambda m: None)
    # the paired difference averages each question's runs first
    diff = paired_difference(["correct", "wrong", "correct", "correct"],
                             ["wrong", "wrong", "correct", "wrong"], 2)
    assert diff["difference"] == pytest.approx(0.5) and diff["questions_changed"] == 2


def test_built_in_task_files_without_writers_are_left_alone(tmp_path):
    from lragent_jax.tasks.kb import KBTask

    samples = KBTask(seed=1, num_train=3, num_valid=0, num_test=0).role_samples("train")
    stripped = {r: [{"input": s["input"], "output": s["output"]} for s in v]
                for r, v in samples.items()}
    later = [s for s in stripped["action"] if "\nObservation: " in s["input"]]
    assert later and not any(sqa.is_published_format(s) for s in later)
    for name, items in stripped.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(items))
    loaded = data_lib.load_published_dir(tmp_path, ROLES, log=lambda message: None)
    # no writers guessed (nor a refusal) once a prompt shows the other template's markers
    assert all("writers" not in s for s in loaded["action"])
    first_turns = [s for s in loaded["plan"] if s["input"].count(sqa.RESPONSE) == 1]
    assert first_turns and all(s["writers"] == [ENV] * 3 for s in first_turns)
    with pytest.raises(data_lib.DataError, match="--view shared needs to know who wrote"):
        data_lib.tokenize_samples(loaded, ByteTokenizer(), agents=ROLES, eos_id=2,
                                  max_len=100_000, data_view="shared")
