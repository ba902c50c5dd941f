"""The MLP by token tiles (models/tiled_mlp.py) under offloaded checkpointing: the gradients of no
checkpointing at all, no MLP intermediate larger than a tile kept by the backward, and the layers that
must not be tiled left alone (float32 CPU, tiny models of real architectures)."""
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import AutoConfig, AutoModelForCausalLM

import tiny
from ahazero.models import swiglu_kernels, tiled_mlp
from ahazero.models.loader import attach_lora, enable_gradient_checkpointing

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MLP_AND_ATTENTION = ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]


def lora_model(arch, mode, dropout=0.0):
    model = attach_lora(tiny.tiny_model(arch, initializer_range=0.2), r=4, lora_alpha=8,
                        target_modules=MLP_AND_ATTENTION, random_state=0, lora_dropout=dropout,
                        init_lora_weights=False)
    enable_gradient_checkpointing(model, mode)
    return model.train()


def loss_of(model, ids):
    logits = model(ids).logits  # [B, T, V]
    return torch.log_softmax(logits.float(), -1)[:, :-1].gather(-1, ids[:, 1:, None]).mean()


def grads(model, ids, saved_hook=None):
    loss = loss_of(model, ids)
    if saved_hook is None:
        loss.backward()
    else:  # on the CPU the backward (and the recompute inside it) runs on this thread
        with torch.autograd.graph.saved_tensors_hooks(saved_hook, lambda t: t):
            loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def random_ids(batch, length, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 151000, (batch, length), generator=g)


def test_tile_bounds_cover_the_tokens_in_near_equal_tiles():
    for n in [1, 5, 1023, 1024, 1025, 4170, 9000]:
        for size in [1, 3, 1024]:
            bounds = tiled_mlp.tile_bounds(n, size)
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))  # contiguous, no overlap
            lengths = [stop - start for start, stop in bounds]
            assert len(bounds) == -(-n // size) and max(lengths) <= size and max(lengths) - min(lengths) <= 1 + n // 100


@pytest.mark.parametrize("arch", ["qwen2", "llama", "qwen3"])
@pytest.mark.parametrize("path", ["written-out", "autograd"])
def test_tiled_offloaded_gradients_equal_no_checkpointing(arch, path, monkeypatch):
    """Both backwards: the written-out one of plain-LoRA SwiGLU MLPs, and autograd per tile (any other MLP)."""
    monkeypatch.setattr(tiled_mlp, "TILE_TOKENS", 7)  # 23 tokens a row, 2 rows: 7 tiles of <= 7 tokens
    if path == "autograd":
        monkeypatch.setattr(tiled_mlp, "swiglu_lora_parts", lambda mlp: None)
    function = tiled_mlp._TiledLoraSwiGLU if path == "written-out" else tiled_mlp._TiledMLP
    calls, original = [], function.backward
    monkeypatch.setattr(function, "backward", staticmethod(lambda ctx, g: calls.append(g.shape) or original(ctx, g)))
    ids = random_ids(2, 23, seed=1)
    ref_loss, ref = grads(lora_model(arch, False), ids)
    model, tokens_through_mlp, written_out_tiles = lora_model(arch, "offload"), [], []
    for layer in model.get_base_model().model.layers:
        layer.mlp.gate_proj.register_forward_hook(lambda m, args, out: tokens_through_mlp.append(out.shape[-2]))
    tile_forward = tiled_mlp._gated_hidden  # once per tile in the forward, once in the backward
    monkeypatch.setattr(tiled_mlp, "_gated_hidden", lambda *a: written_out_tiles.append(1) or tile_forward(*a))
    loss, got = grads(model, ids)
    assert len(calls) == 2  # one tiled MLP per decoder layer ran its backward
    # each layer's MLP ran twice, as with plain recompute: the forward, then the tiles in the backward (through
    # the modules, or written out); the recompute skipped it
    if path == "autograd":
        assert sum(tokens_through_mlp) == 2 * 2 * 46 and not written_out_tiles
    else:
        assert not tokens_through_mlp and len(written_out_tiles) == 2 * 2 * len(tiled_mlp.tile_bounds(46, 7))
    assert set(got) == set(ref) and len(ref) == 2 * 2 * len(MLP_AND_ATTENTION)
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], atol=1e-6, rtol=1e-5)


