"""Training of multi-agent role adapters: ``python -m train`` (see ``train.cli``).

Modules: ``data`` (role samples -> tokens, loss mask, bucketed batches), ``loop`` (loss, optimizer,
shared-A variants, the step loop), ``checkpoint`` (orbax checkpoints and resume), ``cli``,
``benchmark`` (tokens/s and model FLOP utilisation), ``score`` (per-role validation of exported
adapters).
"""
