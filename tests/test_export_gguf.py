"""GGUF export, proven by llama.cpp itself (llama-cpp-python) and read back with gguf's GGUFReader.

Tolerances (random weights, initializer_range 0.02, 2 layers, hidden 256, real 151,936-token vocab),
error = RMS(llama.cpp logits - torch logits) / std(torch logits) over 48 positions:
  - f16 vs the trained model: max abs error <= 2e-3 * max |logit| (near-exact; measured ~7e-4 RMS).
  - q8_0 vs the trained model: error <= 0.04, top-1 agreement >= 85% (measured ~0.017, ~98-100%).
  - q4_k_m vs the trained model: error <= 0.25, top-1 >= 60% (measured ~0.14, ~73%). Random weights
    amplify weight-rounding error layer by layer and their top-1 margins are tiny, so this is loose; the
    tight check is the next one.
  - every file vs torch running the file's own dequantised weights: error <= 0.03, top-1 >= 90%
    (measured <= 0.013, ~100%): llama.cpp computes exactly what was written; the only loss is rounding.
"""
import contextlib
import copy
import json
import sys

import gguf
import numpy as np
import pytest
import torch

import tiny
from ahazero.export import export_checkpoint, save_lora
from ahazero.export.gguf_export import LLAMA_CPP_TYPES, save_gguf
from ahazero.export.gguf_vocab import pre_tokenizer_name
from ahazero.export.gguf_writer import storage_type
from test_export_common import lora_model, logits, prompt_ids

BIG = {"hidden_size": 256, "intermediate_size": 512, "head_dim": 64, "initializer_range": 0.02}  # K-quant blocks: 256
GGUF_ARCH = {"qwen2": gguf.MODEL_ARCH.QWEN2, "llama": gguf.MODEL_ARCH.LLAMA,
             "mistral": gguf.MODEL_ARCH.LLAMA, "qwen3": gguf.MODEL_ARCH.QWEN3}


def _fields(reader):
    return {name: field.contents() for name, field in reader.fields.items()}


def dequantized_state_dict(reader, config, arch, keys):
    """The GGUF's tensors (`reader`: a GGUFReader), dequantised, under transformers names and layout."""
    names = gguf.get_tensor_name_map(GGUF_ARCH[arch], config.num_hidden_layers)
    by_name = {t.name: t for t in reader.tensors}
    out = {}
    for key in keys:
        t = by_name.get(names.get_name(key, try_suffixes=(".weight", ".bias")))
        if t is None:
            continue
        shape = [int(d) for d in reversed(t.shape)]
        w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape).copy()).float()
        if GGUF_ARCH[arch] == gguf.MODEL_ARCH.LLAMA and ("q_proj" in key or "k_proj" in key):
            heads = config.num_attention_heads if "q_proj" in key else config.num_key_value_heads
            w = w.reshape(heads, shape[0] // heads // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)
        out[key] = w
    if "lm_head.weight" in keys:
        out.setdefault("lm_head.weight", out["model.embed_tokens.weight"])
    return out


# ---------------------------------------------------------------- fast checks: the file itself


def test_unknown_method_is_refused_with_the_valid_list(tmp_path):
    with pytest.raises(ValueError, match=r"unknown quantization_method 'q9_9'.*q8_0.*q4_k_m"):
        save_gguf(tiny.tiny_model("qwen2"), tmp_path / "g", tiny.tokenizer(), ["f16", "q9_9"])
    assert not (tmp_path / "g").exists()


def test_k_quant_without_llama_cpp_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)          # import llama_cpp -> ImportError
    with pytest.raises(ImportError, match=r"ahazero\[llamacpp\]"):
        save_gguf(tiny.tiny_model("qwen2"), tmp_path / "g", tiny.tokenizer(), "q4_k_m")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module", params=["qwen2", "llama", "qwen3"])
