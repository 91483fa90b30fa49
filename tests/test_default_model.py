"""The shipped default model (edgephi/data/default-model): loads with transformers and with edgephi's own spec,
weights and tokenizer readers, stays small, and compresses held-out code better than ``xz -9``.

The held-out snippet (tests/data/heldout_snippet.py) is a file of the third-party ``packaging`` package (its licence
is in its header); the model was trained on CPython's standard library only (benchmarks/train_default_model.py).
"""
from __future__ import annotations

import json
import lzma
import math
import shutil
import subprocess
from pathlib import Path

import pytest

from edgephi import default_model
from edgephi.spec import PhiSpec
from edgephi.tokenizer import Tokenizer
from edgephi.weights import Checkpoint

MODEL = Path(default_model.__file__).parent / "data" / "default-model"
SNIPPET = Path(__file__).parent / "data" / "heldout_snippet.py"
MAX_BYTES = 25 * 1024 * 1024
WINDOW = 512  # the training sequence length


def xz9_bits_per_byte(data: bytes) -> float:
    if shutil.which("xz"):
        out = subprocess.run(["xz", "-9", "-c"], input=data, capture_output=True, check=True).stdout
    else:  # same preset and container as the xz tool
        out = lzma.compress(data, preset=9)
    return 8 * len(out) / len(data)


def test_shipped_files():
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "special_tokens_map.json", "README.md"):
        assert (MODEL / name).is_file(), name
    # the Phi-3 stand-in vocabulary is gone: a stale tokenizer.model would disagree with tokenizer.json
    assert not (MODEL / "tokenizer.model").exists()
    assert not (MODEL / "LICENSE-vocab").exists()
    assert (MODEL / "model.safetensors").stat().st_size <= MAX_BYTES
    assert default_model.checkpoint_dir() == MODEL


def test_edgephi_reads_it():
    spec = PhiSpec.from_hf_config(MODEL)
    assert spec.model_type == "phi3" and spec.tie_word_embeddings
    assert spec.hidden_size % 256 == 0 and spec.max_position_embeddings == 2048
    Checkpoint(MODEL).check(spec)
    tok = Tokenizer.from_dir(MODEL)
    gen = json.loads((MODEL / "generation_config.json").read_text())
    assert {tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|end|>")} <= set(gen["eos_token_id"]) <= tok.stop_ids
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "<|user|>\nhi<|end|>\n<|assistant|>\n"
    text = SNIPPET.read_text(encoding="utf-8")
    assert tok.decode(tok.encode(text)) == text


def test_transformers_and_beats_xz():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.set_num_threads(2)
    hf_tok = transformers.AutoTokenizer.from_pretrained(MODEL)
    model = transformers.AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    text = SNIPPET.read_text(encoding="utf-8")
    ids = hf_tok(text, add_special_tokens=False)["input_ids"]
    assert ids == Tokenizer.from_dir(MODEL).encode(text)  # edgephi's runtime tokenizer agrees with transformers'
    x = torch.tensor([hf_tok.convert_tokens_to_ids("<|endoftext|>")] + ids)
    nll, done, stride = 0.0, 1, WINDOW // 2
    with torch.no_grad():
        while done < len(x):  # sliding windows: every token scored once, with >= WINDOW/2 tokens of context
            start = 0 if done == 1 else done - (WINDOW - stride)
            end = min(len(x), start + WINDOW)
            logp = torch.log_softmax(model(input_ids=x[None, start:end]).logits[0, :-1].float(), dim=-1)
            lp = logp.gather(1, x[start + 1:end, None])[:, 0]
            nll -= lp[done - start - 1:].sum().item()
            done = end
    raw = text.encode("utf-8")
    model_bpb = nll / math.log(2) / len(raw)
    xz_bpb = xz9_bits_per_byte(raw)
    assert model_bpb < xz_bpb, f"model {model_bpb:.3f} bits/byte, xz -9 {xz_bpb:.3f}"
