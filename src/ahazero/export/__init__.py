"""Export: the LoRA adapter (PEFT format), merged checkpoints, GGUF files for llama.cpp, hub upload.

Every function takes the model first so `ahazero.api` can bind them as methods. Merging is a pure
state-dict transform (`merge_lora_state_dict`) applied one shard or block at a time.
"""
from .checkpoint import export_checkpoint
from .gguf_export import VALID_METHODS as GGUF_METHODS, save_gguf
from .hub import push_to_hub_gguf, push_to_hub_merged
from .lora import load_lora, save_lora
from .merge import merge_lora_state_dict
from .merged import SAVE_METHODS, save_merged

__all__ = ["save_lora", "load_lora", "save_merged", "push_to_hub_merged", "save_gguf", "push_to_hub_gguf",
           "merge_lora_state_dict", "export_checkpoint", "SAVE_METHODS", "GGUF_METHODS"]
