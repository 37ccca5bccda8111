"""Serve the role adapters over an OpenAI-compatible HTTP API, with the shared cache behind it.

    python -m lragent_jax.serve                                  # embedded SmolLM2 + shipped roles
    python -m lragent_jax.serve --model PATH --adapters FOLDER --mode base_lowrank_shared
    python -m lragent_jax.serve --random-weights llama3_1_8b --capacity 16384   # speed runs

The ``model`` of a request is a role adapter's name (e.g. plan, action, reflect) or the base
model's (``--served-model-name``, default the model's name); ``GET /v1/models`` lists them. A prompt
is matched token by token against the trajectories the server holds (one per row); the longest
common prefix is reused whichever agent wrote it (in the shared modes) and only the rest is
prefilled. ``trajectory`` (or ``user``) in a request pins it to one trajectory. Binds to 127.0.0.1
unless --host says otherwise: there is no authentication.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time

from lragent_jax.cache import ALL_MODES
from lragent_jax.generate import SAMPLING_KINDS

CPU_BUDGET_GIB = 2.0
# What --warm-up auto compiles on an accelerator: greedy requests (temperature 0) and sampled
# ones without top-p / top-k filtering (the clients' usual top_p=1).
AUTO_WARM_UP = ("greedy", "sample")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1; got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1; got {value}")
    return value


def _rows(text: str):
    return text if text == "auto" else _positive(text)


def _warm_up(text: str):
    """'auto', 'none' or a comma-separated list of sampling kinds."""
    if text in ("auto", "none"):
        return text
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    bad = [k for k in kinds if k not in SAMPLING_KINDS]
    if bad or not kinds:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected 'auto', 'none' or a comma-separated list of {SAMPLING_KINDS}")
    return kinds


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lragent_jax.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", default="default",
                   help="'default' (the embedded SmolLM2-135M-Instruct), an HF checkpoint folder "
                        "or a .gguf file")
    g.add_argument("--adapters", default="default",
                   help="folder of exported role adapters; 'default': the shipped ones for the "
                        "default model (none for other models); 'none': the base model only")
    g.add_argument("--random-weights", metavar="PRESET", default=None,
                   help="instead of --model: random weights of a preset shape (tiny, llama3_1_8b, "
                        "smollm2_135m, ...) with random plan/action/reflect adapters, no EOS and "
                        "one character per token id (speed measurements)")
    g.add_argument("--rank", type=_positive, default=8, help="adapter rank of --random-weights")
    g.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="parameter and cache dtype (auto: bfloat16 on an accelerator, float32 on "
                        "a CPU)")
    g.add_argument("--attn", default=None, help="attention implementation (default: chosen per "
                                                "platform and shape)")
    g.add_argument("--served-model-name", default=None,
                   help="the bare base model's name in requests (default: the model's name)")
    g = p.add_argument_group("cache")
    g.add_argument("--mode", default="base_lowrank_shared", choices=[m.value for m in ALL_MODES],
                   help="cache-sharing mode (default base_lowrank_shared; non_shared reuses a "
                        "prefix per adapter, as vLLM/SGLang)")
    g.add_argument("--rows", type=_rows, default="auto",
                   help="trajectories held at once (cache rows); 'auto': as many as fit the "
                        "memory budget, at most --max-rows (default auto)")
    g.add_argument("--max-rows", type=_positive, default=64, help="upper bound of --rows auto")
    g.add_argument("--budget-gib", type=float, default=None,
                   help="memory budget of --rows auto (default: the device's free memory after "
                        f"the weights; {CPU_BUDGET_GIB:g} GiB on a CPU)")
    g.add_argument("--capacity", type=_positive, default=4096,
                   help="tokens per trajectory: prompt plus completion (default 4096)")
    g = p.add_argument_group("scheduling")
    g.add_argument("--block-tokens", type=int, default=16,
                   help="tokens a generation makes per engine call before other requests may "
                        "join (a call decodes until its longest row is done, so shorter blocks "
                        "let rows that finish early take their next turn sooner; 0: a whole "
                        "generation in one call; default 16)")
    g.add_argument("--stream-first-token", action=argparse.BooleanOptionalAction, default=True,
                   help="a streamed generation's first call makes one token (earlier first "
                        "token; default on)")
    g.add_argument("--prefill-chunk", type=_positive, default=512,
                   help="tokens per prefill step (a power of two; default 512)")
    g.add_argument("--min-chunk-bucket", type=_positive, default=16,
                   help="smallest padded prefill length (fewer compilations when larger)")
    g.add_argument("--long-lane", action=argparse.BooleanOptionalAction, default=None,
                   help="prefill a call's long chunks packed: in segments of --prefill-chunk "
                        "tokens, a fixed number per step whatever rows they come from, so a "
                        "call costs about the tokens it brings; default: on when --prefill-chunk "
                        "> --min-chunk-bucket")
    g.add_argument("--min-new-bucket", type=_positive, default=None,
                   help="smallest output buffer of a call (default: --block-tokens, at least 8; "
                        "64 with --block-tokens 0)")
    g.add_argument("--batch-wait-ms", type=float, default=None,
                   help="how long a call may wait for the clients the last call answered (their "
                        "next turns join it); default: set from the clients' measured round "
                        "trips (the last 64 of pinned trajectories): long enough for those that "
                        "come back within a small part of a call, 0 when they are slower; a "
                        "tenth of a call, at most 20 ms, until 16 were seen; 0: never wait")
    g.add_argument("--row-grace-ms", type=float, default=50.0,
                   help="a trajectory just answered is not evicted for another one for this long "
                        "(its agent's next turn usually follows at once; default 50)")
    g.add_argument("--max-waiting", type=_positive, default=4096,
                   help="requests queued for a row at most; more get 429 (default 4096)")
    g.add_argument("--completion-max-tokens", type=_positive, default=16,
                   help="max_tokens of a completion that gives none (default 16, as OpenAI)")
    g.add_argument("--chat-max-tokens", type=_positive, default=1024,
                   help="max_tokens of a chat completion that gives none (default 1024)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed of requests without one")
    g.add_argument("--warm-up", type=_warm_up, default="auto", metavar="KINDS|auto|none",
                   help="before serving, compile every program a call of these sampling kinds "
                        f"may run ({', '.join(SAMPLING_KINDS)}; comma-separated), so that no "
                        "request waits on a compile (an 8B program takes seconds; the "
                        "compilation cache makes later starts quick); auto: "
                        f"{','.join(AUTO_WARM_UP)} on an accelerator, none on a CPU "
                        "(default auto)")
    g.add_argument("--warm-up-tokens", type=_positive, default=None, metavar="N",
                   help="the warm-up covers calls making up to N tokens (default --block-tokens; "
                        "with --block-tokens 0 the smallest output buffer, --min-new-bucket: "
                        "give the largest max_tokens expected)")
    g.add_argument("--call-log", default=None, metavar="FILE",
                   help="append one JSON line per engine call to FILE (its rows, agents, chunks, "
                        "prefill slots, decode steps and seconds), to see how requests were "
                        "batched; the file is appended to, never truncated")
    g.add_argument("--compilation-cache", default=None, metavar="DIR|off",
                   help="folder of compiled programs kept between runs, or 'off' (default: "
                        "$LRAGENT_COMPILATION_CACHE, else ~/.cache/lragent-jax/xla)")
    g = p.add_argument_group("HTTP")
    g.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; the server has no authentication)")
    g.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port)")
    g.add_argument("--log-level", default="info",
                   choices=("critical", "error", "warning", "info", "debug"))
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_wait_ms is not None and not args.batch_wait_ms >= 0:
        parser.error(f"--batch-wait-ms must be >= 0; got {args.batch_wait_ms}")
    if not args.row_grace_ms >= 0:
        parser.error(f"--row-grace-ms must be >= 0; got {args.row_grace_ms}")
    if args.block_tokens < 0:
        parser.error(f"--block-tokens must be >= 0 (0: no limit); got {args.block_tokens}")
    if args.random_weights is not None and (args.model != "default"
                                            or args.adapters != "default"):
        parser.error("--random-weights replaces --model and --adapters; give one or the other")
    if not 0 <= args.port < 65536:
        parser.error(f"--port must be in 0..65535; got {args.port}")
    if args.call_log is not None:
        try:  # before the model loads and the warm-up compiles
            open(args.call_log, "a", encoding="utf-8").close()
        except OSError as e:
            parser.error(f"--call-log {args.call_log!r} cannot be appended to: {e}")

    import jax
    import jax.numpy as jnp

    from lragent_jax.rollout import device_free_bytes, plan_rows
    from lragent_jax.runtime import enable_compilation_cache, resolve_cache_dir
    from lragent_jax.serve.server import ServerThread, build_server, load_model, random_model

    cache_dir = enable_compilation_cache(resolve_cache_dir(args.compilation_cache))
    print(f"compilation cache: {cache_dir or 'off'}", flush=True)
    on_cpu = jax.default_backend() == "cpu"
    warm_up = args.warm_up
    if warm_up == "auto":
        warm_up = () if on_cpu else AUTO_WARM_UP
    elif warm_up == "none":
        warm_up = ()
    dtype = jnp.dtype(("float32" if on_cpu else "bfloat16") if args.dtype == "auto"
                      else args.dtype)
    try:
        if args.random_weights is not None:
            model = random_model(args.random_weights, rank=args.rank, dtype=dtype,
                                 seed=args.seed, attn_impl=args.attn)
        else:
            model = load_model(args.model, args.adapters, dtype=dtype, attn_impl=args.attn)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    if args.capacity > model.config.max_position_embeddings:
        parser.error(f"--capacity {args.capacity} exceeds the model's position limit "
                     f"{model.config.max_position_embeddings}")
    rows = args.rows
    if rows == "auto":
        if args.budget_gib is not None:
            budget, source = int(args.budget_gib * (1 << 30)), "--budget-gib"
        else:
            budget, source = device_free_bytes(), "device free memory after the weights"
            if budget is None:
                budget, source = int(CPU_BUDGET_GIB * (1 << 30)), "CPU default"
        mode = args.mode if model.lora is not None else "non_shared"
        try:
            plan = plan_rows(model.config, mode, capacity=args.capacity, lora=model.lora,
                             cache_dtype=dtype, budget_bytes=budget, budget_source=source,
                             prefill_chunk=args.prefill_chunk, max_rows=args.max_rows)
        except ValueError as e:
            parser.error(str(e))
        rows = plan.rows
        print(f"rows: {plan.describe()}", flush=True)
    try:
        server = build_server(
            model, mode=args.mode, rows=rows, capacity=args.capacity,
            block_tokens=args.block_tokens, stream_first_token=args.stream_first_token,
            served_name=args.served_model_name, completion_max_tokens=args.completion_max_tokens,
            chat_max_tokens=args.chat_max_tokens, prefill_chunk=args.prefill_chunk,
            min_chunk_bucket=args.min_chunk_bucket, min_new_bucket=args.min_new_bucket,
            seed=args.seed, max_waiting=args.max_waiting,
            batch_wait=None if args.batch_wait_ms is None else args.batch_wait_ms / 1000,
            row_grace=args.row_grace_ms / 1000, long_lane=args.long_lane, warm_up=warm_up,
            warm_up_tokens=args.warm_up_tokens, call_log=args.call_log)
    except ValueError as e:
        parser.error(str(e))
    names = ", ".join(server.context.models)
    runner = ServerThread(server.app, args.host, args.port, log_level=args.log_level)
    print(f"serving {names} ({server.session.mode.value}, {rows} rows x {args.capacity} tokens, "
          f"{dtype.name}) on {runner.url}/v1", flush=True)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop as on Ctrl-C
    try:
        runner.start()
        while runner.alive:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        runner.stop()
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
