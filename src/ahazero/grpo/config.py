"""GRPOConfig: TRL's field names and meanings, validated where it is built.

Fields keep the names of TRL's `GRPOConfig` (and the `transformers.TrainingArguments` fields GRPO
notebooks pass), so a notebook runs after changing its imports. Differences from TRL:
- `per_device_train_batch_size` counts completions; a value below `num_generations` is raised to it
  with a warning (as Unsloth does).
- `use_vllm` is accepted and means "use the built-in engine"; the `vllm_*` fields are accepted and ignored.
- `micro_batch_size` and `micro_batch_tokens` are ours: the rows of an accumulation step go through
  forward/backward in chunks of `micro_batch_size` rows when it is set, else (the default) of as many
  consecutive rows as fit `micro_batch_tokens` token positions (default 4096; a longer row runs alone).
  Packed sequences attend through one dense [S, S] mask under sdpa/eager, so the token budget also
  bounds that mask. On CUDA a chunk that runs out of memory is split in two and retried (its partial
  gradients undone first), and the budget is halved for the rest of the run, with a warning.
- `max_nonfinite_steps` is ours: a step whose loss or gradient norm is NaN/inf is skipped (weights,
  optimizer and scheduler untouched) and logged as `nonfinite_skipped`; this many in a row stop the run.
- `padding_free` is ours: the training forwards (policy, old-policy and reference log-probs) run each
  micro-batch's sequences packed into one row, without padding (grpo/packing.py), through a varlen
  attention that computes within each sequence only (models/varlen.py: PyTorch's varlen FlashAttention on
  CUDA, per-sequence SDPA elsewhere; flash/flex attention implementations are used as they are). Exact,
  so on by default; where a model does not keep packed sequences apart (measured at the first forward),
  the padded forward is used with a warning that says why.
- `ddp_timeout` (transformers' name) defaults to 300 s, not 1800: under torchrun, how long a rank waits for
  the others at a collective before raising, so one failed or stuck rank stops the run in bounded time.
- `lora_autocast` is ours (off by default): the training forwards of a bf16/fp16 model run under
  `torch.autocast` in that dtype with PEFT's input cast off. Plain LoRA layers already compute in the model's
  dtype without it (models/lora.py `fuse_lora_forwards`, which the trainer installs): it changes only the
  layers that keep PEFT's own forward (DoRA, several active adapters), which otherwise keep a float32 copy
  of their input for the backward. `bf16` and `fp16` are accepted and ignored, as before.
- `layer_graphs` is ours (on by default; CUDA with offloaded checkpointing): each decoder layer's forward
  and its recompute-and-backward are replayed from CUDA graphs (models/layer_graphs.py) where a
  micro-batch's shape repeats (completions at max_completion_length), which frees the step from the
  host's launch cost (8 x 4,096 tokens on Qwen2.5-1.5B on H200s: 1.43 s a step with them, 2.5-3.3 s
  without, bench/RESULTS.md 2026-11-27). The graphs' memory pool holds one layer pass's working memory
  (0.26 GiB there) beside the rest; `False` trades that speed for the least memory.
- `mlp_tile_tokens` is ours (None: 1,024, models/tiled_mlp.py TILE_TOKENS): with offloaded checkpointing
  each decoder layer's MLP runs by tiles of this many tokens, so a [tile, intermediate] tensor is the most it
  holds. Larger tiles are faster for more memory (8 x 4,096 on Qwen2.5-1.5B, an H200: 2,048 took 0.97 s and
  1.02 GiB above the weights against 1.04 s and 0.96 GiB); smaller ones fit tighter GPUs.
- `optim="adamw_8bit"` is our own blockwise 8-bit AdamW (grpo/optimizers.py, no bitsandbytes);
  the paged ones keep their state in pinned CPU memory between steps: `paged_adamw_8bit` (the same 8-bit
  optimizer) and `paged_adamw_32bit` (torch AdamW's float32 moments and update).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, fields

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")
IS_LEVELS = ("token", "sequence")
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "sgd")
REPORT_TO = ("none", "tensorboard", "wandb")


@dataclass
class GRPOConfig:
    # --- where and how often -------------------------------------------------------------------
    output_dir: str = "outputs"
    logging_steps: int = 1
    save_steps: int = 500
    save_total_limit: int | None = None
    report_to: str | list[str] | None = "none"
    logging_dir: str | None = None
    run_name: str | None = None
    seed: int = 42
    # --- optimisation ------------------------------------------------------------------------------
    learning_rate: float = 1e-6
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    warmup_steps: int = 0
    lr_scheduler_type: str = "linear"
    optim: str = "adamw_torch"
    max_grad_norm: float = 1.0
    bf16: bool | None = None
    fp16: bool = False
    per_device_train_batch_size: int = 8  # completions per accumulation step
    gradient_accumulation_steps: int = 1
    num_train_epochs: float = 1.0
    max_steps: int = -1
    micro_batch_size: int | None = None
    micro_batch_tokens: int = 4096  # ours: token positions per forward/backward chunk when micro_batch_size is None
    padding_free: bool = True  # ours: pack each micro-batch's sequences into one row (no padding), where exact
    lora_autocast: bool = False  # ours: the training forwards of a 16-bit model under torch.autocast (see above)
    layer_graphs: bool = True  # ours: offloaded layers' training passes replayed from CUDA graphs (see above)
    mlp_tile_tokens: int | None = None  # ours: tokens per MLP tile under offloaded checkpointing (see above)
    shuffle_dataset: bool = True
    max_nonfinite_steps: int = 3  # ours: consecutive NaN/inf losses or gradients (each skipped) before stopping
    ddp_timeout: int = 300  # seconds a rank waits in a collective for the others (transformers' default: 1800)
    # --- generation --------------------------------------------------------------------------------
    num_generations: int = 8
    max_prompt_length: int | None = 512
    max_completion_length: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    min_p: float | None = None
    use_vllm: bool = False  # accepted: the built-in engine is always used where it applies
    # --- the GRPO objective ------------------------------------------------------------------------
    beta: float = 0.0
    epsilon: float = 0.2
    epsilon_high: float | None = None
    loss_type: str = "dapo"
    importance_sampling_level: str = "token"
    scale_rewards: str | bool = "group"
    num_iterations: int = 1
    mask_truncated_completions: bool = False
    reward_weights: list[float] | None = None
    log_completions: bool = False
    # --- accepted for compatibility, no effect here -----------------------------------------------
    vllm_gpu_memory_utilization: float | None = None
    vllm_mode: str | None = None
    gradient_checkpointing: bool | None = None  # set on the model: get_peft_model(use_gradient_checkpointing=)
    remove_unused_columns: bool = False
    disable_tqdm: bool = False
    dataloader_num_workers: int = 0
    save_strategy: str = "steps"
    push_to_hub: bool = False
    ddp_find_unused_parameters: bool | None = None

    def __post_init__(self):
        self._normalise()
        self._validate()

    # -------------------------------------------------------------------------------------------
    def _normalise(self):
        if isinstance(self.scale_rewards, bool):
            self.scale_rewards = "group" if self.scale_rewards else "none"
        if self.epsilon_high is None:
            self.epsilon_high = self.epsilon
        if self.report_to is None or self.report_to == "all":
            self.report_to = "none"
        if isinstance(self.report_to, str):
            self.report_to = [self.report_to]
        self.report_to = [r for r in self.report_to if r != "none"]
        if self.top_k is None or self.top_k <= 0:
            self.top_k = -1
        if self.min_p is None:
            self.min_p = 0.0
        if self.num_generations is not None and 0 < self.per_device_train_batch_size < self.num_generations:
            warnings.warn(f"per_device_train_batch_size={self.per_device_train_batch_size} is below "
                          f"num_generations={self.num_generations}: raised to {self.num_generations} "
                          "(the batch counts completions, and a prompt's group must fit in it)", stacklevel=3)
            self.per_device_train_batch_size = self.num_generations

    def _validate(self):
        def need(ok: bool, name: str, why: str):
            if not ok:
                raise ValueError(f"GRPOConfig.{name}={getattr(self, name)!r}: {why}")

        need(isinstance(self.num_generations, int) and self.num_generations >= 2, "num_generations",
             "GRPO compares completions within a group, so it needs at least 2")
        need(self.per_device_train_batch_size % self.num_generations == 0, "per_device_train_batch_size",
             f"must be a multiple of num_generations={self.num_generations} (it counts completions)")
        need(self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps", "must be >= 1")
        need(self.learning_rate >= 0 and math.isfinite(self.learning_rate), "learning_rate", "must be >= 0")
        need(self.max_completion_length >= 1, "max_completion_length", "must be >= 1")
        need(self.max_prompt_length is None or self.max_prompt_length >= 1, "max_prompt_length",
             "must be >= 1 or None")
        need(self.temperature > 0, "temperature", "must be > 0 (sampling is what GRPO learns from)")
        need(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        need(0 <= self.min_p <= 1, "min_p", "must be in [0, 1]")
        need(self.beta >= 0, "beta", "the KL coefficient must be >= 0")
        need(self.epsilon >= 0, "epsilon", "must be >= 0")
        need(self.epsilon_high >= 0, "epsilon_high", "must be >= 0")
        need(self.loss_type in LOSS_TYPES, "loss_type", f"must be one of {LOSS_TYPES}")
        need(self.importance_sampling_level in IS_LEVELS, "importance_sampling_level", f"must be one of {IS_LEVELS}")
        need(self.scale_rewards in SCALE_REWARDS, "scale_rewards", f"must be one of {SCALE_REWARDS} or a bool")
        need(self.num_iterations >= 1, "num_iterations", "must be >= 1")
        need(self.logging_steps >= 1, "logging_steps", "must be >= 1")
        need(self.save_steps >= 1, "save_steps", "must be >= 1")
        need(self.max_steps != 0, "max_steps", "must be > 0, or -1 to run num_train_epochs")
        need(self.max_steps > 0 or self.num_train_epochs > 0, "num_train_epochs", "must be > 0 when max_steps is -1")
        need(0 <= self.warmup_ratio <= 1, "warmup_ratio", "must be in [0, 1]")
        need(self.max_grad_norm is None or self.max_grad_norm >= 0, "max_grad_norm", "must be >= 0 or None")
        need(self.optim in OPTIMIZERS, "optim", f"must be one of {OPTIMIZERS}")
        need(not (self.bf16 and self.fp16), "fp16", "bf16 and fp16 cannot both be on")
        need(self.max_nonfinite_steps >= 1, "max_nonfinite_steps", "must be >= 1")
        need(self.mlp_tile_tokens is None or isinstance(self.mlp_tile_tokens, int) and self.mlp_tile_tokens >= 1,
             "mlp_tile_tokens", "must be a positive int (tokens per MLP tile) or None (the default, 1,024)")
        need(self.ddp_timeout > 0, "ddp_timeout", "must be > 0 seconds")
        need(self.micro_batch_size is None or self.micro_batch_size >= 1, "micro_batch_size", "must be >= 1 or None")
        need(self.micro_batch_tokens >= 1, "micro_batch_tokens", "must be >= 1")
        need(self.save_total_limit is None or self.save_total_limit >= 1, "save_total_limit", "must be >= 1 or None")
        for r in self.report_to:
            need(r in REPORT_TO, "report_to", f"each entry must be one of {REPORT_TO}")
        if self.reward_weights is not None:
            need(all(math.isfinite(float(w)) for w in self.reward_weights), "reward_weights", "must be finite")

    # -------------------------------------------------------------------------------------------
    @property
    def prompts_per_step(self) -> int:
        """Distinct prompts in one accumulation step."""
        return self.per_device_train_batch_size // self.num_generations

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}
