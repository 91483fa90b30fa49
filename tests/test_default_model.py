"""The shipped default model (edgephi/data/default-model): loads with transformers and with edgephi's own spec,
weights and tokenizer readers, stays small, and compresses held-out code better than ``xz -9``.

The held-out snippet (tests/data/heldout_snippet.py) is a file of the third-party ``packaging`` package (its licence
is in its header); the model was trained on CPython's standard library only (benchmarks/train_default_model.py).

Its tokenizer must give the same ids in every client: edgephi, transformers' ``tokenizers``, onnxruntime-genai's own
tokenizer (it reads the bundle's onnx/ folder) and llama.cpp (it reads the GGUF file).  The vocabulary is built for
that (no piece has whitespace after another character; see benchmarks/train_default_model.py) and
test_four_tokenizers_agree checks it on held-out code and on awkward strings.
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


# Strings where tokenizers tend to part ways: whitespace runs and their ends, tabs, carriage returns, digits, letters
# next to punctuation, text outside the vocabulary's alphabet (byte fallback), a literal "▁", the chat markers.
TRICKY = [
    "", " ", "  ", "    ", "\n", "\n\n", "\t", " x", "x ", "  x  ", "x  y", "x   y", "a b  c   d    e",
    "def f(x):\n    return x  # two  spaces\n", "\n    return x  # two  spaces\n", "    return",
    "\t\tfoo\t \t bar\t\n", " \t\n \n\n   \r\n\r\n  x\r\n", "a\rb\r\n\nc", "if x:\n\tpass\n  \n",
    "n = 12345 + 0.5e-3\n", "self._key", "((self", "x.__class__.__name__", "print('string', \"it's\")",
    "#" * 79 + "\n", "=" * 40 + " " * 40 + "|\n", "héllo wörld, naïve café", "Ωμέγα Привет 漢字かな 한국어",
    "emoji 😀🚀 and \u2028 and \x01\x7f\x1b[0m", "e\u0301 \ufeffbom", "a\u2581b \u2581 \u2581\u2581x",
    "<|user|>\nhi<|end|>\n<|assistant|>\n", "<|system|>You are terse.<|end|>\n<|user|>\n  2 + 2?<|end|>\n",
    "text<|endoftext|>more <|end|> x", "-" * 90 + "\n" + " " * 60 + "x" * 30,
]
# onnxruntime-genai also cuts a chunk that reaches 100 characters (UTF-8 bytes for byte-fallback ones) without
# whitespace after text, wherever it is; runs that long (a 100+ character word, URL or separator line, 100+ spaces or
# line breaks) are the one place where it can part from the other three, which agree on them too.
LONG = ["#" * 150, "ab" * 200, " " * 150 + "x", "\n" * 130 + "x", "=" * 120 + "\n"]


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
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                   tokenize=False) == "<|user|>\nhi<|end|>\n<|assistant|>\n"
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


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from edgephi.export.bundle import export_bundle

    out = tmp_path_factory.mktemp("default") / "bundle"
    export_bundle("default", out, formats=("onnx", "gguf"), bits=16, force=True)
    return out


def test_vocabulary_keeps_whitespace_in_front():
    """No piece has a space ("▁"), "\\n" or "\\r" after another character: onnxruntime-genai cuts the text before
    whitespace that follows other text and runs BPE on each chunk, so a piece across such a cut would be made by the
    other clients and never by it.  Its pre_tokenizer is the no-op split that keeps onnxruntime-genai from applying
    a Llama-3 regex instead (benchmarks/train_default_model.py: OG_NOOP_PRE_TOKENIZER)."""
    spec = json.loads((MODEL / "tokenizer.json").read_text(encoding="utf-8"))
    ws = "\u2581\r\n"
    bad = [p for p in spec["model"]["vocab"] if any(c in ws and p[i - 1] not in ws for i, c in enumerate(p) if i)]
    assert not bad, bad[:10]
    assert spec["pre_tokenizer"] == {"type": "Split", "pattern": {"String": " "}, "behavior": "Isolated",
                                     "invert": False}
    assert spec["normalizer"] == {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}
    assert spec["model"]["byte_fallback"] and len(spec["model"]["vocab"]) == 4096
    assert [spec["model"]["vocab"][f"<0x{b:02X}>"] for b in range(256)] == list(range(6, 262))


def test_four_tokenizers_agree(exported):
    """edgephi == tokenizers == onnxruntime-genai (onnx/ folder) == llama.cpp (GGUF) on held-out code and TRICKY."""
    tokenizers = pytest.importorskip("tokenizers")
    from edgephi.benchmarks.quality import heldout_text

    text = heldout_text()[:4000]
    # pieces cut at odd places (mid-word, mid-indentation), whole lines, and the whole 4000 characters
    pieces = [text[i:i + 97] for i in range(0, len(text), 97)] + text.splitlines(keepends=True)[:40] + [text]
    strings = pieces + TRICKY
    ours = Tokenizer.from_dir(exported)
    hf = tokenizers.Tokenizer.from_file(str(exported / "tokenizer.json"))
    want = {s: ours.encode(s) for s in strings}
    for s in LONG:
        assert hf.encode(s, add_special_tokens=False).ids == ours.encode(s), repr(s)
    for s in strings:
        assert hf.encode(s, add_special_tokens=False).ids == want[s], repr(s)
        assert ours.decode(want[s]) == s.replace("\u2581", " "), repr(s)  # a typed "▁" is a space to all four
    clients = 0
    try:
        import onnxruntime_genai as og
    except ImportError:
        og = None
    if og is not None:
        clients += 1
        ogt = og.Tokenizer(og.Model(str(exported / "onnx")))
        for s in strings:  # (onnxruntime-genai takes a C string: a NUL would end the text there)
            assert [int(i) for i in ogt.encode(s)] == want[s], repr(s)
    try:
        import llama_cpp
    except ImportError:
        llama_cpp = None
    if llama_cpp is not None:
        clients += 1
        gguf = next((exported / "gguf").glob("*.gguf"))
        llm = llama_cpp.Llama(str(gguf), vocab_only=True, verbose=False)
        for s in strings:
            assert llm.tokenize(s.encode(), add_bos=False, special=True) == want[s], repr(s)
        for s in LONG:
            assert llm.tokenize(s.encode(), add_bos=False, special=True) == ours.encode(s), repr(s)
    if not clients:
        pytest.skip("neither onnxruntime_genai nor llama_cpp is installed (edgephi == tokenizers checked)")
