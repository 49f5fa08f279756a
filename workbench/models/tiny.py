"""Tiny random models and a byte-level tokenizer, built in memory for tests (no download)."""

from __future__ import annotations

import torch

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>")
# ChatML, like SmolLM2, so chat code paths are exercised by the tiny models too.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges: 256 byte tokens + 4 specials (vocab 260)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet, key=_byte_of))}
    for tok in SPECIAL_TOKENS:
        vocab[tok] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<pad>",
        additional_special_tokens=["<|endoftext|>"],
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def _byte_of(ch: str) -> int:
    # GPT-2 byte-to-unicode map: printable latin-1 bytes map to themselves, the rest to 256+n.
    return _UNICODE_TO_BYTE[ch]


def _build_unicode_to_byte() -> dict[str, int]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


_UNICODE_TO_BYTE = _build_unicode_to_byte()


def _llama_config(tok):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rope_theta=10000.0, initializer_range=0.1, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )


def _gpt2_config(tok):
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, n_positions=512, initializer_range=0.1,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )


TINY_CONFIGS = {"llama": _llama_config, "gpt2": _gpt2_config}


def build_tiny(arch: str, seed: int = 0):
    """Build (model, tokenizer) for a tiny random model; weights depend only on ``arch`` and ``seed``.

    The caller's global RNG state is left untouched.
    """
    from transformers import AutoModelForCausalLM

    if arch not in TINY_CONFIGS:
        raise ValueError(f"unknown tiny arch {arch!r}; known: {sorted(TINY_CONFIGS)}")
    tok = byte_tokenizer()
    config = TINY_CONFIGS[arch](tok)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model.eval(), tok