def test_the_backward_keeps_no_mlp_intermediate_larger_than_a_tile(monkeypatch):
    monkeypatch.setattr(tiled_mlp, "TILE_TOKENS", 8)
    ids = random_ids(1, 40, seed=2)
    intermediate = tiny.tiny_config("qwen2").intermediate_size

    def largest_intermediate():
        model, sizes = lora_model("qwen2", "offload"), []
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

        def pack(t):
            if t.shape[-1] == intermediate and t.untyped_storage().data_ptr() not in weights:
                sizes.append(t.numel() // intermediate)  # tokens of a saved [..., I] activation
            return t

        grads(model, ids, saved_hook=pack)
        return max(sizes, default=0)  # the written-out backward keeps nothing through autograd

    assert largest_intermediate() <= 8
    monkeypatch.setattr(tiled_mlp, "TILED_MODEL_TYPES", frozenset())  # the offloaded recompute, untiled
    assert largest_intermediate() == 40


@pytest.mark.parametrize("dtype,kernels", [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)])
def test_written_out_backward_equals_autograd_on_one_mlp(dtype, kernels, monkeypatch):
    """One layer's MLP (16-bit weights, float32 adapters as PEFT keeps them) on fresh random inputs: the tiled
    written-out forward and backward against autograd through the untiled MLP (in bf16 also with the SwiGLU
    and LoRA kernels of models/swiglu_kernels.py, in Triton's interpreter here)."""
    monkeypatch.setattr(tiled_mlp, "TILE_TOKENS", 6)
    monkeypatch.setattr(swiglu_kernels, "ON_CPU_IN_INTERPRETER", kernels)
    on_gpu_16bit = DEVICE == "cuda" and dtype != torch.float32
    assert swiglu_kernels.covers(torch.zeros(1, dtype=dtype, device=DEVICE)) == (kernels or on_gpu_16bit)
    model = lora_model("llama", "offload")
    model.get_base_model().to(dtype)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    mlp = model.get_base_model().model.layers[1].mlp
    assert tiled_mlp.swiglu_lora_parts(mlp) is not None
    bound = 1e-6 if dtype == torch.float32 else 1e-2  # bf16: products of other row counts round apart by an ulp
    if kernels and DEVICE == "cpu":
        bound *= INTERPRETER_ROUNDING  # (measured 0.0100-0.0105 against 0.0050-0.0054 unkernelled)
    assert_written_out_equals_autograd(mlp, dtype, bound)


def test_written_out_tiles_over_nf4_weights_equal_autograd(monkeypatch):
    """NF4 bases (load_in_4bit): the written-out tiles dequantise each weight where a product needs it; against
    autograd through the untiled MLP over the same Linear4bit modules (their own forward and backward)."""
    from ahazero.models.linear4bit import Linear4bit, quantize_model
    monkeypatch.setattr(tiled_mlp, "TILE_TOKENS", 6)
    base = tiny.tiny_model("llama", initializer_range=0.2)
    quantize_model(base, dynamic=False)
    model = attach_lora(base, r=4, lora_alpha=8, target_modules=MLP_AND_ATTENTION, random_state=0,
                        init_lora_weights=False)
    enable_gradient_checkpointing(model, "offload")
    mlp = model.get_base_model().model.layers[1].mlp
    parts = tiled_mlp.swiglu_lora_parts(mlp)
    assert parts is not None and all(type(w) is Linear4bit for w, *_ in parts)
    assert_written_out_equals_autograd(mlp, torch.float32, 1e-6)


