"""LoRA loading (kohya-ss, PEFT/diffusers, old diffusers) and runtime-scaled side branches for W2SD."""

from w2sd.lora.apply import (
    LoRAHandle,
    attach_lora,
    attached_loras,
    bind_lora_scale,
    detach_lora,
    lora_scale,
    set_lora_scale,
    set_lora_scales,
)
from w2sd.lora.formats import LoRA, LoRAModule, load_lora, parse_lora_state_dict
from w2sd.lora.kohya_names import diffusers_to_sgm_module_paths, kohya_name_table, lora_target_paths
from w2sd.lora.layers import LoRABranch, LoRAScale, check_scale

__all__ = [
    "LoRA",
    "LoRABranch",
    "LoRAHandle",
    "LoRAModule",
    "LoRAScale",
    "attach_lora",
    "attached_loras",
    "bind_lora_scale",
    "check_scale",
    "detach_lora",
    "diffusers_to_sgm_module_paths",
    "kohya_name_table",
    "load_lora",
    "lora_scale",
    "lora_target_paths",
    "parse_lora_state_dict",
    "set_lora_scale",
    "set_lora_scales",
]