def f32_export(request, tmp_path_factory):
    """A tiny model with a random LoRA, its f32 GGUF, and that file read back by GGUFReader (slow: ~10 s)."""
    model = lora_model(request.param)
    (file,) = save_gguf(model, tmp_path_factory.mktemp("f32") / "g", tiny.tokenizer(), "f32")
    return request.param, model, file, gguf.GGUFReader(file)


@pytest.mark.slow
def test_gguf_metadata_and_tokenizer(f32_export):
    arch, model, file, reader = f32_export
    tok, cfg = tiny.tokenizer(), model.get_base_model().config
    assert file.name == "model.F32.gguf"
    kv = _fields(reader)
    name = "llama" if arch == "llama" else arch
    assert kv["general.architecture"] == name
    assert kv[f"{name}.block_count"] == cfg.num_hidden_layers
    assert kv[f"{name}.embedding_length"] == cfg.hidden_size
    assert kv[f"{name}.attention.head_count_kv"] == cfg.num_key_value_heads
    assert kv[f"{name}.rope.freq_base"] == pytest.approx(cfg.rope_parameters["rope_theta"])
    assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == "qwen2"
    tokens, types = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.token_type"]
    assert len(tokens) == cfg.vocab_size == 151936
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    assert tokens[im_start] == "<|im_start|>" and types[im_start] == gguf.TokenType.CONTROL
    assert tokens[1000] == tok.convert_ids_to_tokens(1000) and types[1000] == gguf.TokenType.NORMAL
    assert types[-1] == gguf.TokenType.UNUSED                           # embedding rows past the tokenizer
    assert kv["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    assert kv["tokenizer.chat_template"] == tok.chat_template
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    assert len(kv["tokenizer.ggml.merges"]) == len(merges)
    tensors = {t.name: t.tensor_type for t in reader.tensors}
    assert "output.weight" not in tensors                               # tied: llama.cpp reuses token_embd
    assert tensors["blk.1.ffn_norm.weight"] == gguf.GGMLQuantizationType.F32


@pytest.mark.slow
def test_gguf_holds_the_merged_weights(f32_export):
    """Tensor by tensor: the file == PEFT's merge_and_unload (llama: after llama.cpp's q/k permutation)."""
    arch, model, _, reader = f32_export
    want = copy.deepcopy(model).merge_and_unload().state_dict()
    back = dequantized_state_dict(reader, model.get_base_model().config, arch, list(want))
    assert set(back) == set(want)
    for key in want:
        torch.testing.assert_close(back[key], want[key], rtol=0, atol=1e-6, msg=key)
    if arch == "qwen3":
        assert {"blk.0.attn_q_norm.weight", "blk.0.attn_k_norm.weight"} <= {t.name for t in reader.tensors}


@pytest.mark.slow
def test_llama3_rope_scaling_is_written_as_rope_freqs(f32_export):
    arch, model, _, reader = f32_export
    if arch != "llama":
        assert "rope_freqs.weight" not in {t.name for t in reader.tensors}
        return
    freqs = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
    theta, dim = _fields(reader)["llama.rope.freq_base"], model.get_base_model().config.head_dim
    default = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    # llama.cpp divides each frequency by its factor: that must give transformers' llama3 inv_freq
    scaled = default / torch.from_numpy(np.array(freqs.data, dtype=np.float64))
    inv_freq = model.get_base_model().model.rotary_emb.inv_freq
    torch.testing.assert_close(scaled.float(), inv_freq.float(), rtol=1e-5, atol=0)


def test_unknown_pre_tokenizer_is_refused():
    """A BPE tokenizer whose split regex llama.cpp has no name for must not be exported silently."""
    from tokenizers import pre_tokenizers
    tok = copy.deepcopy(tiny.tokenizer())
    assert pre_tokenizer_name(tok) == "qwen2"
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)   # GPT-2's regex
    with pytest.raises(NotImplementedError, match="pre-tokenizer"):
        pre_tokenizer_name(tok)


