"""ahazero: GRPO that turns an ordinary LLM into a reasoning model, on one GPU or a laptop.

The public names follow Unsloth's `FastLanguageModel` calls and TRL's `GRPOConfig`/`GRPOTrainer`, so a
GRPO notebook written for those runs after changing its imports. Imports are lazy: `import ahazero`
stays cheap and the CLI starts fast.
"""
from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "FastLanguageModel": "ahazero.api",
    "PatchFastRL": "ahazero.api",
    "is_bfloat16_supported": "ahazero.api",
    "GRPOConfig": "ahazero.grpo.config",
    "GRPOTrainer": "ahazero.grpo.trainer",
    "SamplingParams": "ahazero.engine.types",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ahazero' has no attribute {name!r}")
