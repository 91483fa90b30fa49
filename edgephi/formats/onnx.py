"""The ONNX format (bundle/onnx/): one dynamic-shape graph that onnxruntime and onnxruntime-genai both run.

Files: model.onnx (graph) + model.onnx.data (weights, page-aligned external data) + genai_config.json (the
folder's description, in onnxruntime-genai's schema) + the tokenizer files (onnxruntime-genai looks beside the
model).  The names follow onnxruntime-genai's model builder, so its runtime needs nothing else:

inputs   input_ids (B, S) int64, attention_mask (B, total) int64,
         past_key_values.{i}.key | .value (B, n_kv, past, head_dim) float32
outputs  logits (B, S, V) float32, present.{i}.key | .value (B, n_kv, total, head_dim) float32

Attention is com.microsoft GroupQueryAttention; past and present may be one preallocated buffer of n_ctx
positions (past_present_share_buffer), which the kernel reads and writes in place.  Sliding window: the graph
keeps a full-length cache and masks the window inside GroupQueryAttention (``local_window_size``, the same
convention as transformers), so genai_config.json carries no "sliding_window" entry: onnxruntime-genai's windowed
(ring) cache would reject a prompt longer than the window.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

FORMAT = "onnx"
MODEL_FILE = "model.onnx"
DATA_FILE = MODEL_FILE + ".data"
GENAI_CONFIG = "genai_config.json"
INPUT_IDS, ATTENTION_MASK, LOGITS = "input_ids", "attention_mask", "logits"
PAST = {"key": "past_key_values.%d.key", "value": "past_key_values.%d.value"}
PRESENT = {"key": "present.%d.key", "value": "present.%d.value"}


def local_window_size(spec) -> int:
    """GroupQueryAttention's local_window_size: the query at p sees p - W < k <= p; -1 = no window."""
    sw = spec.effective_sliding_window
    return -1 if sw is None else sw


def genai_config(spec, bos: int | None, eos: list[int], pad: int | None, model_file: str = MODEL_FILE) -> dict:
    """genai_config.json (field names as onnxruntime-genai's builder writes them: builders/base.py)."""
    return {
        "model": {
            "bos_token_id": bos,
            "context_length": spec.context_length,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": model_file,
                "head_size": spec.head_dim,
                "hidden_size": spec.hidden_size,
                "inputs": {"input_ids": INPUT_IDS, "attention_mask": ATTENTION_MASK,
                           "past_key_names": PAST["key"], "past_value_names": PAST["value"]},
                "outputs": {"logits": LOGITS, "present_key_names": PRESENT["key"],
                            "present_value_names": PRESENT["value"]},
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


@dataclass(frozen=True)
class FolderConfig:
    """What a backend needs from genai_config.json."""

    model_file: str
    n_layers: int
    n_kv: int
    head_dim: int
    context_length: int
    vocab_size: int


def read_genai_config(folder: str | Path) -> FolderConfig:
    path = Path(folder) / GENAI_CONFIG
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))["model"]
        dec = cfg["decoder"]
        return FolderConfig(model_file=str(dec["filename"]), n_layers=int(dec["num_hidden_layers"]),
                            n_kv=int(dec["num_key_value_heads"]), head_dim=int(dec["head_size"]),
                            context_length=int(cfg["context_length"]), vocab_size=int(cfg.get("vocab_size", 0)))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing (the onnx exporter writes it beside {MODEL_FILE})") from None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: corrupt genai_config ({e.__class__.__name__}: {e})") from None
