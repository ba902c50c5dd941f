"""The tokenizer part of a GGUF file: token list, token types, merges, special ids, chat template.

Follows llama.cpp's convert_hf_to_gguf.py (`get_vocab_base`, `get_vocab_base_pre`, `_set_vocab_gpt2`);
special ids, `add_bos`/`add_eos` flags, merges and the chat template are read by gguf's own
`SpecialVocab` from the tokenizer saved to a temporary folder. Supported: byte-level BPE
(Qwen2/2.5/3, Llama 3), written as tokenizer model "gpt2" with merges. llama.cpp picks its pre-tokenizer
regex by the name in `tokenizer.ggml.pre`; like its converter we find that name by hashing the token ids
of a fixed test text (`CHECK_TEXT`), for the tokenizers listed in `PRE_TOKENIZERS`. Not yet supported:
SentencePiece-style tokenizers (Mistral, Llama 2), which llama.cpp reads with their sentencepiece scores.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path

import gguf

# llama.cpp's test text for telling BPE pre-tokenizers apart (convert_hf_to_gguf.py, `chktxt`).
CHECK_TEXT = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) '
              '✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ '
              '------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, '
              '\'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL')
# sha256 of str(token ids of CHECK_TEXT) -> llama.cpp pre-tokenizer name (hashes from llama.cpp's converter)
PRE_TOKENIZERS = {
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",      # Qwen1.5/2/2.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",      # Qwen3
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3/3.1/3.2
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",
}


@dataclass
class GGUFVocab:
    """Everything a GGUF file says about the tokenizer; built once, added to each file of an export."""
    model: str                      # "gpt2": byte-level BPE
    pre: str                        # llama.cpp pre-tokenizer name
    tokens: list
    types: list
    special: gguf.SpecialVocab      # special ids, add_bos/add_eos, merges, chat template

    def add_to(self, writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        self.special.add_to_gguf(writer, quiet=True)


def gguf_vocab(tokenizer, config, n_vocab: int) -> GGUFVocab:
    """The GGUF tokenizer data of `tokenizer`; `n_vocab` is the embedding's row count."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        tokenizer.save_pretrained(folder)
        config.to_json_file(folder / "config.json")   # SpecialVocab falls back to its bos/eos ids
        model = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]
        if model.get("type") != "BPE":
            raise NotImplementedError(f"GGUF export supports BPE tokenizers, not {model.get('type')!r}")
        if model.get("byte_fallback"):
            raise NotImplementedError(
                "GGUF export of SentencePiece-style tokenizers (byte-fallback BPE: Mistral, Llama 2) is not "
                "supported yet: llama.cpp needs their sentencepiece scores; byte-level BPE (Qwen, Llama 3) is")
        tokens, types = gpt2_tokens(tokenizer, n_vocab)
        special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=n_vocab)
        return GGUFVocab("gpt2", pre_tokenizer_name(tokenizer), tokens, types, special)


def pre_tokenizer_name(tokenizer) -> str:
    digest = sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()
    if digest not in PRE_TOKENIZERS:
        raise NotImplementedError(
            f"this tokenizer's pre-tokenizer (hash {digest[:12]}...) is not one llama.cpp is known to reproduce "
            f"here; supported: {sorted(set(PRE_TOKENIZERS.values()))}")
    return PRE_TOKENIZERS[digest]


def gpt2_tokens(tokenizer, n_vocab: int) -> tuple[list[str], list[int]]:
    """Tokens and their types by id, padded with unused `[PADi]` up to the embedding's size."""
    if len(tokenizer) > n_vocab:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the model's embedding only {n_vocab} rows")
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            text, kind = _added_token(tokenizer, added[i])
            tokens.append(text)
            types.append(kind)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _added_token(tokenizer, token) -> tuple[str, int]:
    """llama.cpp expects added tokens pre-normalised; special-looking ones are CONTROL."""
    text = token.content
    if not token.normalized:
        text = tokenizer.decode(tokenizer.encode(text, add_special_tokens=False))
    looks_special = text.startswith("<|") and text.endswith("|>")
    if token.special or looks_special:
        return text, gguf.TokenType.CONTROL
    return text.replace("\u2581", " "), gguf.TokenType.USER_DEFINED
