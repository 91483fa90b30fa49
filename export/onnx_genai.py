"""genai_config.json and the tokenizer files onnxruntime-genai reads beside the model.

Field names follow onnxruntime-genai's builder (models/builders/base.py, make_genai_config).  No "sliding_window"
entry is written: the exported graph keeps a full-length KV cache and masks the window inside
GroupQueryAttention (local_window_size), which runs past the window in both runtimes, while onnxruntime-genai's
windowed (ring) cache does not (its GroupQueryAttention rejects a prompt longer than the window).
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from edgephi.spec import PhiSpec

log = logging.getLogger(__name__)

GENAI_CONFIG = "genai_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "added_tokens.json")


def _ids(v) -> list[int]:
    if v is None:
        return []
    return [int(x) for x in v] if isinstance(v, (list, tuple)) else [int(v)]


def special_ids(spec: PhiSpec, ckpt_dir: Path) -> tuple[int | None, list[int], int | None]:
    """(bos, every stop id, pad): config.json's eos plus generation_config.json's (chat models end turns there)."""
    bos, eos, pad = spec.bos_token_id, list(spec.eos_token_id), spec.pad_token_id
    gen_path = Path(ckpt_dir) / "generation_config.json"
    if gen_path.is_file():
        try:
            gen = json.loads(gen_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{gen_path}: not valid JSON ({e})") from None
        bos = gen.get("bos_token_id", bos) if gen.get("bos_token_id") is not None else bos
        eos += [i for i in _ids(gen.get("eos_token_id")) if i not in eos]
        pad = gen.get("pad_token_id") if gen.get("pad_token_id") is not None else pad
    if pad is None and eos:
        pad = eos[0]
    return bos, eos, pad


def write_genai_config(out_dir: Path, spec: PhiSpec, ckpt_dir: Path, model_file: str) -> Path:
    bos, eos, pad = special_ids(spec, ckpt_dir)
    cfg = {
        "model": {
            "bos_token_id": bos,
            "context_length": spec.context_length,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": model_file,
                "head_size": spec.head_dim,
                "hidden_size": spec.hidden_size,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": spec.num_attention_heads,
                "num_hidden_layers": spec.num_hidden_layers,
                "num_key_value_heads": spec.num_key_value_heads,
            },
            "eos_token_id": eos if len(eos) != 1 else eos[0],
            "pad_token_id": pad,
            "type": spec.model_type,  # onnxruntime-genai's model types include "phi" and "phi3"
            "vocab_size": spec.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
            "max_length": spec.context_length, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
            "num_return_sequences": 1,
            # GroupQueryAttention reads and writes one preallocated cache when past and present share a buffer
            "past_present_share_buffer": True,
            "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 1, "top_p": 1.0,
        },
    }
    path = Path(out_dir) / GENAI_CONFIG
    path.write_text(json.dumps(cfg, indent=4) + "\n", encoding="utf-8")
    return path


def copy_tokenizer_files(ckpt_dir: Path, out_dir: Path) -> list[Path]:
    """Copy the checkpoint's tokenizer files beside genai_config.json (onnxruntime-genai looks there)."""
    copied = []
    for name in TOKENIZER_FILES:
        src = Path(ckpt_dir) / name
        if src.is_file():
            shutil.copy2(src, Path(out_dir) / name)
            copied.append(Path(out_dir) / name)
    if not any(p.name in ("tokenizer.json", "tokenizer.model") for p in copied):
        log.warning("%s: no tokenizer.json or tokenizer.model; onnxruntime-genai will not load the tokenizer",
                    ckpt_dir)
    return copied
