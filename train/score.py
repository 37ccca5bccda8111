"""Per-role validation of exported adapters: loss and exact match of each role's output.

    python -m train.score --adapters lragent_jax/assets/adapters/smollm2-135m-kb
    python -m train.score --adapters runs/x/adapters --generate 64 --json scores.json

Exact match is measured two ways:
  teacher-forced: every output token and the EOS after it is the argmax given the gold prefix, i.e.
                  greedy decoding would write exactly the gold output (over the whole valid split);
  generated:      ``--generate N`` decodes the first N samples of each role greedily through a
                  ``Session`` (the inference path) and compares the text with the gold output.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time

import jax
import numpy as np

from train import data as data_lib


@functools.partial(jax.jit, static_argnames=("config",))
def _evaluate(adapters, params, batch, *, config):
    from train.loss import loss_terms

    return loss_terms(adapters, params, batch, config=config, remat="none")


def teacher_forced(base, adapters, examples, agents, *, batch_size: int, max_len: int,
                   progress: bool = True) -> dict:
    buckets = data_lib.bucket_lengths(max_len)
    window = data_lib.target_window(examples, max_len)
    from train.logs import ProgressBar
    from train.loss import per_role_totals

    batches = data_lib.evaluation_batches(examples, batch_size=batch_size, buckets=buckets,
                                          window=window)
    print(f"scoring {len(examples)} samples teacher-forced: {len(batches)} batches, "
          f"{sum(b.tokens.size for _, b in batches):,} padded tokens; the time left shows after "
          "the first batch", file=sys.stderr)
    bar = ProgressBar(progress)

    def results():
        for done, (indices, batch) in enumerate(batches, start=1):
            out = jax.device_get(_evaluate(adapters, base.params, {
                k: jax.numpy.asarray(v) for k, v in batch.arrays().items()}, config=base.config))
            bar.update("teacher-forced", done, len(batches), force=done == len(batches))
            yield indices, out

    nll, targets, correct, samples = per_role_totals(results(), examples, len(agents))
    bar.close()
    return {a: {"samples": int(samples[i]), "loss": float(nll[i] / max(targets[i], 1)),
                "exact_match": float(correct[i] / max(samples[i], 1))}
            for i, a in enumerate(agents) if samples[i]}


def generated(base, adapters, lora, examples, per_role: int, *, batch_size: int,
              max_new_tokens: int = 64, progress: bool = True) -> dict:
    """Greedy decoding through the inference session (non-shared cache: each row its own)."""
    from lragent_jax.generate import bucket
    from lragent_jax.session import GenerationSettings, Session, Turn
    from train.logs import ProgressBar

    chosen = []
    for agent in range(lora.num_agents):
        chosen.extend([e for e in examples if e.agent == agent][:per_role])
    chosen.sort(key=lambda e: e.prompt_len)
    hits = np.zeros(lora.num_agents)
    counts = np.zeros(lora.num_agents)
    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    groups = math.ceil(len(chosen) / batch_size)
    print(f"generating for {len(chosen)} samples in {groups} batches of up to {batch_size} "
          f"(up to {max_new_tokens} new tokens each, {sum(e.prompt_len for e in chosen):,} prompt "
          "tokens); the time left shows after the first batch", file=sys.stderr)
    bar = ProgressBar(progress)
    for start in range(0, len(chosen), batch_size):
        group = chosen[start:start + batch_size]
        capacity = bucket(max(e.prompt_len for e in group) + max_new_tokens, 64)
        session = Session(base.config, base.params, base.tokenizer, adapters=adapters, lora=lora,
                          mode="non_shared", batch=len(group), capacity=capacity,
                          attn_impl="reference")
        results = session.turn({row: Turn(lora.agents[e.agent],
                                           append_ids=tuple(int(t) for t in
                                                            e.tokens[:e.prompt_len]),
                                           settings=settings)
                                for row, e in enumerate(group)})
        for row, e in enumerate(group):
            gold = base.tokenizer.decode(e.tokens[e.prompt_len:-1])
            hits[e.agent] += results[row].text == gold and results[row].stop_reason == "eos"
            counts[e.agent] += 1
        bar.update("generation", start // batch_size + 1, groups)
    bar.close()
    return {a: {"samples": int(counts[i]), "exact_match": float(hits[i] / max(counts[i], 1))}
            for i, a in enumerate(lora.agents) if counts[i]}


def main(argv: list[str] | None = None) -> int:
    from train.cli import EMBEDDED, float_in, int_in, load_base, resolve_model

    parser = argparse.ArgumentParser(prog="python -m train.score", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", required=True, help="an exported adapter folder")
    parser.add_argument("--model", default=EMBEDDED,
                        help="base model (see python -m train; 'tiny' for the tiny random one)")
    parser.add_argument("--allow-other-weights", action="store_true",
                        help="use adapters trained on other weights of the same architecture")
    parser.add_argument("--data", default="kb", help="'kb' or a directory of role files")
    parser.add_argument("--kb-seed", type=int_in(0), default=0)
    parser.add_argument("--kb-valid", type=int_in(1), default=200)
    parser.add_argument("--valid-fraction", type=float_in(0, 1, low_open=True, high_open=True),
                        default=0.05)
    parser.add_argument("--max-len", type=int_in(8), default=1024)
    parser.add_argument("--batch-size", type=int_in(1), default=32)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--generate", type=int_in(0), default=0, metavar="N",
                        help="also decode N samples per role greedily and compare the text")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--limit", type=int_in(1), default=None, metavar="N",
                        help="score only the first N valid samples of each role (quick checks)")
    parser.add_argument("--json", default=None, help="write the scores here")
    args = parser.parse_args(argv)
    try:
        from lragent_jax.adapters_io import adapter_files_metadata, load_adapters

        kind, what = resolve_model(args.model, False)
        base = load_base(kind, what, args.dtype)
        adapters, lora = load_adapters(args.adapters, config=base.config, params=base.params,
                                       allow_other_weights=args.allow_other_weights)
        spec = data_lib.DataSpec(source=args.data, valid_fraction=args.valid_fraction,
                                 kb_seed=args.kb_seed, kb_train=0, kb_valid=args.kb_valid)
        _, valid = data_lib.load_role_samples(spec, lora.agents)
        if args.limit is not None:
            valid = {role: items[:args.limit] for role, items in valid.items()}
        eos = (tuple(getattr(base.tokenizer, "eos_token_ids", ())) or base.config.eos_token_ids)[0]
        examples, report = data_lib.tokenize_samples(valid, base.tokenizer, agents=lora.agents,
                                                     eos_id=eos, max_len=args.max_len)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if report.total:
        print("warning: " + report.summary("valid"), file=sys.stderr)
    start = time.perf_counter()
    scores = {"adapters": args.adapters, "base_model": base.config.name,
              "variant": adapter_files_metadata(args.adapters).get("variant"),
              "shared_a": lora.shared_a, "data": args.data,
              "teacher_forced": teacher_forced(base, adapters, examples, lora.agents,
                                               batch_size=args.batch_size, max_len=args.max_len,
                                               progress=not args.no_progress)}
    if args.generate:
        scores["generated"] = generated(base, adapters, lora, examples, args.generate,
                                        batch_size=args.batch_size,
                                        progress=not args.no_progress)
    scores["seconds"] = time.perf_counter() - start
    text = json.dumps(scores, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
