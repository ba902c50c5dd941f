"""Unmerged LoRA in the engine: equal to PEFT's merged weights, live (no reload), off for adapter=None."""
import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

import tiny
from ahazero.engine.engine import LLMEngine, create_generator
from ahazero.engine.types import SamplingParams
from test_engine import hf_greedy, prompt_ids

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GREEDY = SamplingParams(temperature=0, max_tokens=10, n=2, ignore_eos=True)


@pytest.fixture(scope="module")
def tok():
    return tiny.tokenizer()


def lora_config(r=4, seed=0):
    torch.manual_seed(seed)
    # init_lora_weights=False: B is random too, so the adapter changes the output from the start
    return LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, lora_dropout=0.0, init_lora_weights=False)


def peft_model(arch="qwen2", seed=0):
    base = tiny.tiny_model(arch, initializer_range=0.3)
    return get_peft_model(base, lora_config(seed=seed)).eval()


def merged_greedy(m, prompts, max_tokens=10, adapter="default"):
    """The reference: PEFT's merge_and_unload on a copy, then transformers' greedy generate."""
    other = copy.deepcopy(m)
    other.set_adapter(adapter)
    merged = other.merge_and_unload(adapter_names=[adapter]).eval()
    return [hf_greedy(merged, p, max_tokens) for p in prompts]


def tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


def engine(m, tok) -> LLMEngine:
    gen = create_generator(m, tok, max_seq_length=64)
    assert isinstance(gen, LLMEngine)
    return gen


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_unmerged_lora_equals_merged_weights(arch, tok):
    m = peft_model(arch)
    prompts = prompt_ids(tok)[:3]
    outs = engine(m, tok).generate(prompts, GREEDY)
    assert tokens(outs) == merged_greedy(m, prompts)
    assert all(o.outputs[0].token_ids == o.outputs[1].token_ids for o in outs)


def test_in_place_update_is_seen_without_reload(tok):
    m = peft_model("qwen2")
    gen = engine(m, tok)
    prompts = prompt_ids(tok)[:3]
    before = tokens(gen.generate(prompts, GREEDY))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.mul_(3.0)  # in place, as an optimizer step writes
    after = tokens(gen.generate(prompts, GREEDY))
    assert after != before
    assert after == merged_greedy(m, prompts)


def test_optimizer_step_is_seen(tok):
    m = peft_model("llama")
    gen = engine(m, tok)
    prompts = prompt_ids(tok)[:2]
    before = tokens(gen.generate(prompts, GREEDY))
    trainable = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=0.05)
    m.train()
    loss = m(torch.tensor([prompts[1]]), labels=torch.tensor([prompts[1]])).loss
    loss.backward()
    opt.step()
    m.eval()
    after = tokens(gen.generate(prompts, GREEDY))
    assert after != before
    assert after == merged_greedy(m, prompts)


def test_adapter_none_is_the_base_model(tok):
    m = peft_model("qwen2")
    prompts = prompt_ids(tok)[:3]
    gen = engine(m, tok)
    with m.disable_adapter():
        base = [hf_greedy(m, p, 10) for p in prompts]
    assert tokens(gen.generate(prompts, GREEDY, adapter=None)) == base
    assert tokens(gen.generate(prompts, GREEDY)) != base


def test_second_adapter_by_name(tok):
    m = peft_model("qwen2")
    m.add_adapter("other", lora_config(r=8, seed=1))
    prompts = prompt_ids(tok)[:2]
    gen = engine(m, tok)
    default = tokens(gen.generate(prompts, GREEDY))
    other = tokens(gen.generate(prompts, GREEDY, adapter="other"))
    assert other != default
    assert other == merged_greedy(m, prompts, adapter="other")
    assert m.active_adapter == "default"
    with pytest.raises(ValueError, match="unknown adapter"):
        gen.generate(prompts, GREEDY, adapter="missing")


def test_engine_made_before_lora_is_attached(tok):
    """from_pretrained(fast_inference=True) builds the engine, then get_peft_model wraps the model."""
    base = tiny.tiny_model("qwen2", initializer_range=0.3)
    gen = engine(base, tok)
    prompts = prompt_ids(tok)[:2]
    plain = tokens(gen.generate(prompts, GREEDY))
    m = get_peft_model(base, lora_config()).eval()
    with_lora = tokens(gen.generate(prompts, GREEDY))
    assert with_lora != plain
    assert with_lora == merged_greedy(m, prompts)
    assert tokens(gen.generate(prompts, GREEDY, adapter=None)) == plain


def test_lora_logprobs_match_peft_forward(tok):
    m = peft_model("llama")
    prompts = prompt_ids(tok)[:2]
    params = SamplingParams(temperature=0.8, max_tokens=8, seed=3, ignore_eos=True)
    for prompt, out in zip(prompts, engine(m, tok).generate(prompts, params)):
        c = out.outputs[0]
        with torch.no_grad():
            logits = m(torch.tensor([prompt + c.token_ids])).logits[0, len(prompt) - 1:-1].float() / 0.8
        expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(c.token_ids)[:, None]).squeeze(-1)
        torch.testing.assert_close(torch.tensor(c.logprobs), expected, atol=1e-4, rtol=1e-4)


def test_unsupported_lora_variant_falls_back_to_transformers(tok):
    base = tiny.tiny_model("qwen2", initializer_range=0.3)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True, init_lora_weights=False)
    m = get_peft_model(base, cfg).eval()
    gen = engine(m, tok)
    prompts = prompt_ids(tok)[:2]
    with pytest.warns(UserWarning, match="DoRA"):
        outs = gen.generate(prompts, GREEDY)
    assert tokens(outs) == merged_greedy(m, prompts)


@pytest.mark.slow
def test_inductor_compiled_decode_matches_eager(tok):
    """torch.compile (inductor; C++ on the CPU, Triton on CUDA) of the decode step, LoRA on: same tokens."""
    m = peft_model("qwen3")
    prompts = prompt_ids(tok)[:3]
    params = SamplingParams(temperature=0.9, max_tokens=8, n=2, seed=0, ignore_eos=True)
    ref = create_generator(m, tok, max_seq_length=64, cuda_graphs=False).generate(prompts, params)
    torch._dynamo.reset()
    gen = create_generator(m, tok, max_seq_length=64, cuda_graphs=True, compile=True,
                           graph_batch_sizes=(2, 4, 8), kv_len_bucket=16)
    got = gen.generate(prompts, params)
    for a, b in zip(ref, got):
        assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
        torch.testing.assert_close(torch.tensor([c.logprobs for c in a.outputs]),
                                   torch.tensor([c.logprobs for c in b.outputs]), atol=1e-4, rtol=1e-4)
