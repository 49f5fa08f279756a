"""Write a Llama-family model (weights as they are in memory, edits included) as a llama-architecture GGUF.

The file carries everything llama.cpp and transformers' GGUF reader need: hyperparameters, RoPE settings,
the byte-level BPE tokenizer (``tokenizer.ggml.model = gpt2``) and the chat template. Weights are written
in one of :data:`GGUF_DTYPES`; 1-D tensors (norms) always stay F32, as llama.cpp expects.

Two layout facts the format does not state:

- GGUF stores a weight of shape ``[out, in]`` with its dims listed innermost first; the ``gguf`` writer
  takes numpy order and reverses it, so tensors go in exactly as ``nn.Linear`` holds them.
- llama.cpp applies RoPE to adjacent pairs of a head's dims, Hugging Face to the two halves of the head.
  The Q and K projections are therefore written with each head's rows reordered (:func:`llama_qk_permute`);
  transformers' reader undoes it on load.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from workbench.arch import ARCHITECTURES, LLAMA, get_module

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GGUFDtype:
    """How one named dtype stores the 2-D weight matrices (1-D tensors are always F32)."""

    name: str
    matrix_type: str  # gguf.GGMLQuantizationType member name
    file_type: str  # gguf.LlamaFileType member name (general.file_type)


GGUF_DTYPES: dict[str, GGUFDtype] = {d.name: d for d in (
    GGUFDtype("f32", "F32", "ALL_F32"),
    GGUFDtype("f16", "F16", "MOSTLY_F16"),
    GGUFDtype("q8_0", "Q8_0", "MOSTLY_Q8_0"),
)}

# model_type -> GGUF architecture written. Mistral without a sliding window is a Llama.
GGUF_ARCH_OF_MODEL_TYPE = {"llama": "llama", "mistral": "llama"}
_REFUSALS = {
    "qwen2": "Qwen2 has q/k/v biases, which a llama-architecture GGUF cannot carry (llama.cpp uses its 'qwen2' "
             "architecture)",
    "qwen3": "Qwen3 normalises each head's queries and keys (q_norm / k_norm), which the llama architecture lacks",
}
# rope_type values (HF rope_parameters) that are written (see _write_hparams); others are refused
ROPE_TYPES = ("default", "linear", "yarn", "llama3")

# per-block tensors: GGUF name suffix -> attribute of workbench.arch.LlamaLayout (module path in a block)
_BLOCK_TENSORS = {
    "attn_norm": "input_norm", "attn_q": "q", "attn_k": "k", "attn_v": "v", "attn_output": "o",
    "ffn_norm": "post_norm", "ffn_gate": "gate", "ffn_up": "up", "ffn_down": "down",
}


class ExportRefused(ValueError):
    """The model or tokenizer cannot be written faithfully in the requested format."""


def gguf_dtype(name: str) -> GGUFDtype:
    try:
        return GGUF_DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown GGUF dtype {name!r}; use one of {list(GGUF_DTYPES)}") from None


# ---------------------------------------------------------------------------------------------- weights


def llama_qk_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder each head's rows from HF's half-split RoPE layout to GGUF's interleaved one.

    Within a head of ``d`` rows, HF rotates row ``j`` with row ``j + d/2``; GGUF rotates rows ``2i`` and
    ``2i+1``. So row ``j < d/2`` moves to ``2j`` and row ``j + d/2`` to ``2j + 1``.
    """
    rows = w.shape[0]
    half = rows // n_heads // 2
    return w.reshape(n_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclass
class _Tensor:
    name: str  # GGUF name
    source: str  # HF parameter name
    param: torch.Tensor
    permute_heads: int = 0  # > 0: apply llama_qk_permute with this many heads

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.param.shape)

    def array(self) -> np.ndarray:
        """float32 copy in HF layout, made on demand so that one tensor at a time is converted."""
        return self.param.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()


