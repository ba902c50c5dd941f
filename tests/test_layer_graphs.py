"""CUDA graphs of the offloaded layers' passes (models/layer_graphs.py).

On the CPU: the pieces that decide what a graph reads (which module a checkpointed function is, the keyword
arguments' structure) and when graphs stay off. On CUDA (the GPU machine): a packed training step replayed
from graphs gives the loss and LoRA gradients of the eager step, for new inputs of the same shapes.
"""
import functools

import pytest
import torch

import tiny
from ahazero.models import layer_graphs
from ahazero.models.loader import attach_lora, enable_gradient_checkpointing


def test_layer_of_finds_the_module_of_transformers_checkpoint_hook():
    layer = torch.nn.Linear(2, 2)
    assert layer_graphs.layer_of(functools.partial(torch.nn.Linear.forward, layer, x=1)) is layer
    assert layer_graphs.layer_of(functools.partial(layer.__call__)) is layer
    assert layer_graphs.layer_of(lambda x: x) is None


def test_keyword_tensors_swap_in_signature_order():
    cos, sin, pos = torch.zeros(1, 5, 4), torch.ones(1, 5, 4), torch.arange(5)[None]
    kwargs = {"position_embeddings": (cos, sin), "position_ids": pos, "use_cache": False, "mask": None}
    sig = {k: layer_graphs.signature(v) for k, v in kwargs.items()}
    assert sig["position_embeddings"] == ("tuple", ("T", (1, 5, 4), torch.float32, cos.device, False),
                                          ("T", (1, 5, 4), torch.float32, cos.device, False))
    assert sig["use_cache"] is False and sig["mask"] is None
    flat = [t for v in kwargs.values() for t in layer_graphs.tensors_of(v)]
    assert [t is u for t, u in zip(flat, [cos, sin, pos])] == [True] * 3
    copies = [t.clone() for t in flat]
    it = iter(copies)
    swapped = {k: layer_graphs.with_tensors(v, it) for k, v in kwargs.items()}
    assert swapped["position_embeddings"][0] is copies[0] and swapped["position_ids"] is copies[2]
    assert swapped["use_cache"] is False
    with pytest.raises(TypeError):
        layer_graphs.signature(object())  # e.g. a KV cache: no graph


def test_graphs_stay_off_for_dropout_and_off_cuda():
    plain = attach_lora(tiny.tiny_model("qwen2"), r=4, lora_alpha=8, target_modules=["q_proj"], random_state=0)
    dropped = attach_lora(tiny.tiny_model("qwen2"), r=4, lora_alpha=8, target_modules=["q_proj"], random_state=0,
                          lora_dropout=0.1)
    cpu = torch.zeros(1, 3, plain.config.hidden_size)
    for model in (plain, dropped):
        model.train()
    assert not layer_graphs.eligible(plain.get_base_model().model.layers[0], cpu)  # not CUDA
    if torch.cuda.is_available():
        cuda = cpu.cuda()
        assert layer_graphs.eligible(plain.get_base_model().model.layers[0].cuda(), cuda)
        assert not layer_graphs.eligible(dropped.get_base_model().model.layers[0].cuda(), cuda)


def test_grpo_config_layer_graphs_false_keeps_the_layers_eager(monkeypatch):
    from ahazero import GRPOConfig, GRPOTrainer
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda t: True))  # as if on a GPU: only the switch decides
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    for enabled in (True, False):
        model = attach_lora(tiny.tiny_model("qwen2"), r=4, lora_alpha=8, target_modules=["q_proj"], random_state=0)
        GRPOTrainer(model=model, processing_class=tiny.tokenizer(), generator=object(),
                    args=GRPOConfig(output_dir="unused", num_generations=2, layer_graphs=enabled, report_to=[]),
                    reward_funcs=lambda completions, **kw: [0.0] * len(completions), train_dataset=[{"prompt": "x"}])
        model.train()
        layer = model.get_base_model().model.layers[0]
        assert layer_graphs.eligible(layer, torch.zeros(1)) == enabled


