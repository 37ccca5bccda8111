"""Flash-LoRA-Attention: flash attention over a base KV cache plus a low-rank value adapter.

    from pallas_kernels.flash_lora_attention import flash_lora_attention
"""

from pallas_kernels.flash_lora_attention.api import (
    IMPLEMENTATIONS,
    UnsupportedError,
    default_implementation,
    flash_lora_attention,
)
from pallas_kernels.flash_lora_attention.reference import flash_lora_attention_reference

__all__ = [
    "IMPLEMENTATIONS",
    "UnsupportedError",
    "default_implementation",
    "flash_lora_attention",
    "flash_lora_attention_reference",
]