def test_storage_types_follow_llama_cpp():
    Q = gguf.GGMLQuantizationType
    assert storage_type("blk.0.attn_q.weight", (64, 64), Q.Q8_0) == Q.Q8_0
    assert storage_type("blk.0.attn_q.weight", (64, 48), Q.Q8_0) == Q.F16      # 48 is no multiple of 32
    assert storage_type("blk.0.attn_q.bias", (64,), Q.F16) == Q.F32
    assert storage_type("blk.0.attn_q_norm.weight", (16,), Q.BF16) == Q.F32
    assert storage_type("token_embd.weight", (151936, 64), Q.BF16) == Q.BF16


# ---------------------------------------------------------------- llama.cpp, the real consumer


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def exported(request, tmp_path_factory):
    """A trained-looking model of each family (random LoRA) and its f16 / q8_0 / q4_k_m GGUF files."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed: pip install 'ahazero[llamacpp]'")
    arch = request.param
    model = lora_model(arch, model_kwargs=BIG)
    files = save_gguf(model, tmp_path_factory.mktemp(arch) / "gguf", tiny.tokenizer(), ["f16", "q8_0", "q4_k_m"])
    return arch, model, dict(zip(["f16", "q8_0", "q4_k_m"], files))


def llama_cpp_logits(file, ids):
    import llama_cpp
    with plain_cpu_buffers(llama_cpp.llama_cpp):
        llm = llama_cpp.Llama(str(file), n_ctx=128, logits_all=True, vocab_only=False, verbose=False, n_threads=2)
    llm.eval(ids[0].tolist())
    return np.array(llm.scores[: ids.shape[1]], dtype=np.float32), llm


@contextlib.contextmanager
def plain_cpu_buffers(binding):
    """llama.cpp's model parameters (from `binding`, the module llama_cpp.Llama reads them from) without the
    CPU's extra buffer types (`use_extra_bufts`, where the binding has it). On CPUs with AMX, llama-cpp-python
    0.3.36 crashed (SIGSEGV in ggml_backend_amx_mul_mat) running Q4_K layers, of these small models and of a
    Qwen2.5-1.5B-wide one alike (llama.cpp issue #20824); the plain CPU path computes the same from the same file."""
    default = binding.llama_model_default_params

    def without_extra_buffers():
        params = default()
        if hasattr(params, "use_extra_bufts"):
            params.use_extra_bufts = False
        return params

    binding.llama_model_default_params = without_extra_buffers
    try:
        yield
    finally:
        binding.llama_model_default_params = default


def _rel_rms(got, want):
    return float(np.sqrt(((got - want) ** 2).mean()) / want.std())


def _top1(got, want):
    return float((got.argmax(-1) == want.argmax(-1)).mean())


LIMITS = {"q8_0": (0.04, 0.85), "q4_k_m": (0.25, 0.60)}


@pytest.mark.slow
def test_llama_cpp_logits_match_the_trained_model(exported):
    arch, model, files = exported
    ids = prompt_ids(48)
    want = logits(model, ids)[0].numpy()
    with model.disable_adapter():
        base = logits(model, ids)[0].numpy()
    assert np.abs(want - base).max() > 50 * 2e-3 * np.abs(want).max()          # the LoRA matters
    got, _ = llama_cpp_logits(files["f16"], ids)
    assert np.abs(got - want).max() <= 2e-3 * np.abs(want).max()
    for method, (max_err, min_top1) in LIMITS.items():
        got, _ = llama_cpp_logits(files[method], ids)
        assert _rel_rms(got, want) <= max_err, method
        assert _top1(got, want) >= min_top1, method


@pytest.mark.slow
def test_llama_cpp_computes_what_the_file_holds(exported):
    arch, model, files = exported
    ids = prompt_ids(48)
    config = model.get_base_model().config
    for method in ("q8_0", "q4_k_m"):                  # f16 is already near-exact against the model
        file = files[method]
        holder = copy.deepcopy(model).merge_and_unload()
        keys = list(holder.state_dict())
        holder.load_state_dict(dequantized_state_dict(gguf.GGUFReader(file), config, arch, keys))
        want = logits(holder, ids)[0].numpy()
        got, _ = llama_cpp_logits(file, ids)
        assert _rel_rms(got, want) <= 0.03, method
        assert _top1(got, want) >= 0.9, method


@pytest.mark.slow
def test_llama_cpp_tokenizes_chat_formatted_gsm8k_like_transformers(exported):
    _, _, files = exported
    tok = tiny.tokenizer()
    _, llm = llama_cpp_logits(files["q8_0"], prompt_ids(2))
    rows = [json.loads(line) for line in (tiny.GSM8K_DIR / "test.jsonl").read_text().splitlines()[:60]]
    for row in rows:
        messages = [{"role": "system", "content": "Reason step by step, then give the answer."},
                    {"role": "user", "content": row["question"]}, {"role": "assistant", "content": row["answer"]}]
        text = tok.apply_chat_template(messages, tokenize=False)
        ours = tok(text, add_special_tokens=True)["input_ids"]
        theirs = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        assert theirs == ours
    assert llm.token_eos() == tok.eos_token_id


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["mistral", "qwen3"])
def test_llama_cpp_runs_the_other_families(tmp_path, arch):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed: pip install 'ahazero[llamacpp]'")
    model = lora_model(arch, model_kwargs={"initializer_range": 0.02})
    (f16,) = save_gguf(model, tmp_path / "g", tiny.tokenizer(), "f16")
    ids = prompt_ids(32)
    want = logits(model, ids)[0].numpy()
    got, _ = llama_cpp_logits(f16, ids)
    assert np.abs(got - want).max() <= 2e-3 * np.abs(want).max()