def offloaded_cuda_lora_model(arch, dtype, monkeypatch):
    """A tiny LoRA model on CUDA with offloaded checkpointing, graphs reset, and the list its captures
    append to."""
    model = attach_lora(tiny.tiny_model(arch, dtype=dtype, initializer_range=0.2), r=4, lora_alpha=8,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                        random_state=0, init_lora_weights=False).cuda()
    enable_gradient_checkpointing(model, "offload")
    model.train()
    layer_graphs.reset()
    captures = []
    original = layer_graphs._capture
    monkeypatch.setattr(layer_graphs, "_capture", lambda *a: captures.append(1) or original(*a))
    return model, captures


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("arch,dtype", [("qwen2", torch.float32), ("llama", torch.float32), ("qwen2", torch.bfloat16)])
def test_replayed_layers_give_the_eager_gradients(arch, dtype, monkeypatch):
    """float32 runs the varlen attention's SDPA path, bf16 PyTorch's varlen FlashAttention."""
    from ahazero.grpo.packing import varlen_context

    def step(model, ids, positions):
        with varlen_context(model.get_base_model().model):
            logits = model(input_ids=ids, position_ids=positions, use_cache=False).logits  # [1, S, V]
            loss = torch.log_softmax(logits.float(), -1)[0, :-1].gather(-1, ids[0, 1:, None]).mean()
            loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return loss.detach(), grads

    model, captures = offloaded_cuda_lora_model(arch, dtype, monkeypatch)
    g = torch.Generator().manual_seed(0)
    positions = torch.cat([torch.arange(n) for n in (7, 12, 5)])[None].cuda()  # 3 packed sequences
    for i in range(4):  # eager, capture, replay, replay: each with new tokens
        ids = torch.randint(3, 1000, (1, positions.shape[1]), generator=g).cuda()
        loss, got = step(model, ids, positions)
        monkeypatch.setattr(layer_graphs, "LAYER_GRAPHS", False)
        want_loss, want = step(model, ids, positions)
        monkeypatch.setattr(layer_graphs, "LAYER_GRAPHS", True)
        assert set(got) == set(want) and len(want) == 2 * 7 * model.config.num_hidden_layers
        tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-3, rtol=1e-2)
        torch.testing.assert_close(loss, want_loss, **tol)
        for name in want:
            torch.testing.assert_close(got[name], want[name], **tol, msg=f"step {i}: {name}")
    assert not layer_graphs._failed
    assert len(captures) == 2 * model.config.num_hidden_layers  # forward and backward of each layer, once