def _ggml_type(dtype: GGUFDtype, arr_shape: tuple[int, ...]):
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if len(arr_shape) < 2:
        return GGMLQuantizationType.F32
    qtype = GGMLQuantizationType[dtype.matrix_type]
    block = GGML_QUANT_SIZES[qtype][0]
    if arr_shape[-1] % block:
        logger.warning("row length %d is not a multiple of %d: this tensor is stored as F16", arr_shape[-1], block)
        return GGMLQuantizationType.F16
    return qtype


def _encode(arr: np.ndarray, qtype) -> np.ndarray:
    from gguf import GGMLQuantizationType, quants

    if qtype == GGMLQuantizationType.F32:
        return np.ascontiguousarray(arr, dtype=np.float32)
    if qtype == GGMLQuantizationType.F16:
        return np.ascontiguousarray(arr.astype(np.float16))
    return quants.quantize(np.ascontiguousarray(arr, dtype=np.float32), qtype)


def _tensor_info(qtype, shape: tuple[int, ...]) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, numpy dtype, nbytes) as GGUFWriter.add_tensor_info takes them; quantized tensors are bytes."""
    from gguf import GGMLQuantizationType, quant_shape_to_byte_shape

    if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        np_dtype = np.dtype(np.float32 if qtype == GGMLQuantizationType.F32 else np.float16)
        return tuple(shape), np_dtype, math.prod(shape) * np_dtype.itemsize
    byte_shape = tuple(quant_shape_to_byte_shape(tuple(shape), qtype))
    return byte_shape, np.dtype(np.uint8), math.prod(byte_shape)


def _decode(data: np.ndarray, qtype, shape: tuple[int, ...]) -> np.ndarray:
    """What a reader gets back (gguf's own dequantizer, as transformers uses it)."""
    from gguf import quants

    return quants.dequantize(data, qtype).astype(np.float32).reshape(shape)


# ---------------------------------------------------------------------------------------------- checks


def _rope_parameters(config) -> dict:
    rp = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rp = dict(rp)
    rp.setdefault("rope_type", rp.pop("type", "default"))
    if "rope_theta" not in rp:
        rp["rope_theta"] = getattr(config, "rope_theta", 10000.0)
    return rp


def check_gguf_exportable(model) -> None:
    """Raise :class:`ExportRefused` with the reason if ``model`` cannot be written as a llama GGUF."""
    cfg = model.config
    mt = getattr(cfg, "model_type", None)
    if mt not in GGUF_ARCH_OF_MODEL_TYPE:
        spec = ARCHITECTURES.get(mt)
        why = _REFUSALS.get(mt) or (spec.packed_refusal if spec is not None and spec.packed is None else "")
        raise ExportRefused(
            f"GGUF export writes the llama architecture only (model types {sorted(GGUF_ARCH_OF_MODEL_TYPE)}); "
            f"model_type {mt!r} is refused" + (f": {why}" if why else "")
        )
    problems = []
    if getattr(cfg, "hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {cfg.hidden_act!r} (llama uses silu)")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(cfg, flag, False):
            problems.append(f"{flag}=True (the llama GGUF reader in transformers drops biases)")
    if mt == "mistral" and getattr(cfg, "sliding_window", None) is not None:
        problems.append(f"sliding_window={cfg.sliding_window} (the llama architecture attends to all positions)")
    rp = _rope_parameters(cfg)
    if rp["rope_type"] not in ROPE_TYPES:
        problems.append(f"rope_type {rp['rope_type']!r} (written: {list(ROPE_TYPES)})")
    rotary = get_module(model, LLAMA.rotary) if LLAMA.rotary else None
    if getattr(rotary, "_daert_rope_scaling", None) is not None:
        problems.append("a workbench.context RoPE scaling is applied in memory (remove it, or put it in "
                        "config.rope_parameters, before exporting)")
    if problems:
        raise ExportRefused("cannot write this model as a llama GGUF: " + "; ".join(problems))


def _is_tied(model) -> bool:
    """Tied on disk iff the config says so and the two matrices are equal in memory (an edit that untied
    them is kept: output.weight is written and readers untie)."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return False
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    if emb is head or torch.equal(emb, head):
        return True
    logger.warning("config ties the embeddings but lm_head differs from embed_tokens in memory: writing both")
    return False


def _tensors(model) -> list[_Tensor]:
    """Every weight of the model, named and ordered as llama.cpp writes a llama GGUF."""
    cfg = model.config
    layout = LLAMA.packed
    n_heads = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    names = [(f"{LLAMA.embed}.weight", "token_embd.weight", 0)]
    for i in range(cfg.num_hidden_layers):
        for suffix, attr in _BLOCK_TENSORS.items():
            heads = n_heads if suffix == "attn_q" else n_kv if suffix == "attn_k" else 0
            names.append((f"{LLAMA.layers}.{i}.{getattr(layout, attr)}.weight", f"blk.{i}.{suffix}.weight", heads))
    names.append((f"{LLAMA.final_norm}.weight", "output_norm.weight", 0))
    unembed = f"{LLAMA.unembed}.weight"
    if not _is_tied(model):
        names.append((unembed, "output.weight", 0))

    params = dict(model.named_parameters(remove_duplicate=False))
    missing = [src for src, _, _ in names if src not in params]
    extra = sorted(set(model.state_dict()) - {src for src, _, _ in names} - {unembed})
    if missing or extra:
        raise ExportRefused("cannot write this model as a llama GGUF: "
                            + (f"no parameter {missing[:3]}; " if missing else "")
                            + (f"parameters with no GGUF tensor {extra[:5]}" if extra else ""))
    return [_Tensor(gguf_name, src, params[src], heads) for src, gguf_name, heads in names]


# ---------------------------------------------------------------------------------------------- metadata


def _write_hparams(w, model, dtype: GGUFDtype, name: str) -> list[tuple[str, np.ndarray]]:
    """Architecture metadata; returns extra F32 tensors (llama3 RoPE factors)."""
    from gguf import GGML_QUANT_VERSION, LlamaFileType, RopeScalingType

    cfg = model.config
    n_heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    w.add_name(name)
    w.add_file_type(LlamaFileType[dtype.file_type])
    if dtype.matrix_type not in ("F32", "F16"):
        w.add_quantization_version(GGML_QUANT_VERSION)
    w.add_vocab_size(model.get_input_embeddings().weight.shape[0])
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(n_heads)
    w.add_head_count_kv(getattr(cfg, "num_key_value_heads", None) or n_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)

    rp = _rope_parameters(cfg)
    w.add_rope_freq_base(float(rp["rope_theta"]))
    kind = rp["rope_type"]
    extra: list[tuple[str, np.ndarray]] = []
    if kind == "linear":
        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rp["factor"]))
    elif kind == "yarn":
        w.add_rope_scaling_type(RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rp["factor"]))
        orig = rp.get("original_max_position_embeddings") or cfg.max_position_embeddings
        w.add_rope_scaling_orig_ctx_len(int(orig))
        if rp.get("beta_fast") is not None:
            w.add_rope_scaling_yarn_beta_fast(float(rp["beta_fast"]))
        if rp.get("beta_slow") is not None:
            w.add_rope_scaling_yarn_beta_slow(float(rp["beta_slow"]))
        if rp.get("attention_factor") is not None:
            w.add_rope_scaling_attn_factors(float(rp["attention_factor"]))
    elif kind == "llama3":
        # llama.cpp takes Llama 3 scaling as per-frequency divisors in a 'rope_freqs' tensor
        rotary = get_module(model, LLAMA.rotary)
        scaled = rotary.inv_freq.detach().double().cpu()
        base = float(rp["rope_theta"])
        plain = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        extra.append(("rope_freqs.weight", (plain / scaled).float().numpy()))
    if kind != "default":
        logger.warning("RoPE scaling %r is written for llama.cpp; transformers' llama GGUF reader ignores it", kind)
    return extra


def _pre_tokenizer_name(backend: dict, has_merges: bool) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` name for the tokenizer's split rule."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    pre = backend.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and not pre.get("add_prefix_space", False):
        if pre.get("use_regex", True):
            return "gpt-2"
        if not has_merges:  # no merges: every byte is its own token whatever the split
            return "gpt-2"
    if pre.get("type") == "Sequence":
        parts = pre.get("pretokenizers", [])
        if (len(parts) == 2 and parts[0].get("type") == "Split" and parts[1].get("type") == "ByteLevel"
                and not parts[1].get("use_regex", True) and not parts[1].get("add_prefix_space", False)):
            regex = (parts[0].get("pattern") or {}).get("Regex")
            for name, split in GGUF_PRE_TOKENIZER_SPLITS.items():
                if split == regex:
                    return name
    raise ExportRefused(
        f"no llama.cpp pre-tokenizer name is known for this tokenizer's split rule ({json.dumps(pre)[:200]}); "
        "pass tokenizer_pre=NAME (llama.cpp's tokenizer.ggml.pre) if you know it"
    )


def _adds(tokenizer, which: str) -> bool:
    tid = getattr(tokenizer, f"{which}_token_id", None)
    if tid is None:
        return False
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    return bool(full and full != plain and (full[0] if which == "bos" else full[-1]) == tid)


def _write_tokenizer(w, tokenizer, n_vocab: int, tokenizer_pre: str | None) -> None:
    from gguf import TokenType

    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise ExportRefused("GGUF export needs a fast (tokenizers-backed) tokenizer")
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    model = backend["model"]
    decoder = backend.get("decoder") or {}
    if model.get("type") != "BPE" or decoder.get("type") != "ByteLevel":
        raise ExportRefused(
            f"GGUF export writes byte-level BPE tokenizers (tokenizer.ggml.model gpt2); this one is "
            f"{model.get('type')} with a {decoder.get('type')} decoder"
        )
    if backend.get("normalizer") is not None:
        logger.warning("the tokenizer's normalizer %s is not representable in GGUF and is dropped",
                       backend["normalizer"].get("type"))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    pre = tokenizer_pre or _pre_tokenizer_name(backend, bool(merges))
    inv = {i: t for t, i in model["vocab"].items()}
    added = dict(tokenizer.added_tokens_decoder)
    if max([*inv, *added, -1]) >= n_vocab:
        raise ExportRefused(f"the tokenizer has ids beyond the model's {n_vocab} embedding rows")
    tokens, types = [], []
    for i in range(n_vocab):
        if i in added:
            tokens.append(added[i].content)
            types.append(TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
        elif i in inv:
            tokens.append(inv[i])
            types.append(TokenType.NORMAL)
        else:  # embedding rows no token uses (vocab padded to a round size)
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if merges:
        w.add_token_merges(merges)
    else:
        # GGUF has no empty arrays; with scores and no merges transformers rebuilds the (empty) merge list.
        # llama.cpp needs merges for a gpt2 vocabulary, so such a file is for transformers only.
        logger.warning("the tokenizer has no BPE merges: the GGUF loads in transformers, not in llama.cpp")
        w.add_token_scores([0.0] * n_vocab)
    for which, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("unk", w.add_unk_token_id),
                       ("pad", w.add_pad_token_id)):
        tid = getattr(tokenizer, f"{which}_token_id", None)
        if tid is not None:
            add(int(tid))
    w.add_add_bos_token(_adds(tokenizer, "bos"))
    w.add_add_eos_token(_adds(tokenizer, "eos"))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        w.add_chat_template([{"name": k, "template": v} for k, v in template.items()])
    elif template:
        w.add_chat_template(template)


# ---------------------------------------------------------------------------------------------- writing


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.partial")


def _check_target(path: Path, overwrite: bool) -> None:
    if path.is_dir():
        raise FileExistsError(f"{path} is a folder; give a file path for the GGUF")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it (replaced only once the new "
                              "file is complete)")


def save_gguf(
    model,
    tokenizer,
    path: str | os.PathLike,
    *,
    dtype: str = "f16",
    overwrite: bool = False,
    name: str | None = None,
    tokenizer_pre: str | None = None,
) -> Path:
    """Write ``model`` (as it is in memory) and ``tokenizer`` to ``path`` as a llama-architecture GGUF.

    ``dtype``: one of :data:`GGUF_DTYPES` (``"f32"``, ``"f16"``, ``"q8_0"``) for the 2-D weights; norms stay
    F32. The file is written next to ``path`` under a temporary name and renamed once complete, so an error
    leaves no partial file (and, with ``overwrite``, the old file intact). ``name``: ``general.name``
    (default: the model's ``name_or_path``). ``tokenizer_pre``: llama.cpp's pre-tokenizer name, when it
    cannot be inferred from the tokenizer.
    """
    from gguf import GGUFWriter

    spec = gguf_dtype(dtype)
    check_gguf_exportable(model)
    path = Path(path).expanduser()
    _check_target(path, overwrite)
    arch = GGUF_ARCH_OF_MODEL_TYPE[model.config.model_type]
    tensors = _tensors(model)
    label = name or Path(str(getattr(model.config, "name_or_path", "") or "model")).name or "model"

    tmp = _temp_path(path)
    writer = GGUFWriter(None, arch)
    try:
        extra = _write_hparams(writer, model, spec, label)
        _write_tokenizer(writer, tokenizer, model.get_input_embeddings().weight.shape[0], tokenizer_pre)
        plan: list[tuple[_Tensor | np.ndarray, object]] = []
        for t in tensors:
            qtype = _ggml_type(spec, t.shape)
            writer.add_tensor_info(t.name, *_tensor_info(qtype, t.shape), raw_dtype=qtype)
            plan.append((t, qtype))
        for ename, arr in extra:
            qtype = _ggml_type(GGUF_DTYPES["f32"], arr.shape)
            writer.add_tensor_info(ename, *_tensor_info(qtype, arr.shape), raw_dtype=qtype)
            plan.append((arr, qtype))
        path.parent.mkdir(parents=True, exist_ok=True)  # only once everything but the tensor data is known
        writer.open_output_file(tmp)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for item, qtype in plan:
            if isinstance(item, np.ndarray):
                writer.write_tensor_data(item)
                continue
            arr = item.array()
            if item.permute_heads:
                arr = llama_qk_permute(arr, item.permute_heads)
            writer.write_tensor_data(_encode(arr, qtype))
        writer.flush()
        os.fsync(writer.fout[0].fileno())  # on disk before the rename makes it visible
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    logger.info("wrote %s (%s, %.1f MB)", path, dtype, path.stat().st_size / 1e6)
    return path


def reference_state_dict(model, dtype: str) -> dict[str, torch.Tensor]:
    """The weights a GGUF of ``dtype`` holds, decoded to float32 in HF layout (what transformers loads back).

    A model holding these weights is the exact reference for a GGUF round trip: its float32 logits equal the
    reloaded model's bit for bit.
    """
    spec = gguf_dtype(dtype)
    check_gguf_exportable(model)
    out = {}
    tensors = _tensors(model)
    for t in tensors:
        qtype = _ggml_type(spec, t.shape)
        out[t.source] = torch.from_numpy(_decode(_encode(t.array(), qtype), qtype, t.shape).copy())
    if all(t.name != "output.weight" for t in tensors):  # tied: the reader ties lm_head to the embedding
        out[f"{LLAMA.unembed}.weight"] = out[f"{LLAMA.embed}.weight"]
    return out
