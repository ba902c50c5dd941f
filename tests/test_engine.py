"""The rollout engine against transformers on tiny random-weight models of every supported architecture.

References: transformers' greedy `generate` (one prompt at a time, no padding) for tokens, a full
forward's float32 log-softmax for log-probs, PEFT's merge_and_unload for unmerged LoRA.
"""
import warnings

import pytest
import torch

import tiny
from ahazero.engine.engine import LLMEngine, create_generator
from ahazero.engine.hf_generate import HFGenerator
from ahazero.engine.types import SamplingParams

PROMPTS = ["Hi", "What is the capital of France? Think step by step.", "1 + 1 =",
           "Write a haiku about the sea, then explain it in one sentence."]


@pytest.fixture(scope="module")
def tok():
    return tiny.tokenizer()


def prompt_ids(tok, texts=PROMPTS):
    return [tok.encode(t) for t in texts]


def model(arch="qwen2", **overrides):
    return tiny.tiny_model(arch, initializer_range=0.3, **overrides)


def engine(m, tok, max_seq_length=96, **options) -> LLMEngine:
    gen = create_generator(m, tok, max_seq_length=max_seq_length, **options)
    assert isinstance(gen, LLMEngine)
    return gen


def hf_greedy(m, ids, max_new_tokens, ignore_eos=True):
    """transformers' greedy generate of one prompt, without padding."""
    kwargs = dict(min_new_tokens=max_new_tokens) if ignore_eos else {}
    out = m.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                     do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tiny.QWEN_PAD, **kwargs)
    return out[0, len(ids):].tolist()