def least_row_shape(shape, lengths, quantum, bound_quantum):
    """grown_row_shape's answer by search: the fewest tokens, then the fewest sequences, each at least the
    old shape's, that take the row with padding sequences of 1 to `bound` tokens (the bound: the old one or
    the row's longest rounded up), and whose padding sequences could take a third of the tokens."""
    own, real, old = sum(lengths), len(lengths), shape or layer_graphs.RowShape(0, 0, 0)
    bound = max(old.bound, -(-max(lengths) // bound_quantum) * bound_quantum)
    for tokens in range(quantum, 100 * quantum, quantum):
        for sequences in range(real + 1, tokens + real + 1):
            pad, pieces = tokens - own, sequences - real
            if (tokens >= old.tokens and sequences >= old.sequences and pieces <= pad <= pieces * bound
                    and tokens // 3 <= pieces * bound):
                return layer_graphs.RowShape(tokens, sequences, bound)


def test_grown_row_shape_is_the_least_that_takes_the_row():
    g = torch.Generator().manual_seed(0)
    for quantum, bound_quantum in [(64, 16), (256, 64), (16, 8)]:
        shape = None
        for _ in range(100):
            lengths = torch.randint(1, 200, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist()
            old = shape if torch.rand(1, generator=g) < 0.7 else None
            shape = layer_graphs.grown_row_shape(old, lengths, quantum, bound_quantum)
            assert shape == least_row_shape(old, lengths, quantum, bound_quantum), (old, lengths)
    # the seed notebook's rows: 6 copies of a prompt with 200-token completions, the shape grows with the longest
    shapes = []
    for prompt in (74, 66, 96, 89, 61, 100, 92, 141, 145):
        shapes.append(layer_graphs.grown_row_shape(shapes[-1] if shapes else None, [prompt + 200] * 6))
    assert [shapes.index(s) for s in shapes] == [0, 0, 0, 0, 0, 5, 5, 5, 8]  # new at 1,800 and 2,070 tokens
    assert shapes[-1] == layer_graphs.RowShape(tokens=2304, sequences=8, bound=384)


def test_rows_are_padded_to_the_grown_shape_only_where_graphs_may_replay(monkeypatch):
    layer_graphs.reset()
    monkeypatch.setattr(layer_graphs, "may_graph", lambda decoder: True)
    shape = layer_graphs.padded_row_shape(None, [300] * 6)
    assert shape == layer_graphs.RowShape(tokens=2048, sequences=8, bound=384)  # 2 x 384 >= 2048 / 3
    assert layer_graphs.padded_row_shape(None, [230] * 6) == shape  # shorter rows take the same shape
    assert layer_graphs.padded_row_shape(None, [2000]) is None  # one sequence: as it is
    assert layer_graphs.padded_row_shape(None, [100] * 6) is None  # 600 tokens: padded more than half: as it is
    assert layer_graphs.padded_row_shape(None, [350] * 6).tokens == 2304  # grows
    assert layer_graphs.padded_row_shape(None, [700] * 6) is None  # 4,200 tokens: more than MAX_TOKENS
    monkeypatch.setattr(layer_graphs, "GROW_ROWS", False)
    assert layer_graphs.padded_row_shape(None, [350] * 6) is None
    layer_graphs.reset()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_rows_of_different_lengths_padded_to_one_shape_share_the_graphs(monkeypatch):
    """The trainer's packed forward pads each row to the grown shape: rows of other lengths replay the graphs
    captured for the first one (at once), with the eager (unpadded) log-probs and LoRA gradients; a longer
    row grows the shape, whose graphs replace the old ones."""
    from ahazero.grpo.packing import varlen_context
    from test_packing import logps_and_lora_grads, rollout_batch
    model, captures = offloaded_cuda_lora_model("qwen2", torch.float32, monkeypatch)
    decoder = model.get_base_model().model
    assert layer_graphs.may_graph(decoder)
    layers = model.config.num_hidden_layers
    pools = []
    for i, (prompts, completions) in enumerate([([5, 9], [40, 33]), ([7, 3], [50, 21]), ([4, 4], [30, 44]),
                                                ([8, 1], [25, 47]), ([6, 2], [200, 150])]):  # 87 ... 358 tokens
        batch = rollout_batch(prompts, completions, seed=i).to("cuda")
        pools.append(layer_graphs._pool)
        with varlen_context(decoder):  # as the trainer: the backward's recompute on the packed attention too
            got = logps_and_lora_grads(model, batch, padding_free=True)
            monkeypatch.setattr(layer_graphs, "LAYER_GRAPHS", False)
            want = logps_and_lora_grads(model, batch, padding_free=True)
            monkeypatch.setattr(layer_graphs, "LAYER_GRAPHS", True)
        mask = batch.completion_mask > 0
        torch.testing.assert_close(got[0][mask], want[0][mask], atol=1e-5, rtol=1e-5)
        for name, g in got[2].items():
            torch.testing.assert_close(g, want[2][name], atol=1e-5, rtol=1e-4, msg=f"batch {i}: {name}")
        assert len(captures) == 2 * layers * (1 if i < 4 else 2), i  # at the first batch, then when it grew
        assert len(layer_graphs._warmed) == 2 * (1 if i < 4 else 2)  # one warm-up a pass and shape, not a layer
    assert pools[4] is not None and layer_graphs._pool != pools[4]  # the old shape's pool given back
    assert not layer_graphs._failed
    assert layer_graphs._row_shape.tokens == 512 and len(layer_graphs._statics) == 1  # the old shape's dropped


def test_one_warm_up_serves_only_layers_of_the_same_pass_shapes_and_parameters():
    """A capture skips its warm-up only where an earlier one ran the same kernels: the same pass and shape key
    and a layer with parameters of the same shapes and dtypes (another LoRA rank or dtype warms up again)."""
    def warm_key(layer, phase="forward", key=((1, 512, 8), None)):
        p = object.__new__(layer_graphs._Pass)
        p.key, p.layer = (phase, key), layer
        return layer_graphs._warm_key(p)

    first, same = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
    assert warm_key(first) == warm_key(same)
    assert warm_key(first) != warm_key(torch.nn.Linear(8, 4))  # other shapes
    assert warm_key(first) != warm_key(torch.nn.Linear(8, 8).to(torch.bfloat16))  # another dtype
    assert warm_key(first) != warm_key(torch.nn.Linear(8, 8).requires_grad_(False))  # nothing to train
    assert warm_key(first) != warm_key(first, phase="backward")
    assert warm_key(first) != warm_key(first, key=((1, 768, 8), None))


def test_a_grown_shape_gives_the_graphs_pool_back_once_no_graph_is_left(monkeypatch):
    """When rows outgrow the shape, the old shape's graphs go; where none is left, so does their pool (the
    next capture starts a new one) and the allocator's cache is emptied; a graph of another key keeps it."""
    layer_graphs.reset()
    monkeypatch.setattr(layer_graphs, "may_graph", lambda decoder: True)
    emptied = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(1))
    layer, other = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    first = layer_graphs.padded_row_shape(None, [300] * 6)
    grown_key = ((1, first.tokens, 8), None, None, (), (first.sequences, first.bound))  # as _shape_key's
    layer_graphs._per_layer[layer] = {("forward", grown_key): object(), ("backward", grown_key): object()}
    unpadded_key = ((1, 100, 8), None, None, (), None)  # a row of one sequence: not padded
    layer_graphs._per_layer[other] = {("forward", unpadded_key): None}  # met once: no graph
    monkeypatch.setattr(layer_graphs, "_pool", ("a pool", 1))
    layer_graphs.padded_row_shape(None, [350] * 6)  # grows: the old shape's graphs go, and the pool with them
    assert layer_graphs._per_layer[layer] == {} and layer_graphs._pool is None and emptied == [1]
    layer_graphs._per_layer[layer] = {("forward", unpadded_key): object()}
    monkeypatch.setattr(layer_graphs, "_pool", ("a pool", 2))
    layer_graphs.padded_row_shape(None, [500] * 6)  # grows again, but a graph is left: the pool stays
    assert layer_graphs._pool == ("a pool", 2) and emptied == [1]
    layer_graphs.reset()


def test_a_key_is_captured_at_its_second_meeting_unless_shapes_churn(monkeypatch):
    layer_graphs.reset()

    def meeting(key, graphs, grown=False):
        p = object.__new__(layer_graphs._Pass)
        p.graphs, p.key, p.shape_key, p.grown = graphs, ("forward", key), key, grown
        return p.first_time()

    graphs = {}
    assert meeting("a", graphs) is True and meeting("a", graphs) is False  # eager, then captured
    assert meeting("padded", graphs, grown=True) is False  # a padded row's shape: captured at once
    monkeypatch.setattr(layer_graphs, "_evictions", layer_graphs.MAX_EVICTIONS)  # shapes came and went
    assert meeting("b", graphs) is True and meeting("b", graphs) is True  # no new capture: eager
    layer_graphs._statics["c"] = object()  # a shape whose statics are kept may still get its graphs
    assert meeting("c", graphs) is True and meeting("c", graphs) is False
    layer_graphs._statics.clear()
    for i in range(10 * layer_graphs.MAX_SHAPES):  # keys met once are forgotten, not kept forever
        meeting(i, graphs)
    assert len(graphs) <= 8 * layer_graphs.MAX_SHAPES + 1