@pytest.mark.slow
def test_gguf_straight_from_checkpoint_files_runs_in_llama_cpp(tmp_path):
    """`ahazero export --model DIR --adapter DIR --to gguf`: no model in memory, same logits in llama.cpp."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed: pip install 'ahazero[llamacpp]'")
    from peft import PeftModel
    base_dir = tiny.save_tiny_model(tmp_path / "base", "llama")
    save_lora(lora_model("llama"), tmp_path / "adapter")
    files = export_checkpoint(base_dir, tmp_path / "gguf", to="gguf", adapter=tmp_path / "adapter",
                              quantization_method=["f16", "q8_0"])
    assert [f.name for f in files] == ["base.F16.gguf", "base.Q8_0.gguf"]
    model = PeftModel.from_pretrained(tiny.tiny_model("llama"), tmp_path / "adapter").eval()
    ids = prompt_ids(32)
    want = logits(model, ids)[0].numpy()
    got, _ = llama_cpp_logits(files[0], ids)
    assert np.abs(got - want).max() <= 2e-3 * np.abs(want).max()


def test_llama_cpp_method_list_matches_llama_cpp_python():
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed")
    for method in LLAMA_CPP_TYPES:
        assert hasattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{method.upper()}"), method


@pytest.mark.slow
def test_gguf_of_a_4bit_model_holds_its_dequantised_weights(tmp_path):
    """A QLoRA model (NF4 base + LoRA) exports its dequantised, merged weights: llama.cpp's f16 logits match."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed: pip install 'ahazero[llamacpp]'")
    from peft import LoraConfig, get_peft_model
    from ahazero.models.linear4bit import quantize_model
    base = tiny.tiny_model("qwen2", initializer_range=0.02)
    quantize_model(base)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                                            init_lora_weights=False)).eval()
    (f16,) = save_gguf(model, tmp_path / "g", tiny.tokenizer(), "f16")
    ids = prompt_ids(32)
    want = logits(model, ids)[0].numpy()
    got, _ = llama_cpp_logits(f16, ids)
    assert np.abs(got - want).max() <= 2e-3 * np.abs(want).max()