def full_forward_logprobs(m, prompt, completion, temperature=1.0):
    """log_softmax(logits / T) of a full forward at each completion position: [len(completion)]."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = m(ids).logits[0, len(prompt) - 1:-1].float() / temperature  # [C, V]
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_greedy_and_logprobs_match_transformers(arch, tok):
    m = model(arch)
    prompts = prompt_ids(tok)
    outs = engine(m, tok).generate(prompts, SamplingParams(temperature=0, max_tokens=12, n=2, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        ref = hf_greedy(m, prompt, 12)
        assert len(set(ref)) > 6  # the tiny model's output is varied, so the comparison means something
        assert [c.token_ids for c in out.outputs] == [ref, ref]
        assert all(c.finish_reason == "length" for c in out.outputs)
        expected = full_forward_logprobs(m, prompt, ref)
        torch.testing.assert_close(torch.tensor(out.outputs[0].logprobs), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_sampled_logprobs_match_full_forward(arch, tok):
    m = model(arch)
    prompts = prompt_ids(tok)[:3]
    params = SamplingParams(temperature=0.7, top_p=0.9, max_tokens=10, n=3, seed=1, ignore_eos=True)
    for prompt, out in zip(prompts, engine(m, tok).generate(prompts, params)):
        for c in out.outputs:
            expected = full_forward_logprobs(m, prompt, c.token_ids, temperature=0.7)
            torch.testing.assert_close(torch.tensor(c.logprobs), expected, atol=1e-4, rtol=1e-4)


def test_padded_bucket_path_matches_eager(tok):
    """The CUDA-graph path (static buffers, batch padded to a bucket, KV-length buckets) run eagerly."""
    m = model("qwen2")
    prompts = prompt_ids(tok)
    params = SamplingParams(temperature=0.9, max_tokens=14, n=3, seed=7, ignore_eos=True)
    eager = engine(m, tok, cuda_graphs=False).generate(prompts, params)
    padded = engine(m, tok, cuda_graphs=True, graph_batch_sizes=(1, 5, 7), kv_len_bucket=8).generate(prompts, params)
    for a, b in zip(eager, padded):
        assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
        torch.testing.assert_close(torch.tensor([c.logprobs for c in a.outputs]),
                                   torch.tensor([c.logprobs for c in b.outputs]))


@pytest.mark.parametrize("same_address", [True, False])
def test_released_kv_cache_keeps_its_graphs_only_at_the_same_address(tok, monkeypatch, same_address):
    """release_kv frees the cache after each call and the next call allocates it again. The decode graphs
    (which hold the cache's address) are kept when the new cache lands where the old one was, as the
    caching allocator places it when nothing kept part of the freed block, and rebuilt when it does not;
    after MAX_KV_MOVES moves the cache is kept. The outputs equal an engine that keeps its cache."""
    from ahazero.engine import runner as runner_module
    kept = []  # same_address: the one block every cache gets; else every cache, kept alive so none repeats

    class Placed(runner_module.KVCache):
        def __init__(self, *args):
            super().__init__(*args)
            if same_address and kept:
                self.data = kept[0].zero_()
            kept.append(self.data)

    m = model("qwen2")
    prompts = prompt_ids(tok)[:3]
    params = SamplingParams(temperature=0.9, max_tokens=10, n=2, seed=3, ignore_eos=True)
    options = dict(cuda_graphs=True, graph_batch_sizes=(1, 2, 4, 6), kv_len_bucket=8)
    keeping = engine(m, tok, release_kv=False, **options)
    monkeypatch.setattr(runner_module, "KVCache", Placed)
    releasing = engine(m, tok, release_kv=True, **options)
    graphs = []
    for call in range(runner_module.MAX_KV_MOVES + 2):
        expected, got = keeping.generate(prompts, params), releasing.generate(prompts, params)
        for a, b in zip(expected, got):
            assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
            assert [c.logprobs for c in a.outputs] == [c.logprobs for c in b.outputs]
        assert releasing.runner.allocated_slots == 6
        graphs.append(releasing.runner.graphs)
        moves = 0 if same_address else min(call, runner_module.MAX_KV_MOVES)
        assert releasing.runner.kv_moves == moves
        assert (releasing.runner.kv is None) == (moves < runner_module.MAX_KV_MOVES)  # released, or kept for good
    if same_address:
        assert all(g is graphs[0] for g in graphs)
    else:
        assert len({id(g) for g in graphs[:runner_module.MAX_KV_MOVES + 1]}) == runner_module.MAX_KV_MOVES + 1
        assert graphs[-1] is graphs[-2]  # kept: no more moves


def test_decode_step_traces_with_dynamo(tok):
    """torch.compile(dynamic=True) of the decoder layer gives the eager tokens, and its graphs are as
    large for 4 layers as for 2: one trace serves every layer (compile time does not grow with depth)."""
    prompts = prompt_ids(tok)[:2]
    params = SamplingParams(temperature=0, max_tokens=6, n=2, ignore_eos=True)
    largest = []
    for layers in (2, 4):
        sizes = []

        def recording_backend(gm, example_inputs):  # tracing only, as backend "eager", noting graph sizes
            sizes.append(len(gm.graph.nodes))
            return gm.forward

        m = model("qwen3", num_hidden_layers=layers)
        ref = engine(m, tok, cuda_graphs=False).generate(prompts, params)
        torch._dynamo.reset()
        with torch._dynamo.config.patch(error_on_recompile=False):
            got = engine(m, tok, cuda_graphs=True, compile=True, compile_backend=recording_backend).generate(prompts, params)
        assert [[c.token_ids for c in o.outputs] for o in got] == [[c.token_ids for c in o.outputs] for o in ref]
        largest.append(max(sizes))
    assert largest[0] == largest[1] > 20


def test_seeded_sampling_is_reproducible(tok):
    m = model("llama")
    gen = engine(m, tok)
    prompts = prompt_ids(tok)[:2]
    params = SamplingParams(temperature=1.0, max_tokens=10, n=4, seed=123, ignore_eos=True)
    first = [[c.token_ids for c in o.outputs] for o in gen.generate(prompts, params)]
    again = [[c.token_ids for c in o.outputs] for o in gen.generate(prompts, params)]
    other = [[c.token_ids for c in o.outputs] for o in gen.generate(prompts, SamplingParams(
        temperature=1.0, max_tokens=10, n=4, seed=124, ignore_eos=True))]
    assert first == again
    assert first != other
    assert len({tuple(t) for t in first[0]}) == 4  # the n completions of a prompt differ


def _eos_model(tokens_to_stop_on):
    m = model("qwen2")
    m.generation_config.eos_token_id = [tiny.QWEN_EOS, *tokens_to_stop_on]
    return m


def test_stop_tokens_eos_and_max_tokens(tok):
    m = model("qwen2")
    prompts = prompt_ids(tok)[:3]
    free = engine(m, tok).generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    full = [o.outputs[0].token_ids for o in free]
    # stop_token_ids: cut after the first occurrence of the stop token, which is kept
    stop_id = full[1][4]
    outs = engine(m, tok).generate(prompts, SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop_id]))
    for tokens, out in zip(full, outs):
        c = out.outputs[0]
        cut = tokens.index(stop_id) + 1 if stop_id in tokens else len(tokens)
        assert c.token_ids == tokens[:cut]
        assert c.finish_reason == ("stop" if stop_id in tokens else "length")
        assert len(c.logprobs) == len(c.token_ids)
    # EOS (from the model's generation config) stops unless ignore_eos; max_tokens bounds the length
    eos_id = full[0][5]
    m_eos = _eos_model([eos_id])
    stopped = engine(m_eos, tok).generate(prompts[:1], SamplingParams(temperature=0, max_tokens=12))[0].outputs[0]
    assert stopped.token_ids == full[0][:full[0].index(eos_id) + 1] and stopped.finish_reason == "stop"
    ignored = engine(m_eos, tok).generate(prompts[:1], SamplingParams(temperature=0, max_tokens=7,
                                                                      ignore_eos=True))[0].outputs[0]
    assert ignored.token_ids == full[0][:7] and ignored.finish_reason == "length"


def test_stop_strings_cut_text_and_stop_generation(tok):
    m = model("llama")
    prompts = prompt_ids(tok)[:2]
    free = engine(m, tok).generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    tokens = free[0].outputs[0].token_ids
    text = free[0].outputs[0].text
    prefix_text = tok.decode(tokens[:6], skip_special_tokens=True)
    stop = tok.decode(tokens[6:8], skip_special_tokens=True)[:3]
    assert stop and stop in text
    out = engine(m, tok).generate(prompts, SamplingParams(temperature=0, max_tokens=16, stop=stop,
                                                          ignore_eos=True))
    c = out[0].outputs[0]
    assert c.finish_reason == "stop" and c.text == text[:text.find(stop)]
    assert len(c.token_ids) < 16 and c.token_ids == tokens[:len(c.token_ids)]
    assert stop in tok.decode(c.token_ids) and stop not in tok.decode(c.token_ids[:-1])
    assert len(prefix_text) <= len(text)


def test_max_seq_length_bounds_prompt_plus_completion(tok):
    m = model("qwen2")
    prompts = prompt_ids(tok)
    out = engine(m, tok, max_seq_length=20).generate(prompts[1:2], SamplingParams(temperature=0, max_tokens=50,
                                                                                 ignore_eos=True))
    c = out[0].outputs[0]
    assert len(prompts[1]) + len(c.token_ids) == 20 and c.finish_reason == "length"
    assert c.token_ids == hf_greedy(m, prompts[1], len(c.token_ids))
    with pytest.raises(ValueError, match="max_seq_length"):
        engine(m, tok, max_seq_length=8).generate(prompts[1:2], SamplingParams(max_tokens=2))


def test_more_sequences_than_slots(tok):
    """Groups wait for free slots; sequences finish at different times and survivors move down."""
    m = model("qwen2")
    prompts = prompt_ids(tok)
    free = engine(m, tok).generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    stops = [o.outputs[0].token_ids[k] for o, k in zip(free, (2, 9, 5, 11))]
    m_eos = _eos_model(stops)
    params = SamplingParams(temperature=0, max_tokens=12, n=2)
    wide = engine(m_eos, tok).generate(prompts, params)
    narrow_engine = engine(m_eos, tok, max_batch_size=3, cuda_graphs=True, graph_batch_sizes=(1, 2))
    assert narrow_engine.runner.num_slots == 3
    narrow = narrow_engine.generate(prompts, params)
    lengths = set()
    for a, b, ref in zip(wide, narrow, free):
        assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
        ids = ref.outputs[0].token_ids
        cut = min([ids.index(s) + 1 for s in stops if s in ids] + [12])
        assert a.outputs[0].token_ids == ids[:cut]
        lengths.add(cut)
    assert len(lengths) > 2
    with pytest.raises(ValueError, match="slots"):
        narrow_engine.generate(prompts, SamplingParams(n=4))
    again = narrow_engine.generate(prompts, params)  # the failed call left nothing behind
    assert [[c.token_ids for c in o.outputs] for o in again] == [[c.token_ids for c in o.outputs] for o in narrow]


@pytest.mark.parametrize("ahead", [1, 2, 3])
def test_decode_ahead_keeps_every_output(tok, ahead):
    """Steps queued ahead of the bookkeeping change no token: sequences stop by EOS at different steps (the
    steps queued after a stop are discarded), reach max_seq_length while others run on (their queued positions
    stay inside their own slot), and groups wait for slots. No step is queued past the last length limit."""
    m = model("qwen2")
    prompts = prompt_ids(tok)
    free = engine(m, tok).generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    stops = [o.outputs[0].token_ids[k] for o, k in zip(free, (2, 9, 5, 11))]
    params = SamplingParams(temperature=0, max_tokens=12, n=2)
    want = engine(_eos_model(stops), tok, decode_ahead=1).generate(prompts, params)
    narrow = engine(_eos_model(stops), tok, decode_ahead=ahead, max_batch_size=3)
    got = narrow.generate(prompts, params)
    assert [[c.token_ids for c in o.outputs] for o in got] == [[c.token_ids for c in o.outputs] for o in want]
    assert len({len(o.outputs[0].token_ids) for o in got}) > 2
    # max_seq_length 20: the prompts of 12 and 15 tokens end there while the short ones run on to max_tokens
    short = engine(m, tok, max_seq_length=20, decode_ahead=ahead)
    steps = []
    decode = short.runner.decode
    short.runner.decode = lambda *args: steps.append(1) or decode(*args)
    outs = short.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        c = out.outputs[0]
        assert len(c.token_ids) == min(12, 20 - len(prompt)) and c.finish_reason == "length"
        assert c.token_ids == hf_greedy(m, prompt, len(c.token_ids))
    assert len(steps) == 12 - 1  # the prefill samples the first token; no step runs past the last limit
    with pytest.raises(ValueError, match="decode_ahead"):
        engine(m, tok, decode_ahead=0)


def test_prefill_split_by_token_budget(tok):
    m = model("llama")
    prompts = prompt_ids(tok)
    params = SamplingParams(temperature=0, max_tokens=8, n=2, ignore_eos=True)
    ref = engine(m, tok, max_seq_length=40).generate(prompts, params)
    small = engine(m, tok, max_seq_length=40, max_prefill_tokens=1)  # clamped up to max_seq_length
    assert small.config.max_prefill_tokens == 40
    calls = []
    prefill = small.runner.prefill
    small.runner.prefill = lambda w, seqs: calls.append(len(seqs)) or prefill(w, seqs)
    got = small.generate(prompts, params)
    assert len(calls) > 1
    assert [[c.token_ids for c in o.outputs] for o in got] == [[c.token_ids for c in o.outputs] for o in ref]


def test_unsupported_architecture_falls_back_with_one_warning(tok):
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.for_model("gpt2", n_layer=1, n_embd=16, n_head=2, vocab_size=151936,
                               eos_token_id=tiny.QWEN_EOS)
    gpt2 = AutoModelForCausalLM.from_config(cfg).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gen = create_generator(gpt2, tok, max_seq_length=64)
    assert isinstance(gen, HFGenerator)
    assert len(caught) == 1 and "GPT2LMHeadModel" in str(caught[0].message)
    with pytest.warns(UserWarning, match="sliding-window"):
        gen = create_generator(model("mistral", sliding_window=16), tok, max_seq_length=64)
    assert isinstance(gen, HFGenerator)