def assert_written_out_equals_autograd(mlp, dtype, bound):
    """The tiled MLP's output, input gradient and six adapter gradients (float32) within `bound` (relative
    norm) of autograd through the untiled MLP, on fresh random inputs."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 17, mlp.gate_proj.in_features, generator=g).to(dtype).requires_grad_(True)
    grad = torch.randn(2, 17, mlp.down_proj.out_features, generator=g).to(dtype)
    adapters = [p for p in mlp.parameters() if p.requires_grad]
    results = []
    for forward in (mlp._ahazero_untiled_forward, mlp.forward):
        x.grad = None
        for p in adapters:
            p.grad = None
        y = forward(x)
        y.backward(grad)
        results.append((y.detach(), x.grad.clone(), [p.grad.clone() for p in adapters]))
    (ref_y, ref_gx, ref_ga), (y, gx, ga) = results
    assert len(ga) == 6 and all(a.dtype == torch.float32 for a in ga)
    for got, ref in [(y, ref_y), (gx, ref_gx)] + list(zip(ga, ref_ga)):
        assert ((got.float() - ref.float()).norm() / ref.float().norm()).item() < bound


class LiveOfShape(TorchDispatchMode):
    """Counts the distinct storages of live tensors of one shape made by the ops run under it; `most` is the
    largest count seen after any op."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.refs, self.most, self.paused = tuple(shape), [], 0, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.paused:
            self.made(out)
        return out

    def made(self, out):
        self.refs += [weakref.ref(t) for t in tree_leaves(out) if torch.is_tensor(t) and tuple(t.shape) == self.shape]
        live = {ref().untyped_storage().data_ptr() for ref in self.refs if ref() is not None}
        self.most = max(self.most, len(live))

    def as_one_kernel(self, fn):
        """`fn` counted as the one compiled kernel it is on CUDA: only what it returns, not its op-by-op
        temporaries on the CPU."""
        def run(*args):
            self.paused = True
            try:
                out = fn(*args)
            finally:
                self.paused = False
            self.made(out)
            return out
        return run


@pytest.mark.parametrize("dtype,kernels", [(torch.float32, False), (torch.bfloat16, True)])
def test_the_tile_backward_keeps_at_most_three_intermediates_alive(dtype, kernels, monkeypatch):
    """The [t, I] tensors set a tile's memory: the written-out backward keeps at most three alive at once
    (gate, up and one more; the order before this test kept five), with fused_math's SwiGLU and with the
    kernels of models/swiglu_kernels.py. SwiGLU and its backward are one compiled kernel each on CUDA: their
    op-by-op temporaries on the CPU are not counted."""
    monkeypatch.setattr(swiglu_kernels, "ON_CPU_IN_INTERPRETER", kernels)
    live = LiveOfShape((5, 24))
    for name in ("swiglu", "swiglu_backward_"):
        monkeypatch.setattr(tiled_mlp, name, live.as_one_kernel(getattr(tiled_mlp, name)))
    for name in ("swiglu_lora", "swiglu_lora_backward_"):
        monkeypatch.setattr(swiglu_kernels, name, live.as_one_kernel(getattr(swiglu_kernels, name)))
    g = torch.Generator().manual_seed(11)
    t, hidden, inter, r = 5, 8, 24, 4

    def part(n_out, n_in):  # (W, sA, B) as `_cast_parts` gives them
        return tuple(torch.randn(*shape, generator=g).to(DEVICE, dtype)
                     for shape in ((n_out, n_in), (r, n_in), (n_out, r)))

    parts = [part(inter, hidden), part(inter, hidden), part(hidden, inter)]
    x, grad = (torch.randn(t, hidden, generator=g).to(DEVICE, dtype) for _ in range(2))
    shrunk, grad_down_shrunk = tiled_mlp._row_shrinks(x, parts), grad @ parts[2][2]  # [t, r] each
    with live:
        tiled_mlp._swiglu_lora_tile_backward(x, grad, parts, torch.empty_like(x), shrunk, grad_down_shrunk,
                                             x.new_empty(t, r), [x.new_empty(t, r), x.new_empty(t, r)])
    assert live.most == 3  # [t, I] = [5, 24]


# Triton's interpreter casts float32 to bf16 by truncation (a GPU rounds to nearest): each rounding's error
# doubles, so a CPU check of the kernels allows twice the error a GPU run's does.
INTERPRETER_ROUNDING = 2


def rounded(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype).double()


