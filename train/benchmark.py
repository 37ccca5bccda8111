"""Training speed: tokens/s and model FLOP utilisation (MFU) of the real training step.

    python -m train.benchmark                          # the default cases below
    python -m train.benchmark --case llama-3.1-8b:64:4096:1:full --steps 8 --json out.json

A case is MODEL:RANK:SEQ:BATCH:REMAT with random bf16 base weights of a preset's shapes, float32
adapters on the default targets (q, v, o, gate, up, down) for three agents (shared A, rows routed
to random agents), a loss over the last 256 positions of every row, and the same jitted accumulate
+ AdamW step as ``python -m train``. MFU = model FLOPs per second / the measured bf16 matmul rate.

Model FLOPs of one LoRA training step (recomputation by remat is not counted):
  base matmuls      4 * P * tokens        forward + input gradient; the frozen weights get none
  adapters          6 * P_lora * tokens   forward + input and weight gradients (one agent a row)
  attention         3 * 4 * L * N * H * T(T+1)/2 per row (QK^T and PV, causal; backward = 2x)
  LM head           4 * D * V * loss positions
P counts the layers' projection weights (q, k, v, o, gate, up, down). The 6 * N rule of full
fine-tuning would count 1.5x more for the base weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from lragent_jax.config import LoraConfig, ModelConfig
from lragent_jax.lora import init_adapters
from lragent_jax.model import init_params
from lragent_jax.sharding import param_specs
from train.cli import _preset_key, int_in
from train.data import Batch
from train.config import DEFAULT_TARGETS, REMAT, Phase, TrainConfig
from train.placement import Placement
from train.step import step_functions, update_mask

DEFAULT_CASES = ("smollm2-135m:8:4096:8:full", "smollm2-135m:64:4096:8:full",
                 "smollm2-135m:8:512:32:full", "llama-3.1-8b:8:4096:1:full",
                 "llama-3.1-8b:64:4096:1:full")
LOSS_POSITIONS = 256


@dataclasses.dataclass(frozen=True)
class Case:
    model: str
    rank: int
    seq: int
    batch: int
    remat: str

    @classmethod
    def parse(cls, text: str) -> "Case":
        parts = text.split(":")
        if len(parts) != 5:
            raise ValueError(f"case {text!r} must be MODEL:RANK:SEQ:BATCH:REMAT")
        numbers = []
        for name, value in zip(("RANK", "SEQ", "BATCH"), parts[1:4]):
            try:
                number = int(value)
            except ValueError:
                number = 0
            if number < 1:
                raise ValueError(f"case {text!r}: {name} must be an int >= 1; got {value!r}")
            numbers.append(number)
        if parts[4] not in REMAT:
            raise ValueError(f"case {text!r}: REMAT must be one of {REMAT}; got {parts[4]!r}")
        return cls(parts[0], *numbers, parts[4])

    def __str__(self) -> str:
        return f"{self.model}:{self.rank}:{self.seq}:{self.batch}:{self.remat}"


def model_flops(config: ModelConfig, lora: LoraConfig, seq: int, batch: int,
                loss_positions: int) -> dict[str, float]:
    L, D, V = config.num_layers, config.hidden_size, config.vocab_size
    tokens = seq * batch
    projections = L * sum(a * b for a, b in (config.module_dims(m) for m in
                                             ("q", "k", "v", "o", "gate", "up", "down")))
    lora_params = L * sum(config.module_dims(m)[0] * lora.rank + lora.rank
                          * config.module_dims(m)[1] for m in lora.targets)
    attention = 3 * 4 * L * config.num_heads * config.head_dim * seq * (seq + 1) / 2 * batch
    parts = {"base": 4.0 * projections * tokens, "adapters": 6.0 * lora_params * tokens,
             "attention": float(attention), "lm_head": 4.0 * D * V * loss_positions * batch}
    parts["total"] = sum(parts.values())
    return parts


def _time(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return times


def matmul_peak(size: int = 8192, repeats: int = 20) -> float:
    """Measured bf16 matmul rate (FLOP/s) of a size^3 product, median of ``repeats``."""
    keys = jax.random.split(jax.random.key(1), 4)
    pairs = [(jax.random.normal(keys[i], (size, size), jnp.bfloat16),
              jax.random.normal(keys[i + 1], (size, size), jnp.bfloat16)) for i in (0, 2)]
    product = jax.jit(lambda a, b: a @ b)
    for a, b in pairs:
        product(a, b).block_until_ready()
    times = []
    for i in range(repeats):
        a, b = pairs[i % 2]  # alternate inputs so no cache holds the operands
        times.extend(_time(lambda: product(a, b), 1))
    return 2.0 * size ** 3 / statistics.median(times)


def run_case(case: Case, steps: int, peak: float, placement: Placement | None = None,
             config: ModelConfig | None = None) -> dict:
    """One case on ``placement`` (default: data-parallel over every device); ``config`` instead of
    the case's preset (tiny shapes for CPU runs). The base weights are made where they live."""
    config = config or ModelConfig.preset(_preset_key(case.model) or case.model)
    train_config = TrainConfig(rank=case.rank, alpha=2.0 * case.rank, targets=DEFAULT_TARGETS,
                               remat=case.remat, batch_size=case.batch, max_len=case.seq)
    lora = train_config.lora
    placement = placement or Placement()
    started = time.perf_counter()
    shardings = placement.replicated  # where placement.params puts the weights
    if placement.mesh.shape["model"] > 1:
        shardings = jax.tree.map(lambda s: NamedSharding(placement.mesh, s),
                                 param_specs(config, placement.mesh),
                                 is_leaf=lambda s: isinstance(s, P))
    params = jax.jit(init_params, static_argnums=(1, 2), out_shardings=shardings)(
        jax.random.key(0), config, jnp.bfloat16)
    adapters = placement.replicate(jax.jit(init_adapters, static_argnums=(1, 2),
                                           static_argnames="b_scale")(
        jax.random.key(1), config, lora, b_scale=0.01))
    fns = step_functions(config, train_config, placement.replicated)
    opt_state = placement.replicate(fns.optimizer.init(adapters))
    mask = placement.replicate(update_mask(lora, Phase("all", (0, 1, 2), True, (0, 1, 2))))
    rng = np.random.default_rng(0)
    window = min(LOSS_POSITIONS, case.seq - 1)
    positions = np.broadcast_to(np.arange(case.seq - 1 - window, case.seq - 1, dtype=np.int32),
                                (case.batch, window))
    tokens = rng.integers(3, config.vocab_size, (case.batch, case.seq), dtype=np.int32)
    batch = placement.batch(Batch(
        tokens=tokens, lengths=np.full((case.batch,), case.seq, np.int32),
        adapter_index=rng.integers(0, lora.num_agents, (case.batch,), dtype=np.int32),
        label_positions=np.ascontiguousarray(positions),
        label_ids=np.ascontiguousarray(tokens[:, -window:]),
        label_weights=np.ones((case.batch, window), np.float32)))
    lr = np.float32(1e-4)

    state = {"adapters": adapters, "opt": opt_state}

    def step():
        acc = jax.tree.map(jnp.zeros_like, state["adapters"])
        acc, loss, count = fns.accumulate(acc, state["adapters"], params, batch)
        state["adapters"], state["opt"], norm, _ = fns.apply(state["adapters"], state["opt"], acc,
                                                             count, lr, mask)
        return loss, norm

    compile_start = time.perf_counter()
    loss, _ = jax.block_until_ready(step())
    compile_seconds = time.perf_counter() - compile_start
    _time(step, 1)
    times = _time(step, steps)
    seconds = statistics.median(times)
    flops = model_flops(config, lora, case.seq, case.batch, window)
    memory = None
    try:
        stats = jax.devices()[0].memory_stats() or {}
        memory = stats.get("peak_bytes_in_use")
    except Exception:  # not every backend reports memory
        pass
    return {"case": str(case), "model": config.name, "rank": case.rank, "seq": case.seq,
            "batch": case.batch, "remat": case.remat, "step_seconds": seconds,
            "step_seconds_all": times, "tokens_per_s": case.seq * case.batch / seconds,
            "model_tflops_per_s": flops["total"] / seconds / 1e12,
            "mfu": flops["total"] / seconds / peak, "flops": flops,
            "first_step_seconds": compile_seconds, "setup_seconds": compile_start - started,
            "loss_per_token": float(loss) / (window * case.batch),
            "peak_memory_bytes": memory}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.benchmark", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", action="append", default=None,
                        help=f"MODEL:RANK:SEQ:BATCH:REMAT, repeatable (default: "
                             f"{' '.join(DEFAULT_CASES)})")
    parser.add_argument("--steps", type=int_in(1), default=6, help="timed steps per case")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--peak-size", type=int_in(64), default=8192,
                        help="side of the square bf16 matmul that measures the peak rate")
    args = parser.parse_args(argv)
    cases = [Case.parse(c) for c in (args.case or DEFAULT_CASES)]

    device = jax.devices()[0]
    peak = matmul_peak(args.peak_size)
    header = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": device.device_kind, "platform": device.platform,
              "device_count": jax.device_count(), "jax": jax.__version__,
              "python": platform.python_version(),
              "bf16_matmul_tflops_measured": peak / 1e12, "results": []}
    print(f"# {header['date']}  {header['device']} x{header['device_count']}  jax "
          f"{header['jax']}  measured bf16 matmul {peak / 1e12:.0f} TFLOP/s", flush=True)
    for case in cases:
        try:
            result = run_case(case, args.steps, peak)
        except Exception as err:  # keep the other cases (out of memory, say)
            result = {"case": str(case), "error": f"{type(err).__name__}: {str(err)[:500]}"}
        header["results"].append(result)
        if "error" in result:
            print(f"{case}: FAILED {result['error']}", flush=True)
        else:
            print(f"{case}: {result['tokens_per_s']:,.0f} tok/s, step {result['step_seconds']:.3f}"
                  f" s, {result['model_tflops_per_s']:.0f} TFLOP/s, MFU {result['mfu']:.1%} "
                  f"(first step {result['first_step_seconds']:.0f} s)", flush=True)
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(header, f, indent=2)
    print("\n| case (model:rank:seq:batch:remat) | tokens/s | step s | model TFLOP/s | MFU |")
    print("|---|---|---|---|---|")
    for r in header["results"]:
        if "error" in r:
            print(f"| {r['case']} | failed | | | |")
        else:
            print(f"| {r['case']} | {r['tokens_per_s']:,.0f} | {r['step_seconds']:.3f} | "
                  f"{r['model_tflops_per_s']:.0f} | {r['mfu']:.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
