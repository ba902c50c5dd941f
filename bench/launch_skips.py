"""Timing only: the engine's fused decode step (on a GPU; the CPU's unfused path skips nothing) without some of
its small launches, to bound what fusing them away could save
(`python bench/rollout.py --launch-skips --ab "launch_skips.SKIP=none|norm|rope|attn|silu|all"`).

A skipped launch is not run and its output is replaced by one of its inputs, so the tokens are wrong; the
projections, the lm_head and the sampler run as always, on bounded values (a skipped norm returns the residual
stream, which then stays the embeddings). SKIP is "none", "all" or a comma-separated subset of
  norm: the (add +) RMSNorm launches (two a layer, and the final norm)
  rope: RoPE of q and k with the KV-cache write (one a layer; the cache keeps what prefill wrote)
  attn: decode attention (one a layer)
  silu: SiLU(gate) * up (one a layer)
It is read at each call, so at each engine's CUDA-graph capture (bench/rollout.py's `--ab` builds an engine per
value)."""
SKIP = "none"
KINDS = ("norm", "rope", "attn", "silu")


def skipped(kind: str) -> bool:
    named = set(SKIP.split(","))
    if named - set(KINDS) - {"none", "all"}:
        raise ValueError(f"launch_skips.SKIP={SKIP!r}: none, all or a comma-separated subset of {', '.join(KINDS)}")
    return "all" in named or kind in named


def install() -> None:
    """Wrap the fused decode's launches (engine/fused_kernels.py, engine/attention_kernels.py) once."""
    from ahazero.engine import attention_kernels as ak
    from ahazero.engine import fused_kernels as fk
    skipped("norm")  # a malformed SKIP fails here, before the model runs
    if getattr(fk, "_launch_skips", False):
        return
    add_rms_norm, rms_norm, rope, silu, attn = (fk.add_rms_norm, fk.rms_norm, fk.rope_and_cache, fk.silu_mul,
                                               ak.decode_attention_op)
    fk.add_rms_norm = lambda h, delta, *a, **k: (h, h) if skipped("norm") else add_rms_norm(h, delta, *a, **k)
    fk.rms_norm = lambda h, *a, **k: h if skipped("norm") else rms_norm(h, *a, **k)
    fk.rope_and_cache = lambda q, *a, **k: q if skipped("rope") else rope(q, *a, **k)
    fk.silu_mul = lambda gate, up: gate if skipped("silu") else silu(gate, up)
    ak.decode_attention_op = lambda q, *a, **k: q if skipped("attn") else attn(q, *a, **k)
    fk._launch_skips = True