@pytest.mark.parametrize("M,I,R,seed", [(70, 200, 8, 0), (5, 24, 32, 1), (130, 128, 20, 2)])
def test_swiglu_lora_kernels_equal_a_float64_reference(M, I, R, seed, monkeypatch):
    """models/swiglu_kernels.py on fresh random bf16 inputs (shapes off the blocks' multiples, ranks not a power
    of two), against float64 math that rounds where the kernels' contract says (each LoRA sum to bf16):
    within one bf16 rounding of the result."""
    monkeypatch.setattr(swiglu_kernels, "ON_CPU_IN_INTERPRETER", True)
    dtype = torch.bfloat16
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE, dtype)

    gate, up, grad_hidden = rand(M, I, scale=2.0), rand(M, I, scale=2.0), rand(M, I)
    s_gate, s_up, grad_s_down = rand(M, R), rand(M, R), rand(M, R)
    b_gate, b_up, a_down = rand(I, R, scale=0.3), rand(I, R, scale=0.3), rand(R, I, scale=0.3)
    lora = lambda base, s, b_t: rounded(base.double() + s.double() @ b_t.double(), dtype)  # noqa: E731
    g_ref, u_ref = lora(gate, s_gate, b_gate.t()), lora(up, s_up, b_up.t())
    gh_ref = lora(grad_hidden, grad_s_down, a_down)
    sig = torch.sigmoid(g_ref)
    hidden_ref = g_ref * sig * u_ref
    grad_gate_ref, grad_up_ref = gh_ref * u_ref * sig * (1 + g_ref * (1 - sig)), gh_ref * g_ref * sig

    hidden = swiglu_kernels.swiglu_lora(gate, up, (s_gate, b_gate), (s_up, b_up))
    swiglu_kernels.swiglu_lora_backward_(grad_hidden, gate, up, (s_gate, b_gate), (s_up, b_up),
                                         (grad_s_down, a_down))
    for got, ref in [(hidden, hidden_ref), (gate, grad_gate_ref), (up, grad_up_ref)]:
        assert got.dtype == dtype
        # one bf16 rounding of the result, plus an ulp of a LoRA sum rounded the other way (float32 order)
        ulps = 2 ** -7 * (INTERPRETER_ROUNDING if DEVICE == "cpu" else 1)
        torch.testing.assert_close(got.double().cpu(), ref.cpu(), rtol=ulps, atol=ulps * ref.abs().max().item())


def test_no_grad_forward_by_tiles_equals_the_untiled_forward(monkeypatch):
    ids = random_ids(2, 19, seed=3)
    plain = lora_model("llama", False).eval()
    with torch.no_grad():
        ref = plain(ids).logits
    tiled = lora_model("llama", "offload").eval()
    monkeypatch.setattr(tiled_mlp, "TILE_TOKENS", 5)
    with torch.no_grad():
        got = tiled(ids).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_set_tile_tokens_gives_each_tiled_mlp_its_tile(monkeypatch):
    """GRPOConfig.mlp_tile_tokens' mechanism: the tiles take the set size (None: TILE_TOKENS again), with the
    same output; a size that is not a positive int is an error."""
    model = lora_model("llama", "offload").eval()
    seen, by_tiles = [], tiled_mlp._swiglu_lora_by_tiles
    monkeypatch.setattr(tiled_mlp, "_swiglu_lora_by_tiles",
                        lambda x, parts, tile: seen.append(tile) or by_tiles(x, parts, tile))
    ids = random_ids(2, 19, seed=4)
    outputs = []
    for tokens in (None, 5, None):
        assert tiled_mlp.set_tile_tokens(model, tokens) == 2  # the tiny model's two layers
        with torch.no_grad():
            outputs.append(model(ids).logits)
    assert seen == [tiled_mlp.TILE_TOKENS] * 2 + [5] * 2 + [tiled_mlp.TILE_TOKENS] * 2
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-5, rtol=1e-5)
    for bad in (0, 2.5):
        with pytest.raises(ValueError, match="tile tokens"):
            tiled_mlp.set_tile_tokens(model, bad)


def test_mlps_with_dropout_and_other_architectures_are_not_tiled():
    assert tiled_mlp.tile_mlps(lora_model("qwen2", False).get_base_model()) == 2
    assert tiled_mlp.tile_mlps(lora_model("qwen2", False, dropout=0.1).get_base_model()) == 0
    config = AutoConfig.for_model("gemma2", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=16, vocab_size=128)
    gemma2 = AutoModelForCausalLM.from_config(config)  # a post-MLP norm reads the MLP's output
    assert tiled_mlp.tile_mlps(gemma2) == 0
    assert all("_ahazero_untiled_forward" not in layer.mlp.__dict__ for layer in gemma2.model.layers)


def test_dropout_in_the_mlp_keeps_the_gradients_of_no_checkpointing():
    ids = random_ids(1, 17, seed=4)
    torch.manual_seed(5)
    _, ref = grads(lora_model("qwen2", False, dropout=0.3), ids)
    torch.manual_seed(5)
    _, got = grads(lora_model("qwen2", "offload", dropout=0.3), ids)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], atol=1e-6, rtol=1e-5)
