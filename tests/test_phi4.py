"""Phi-4, Phi-4-reasoning and Phi-4-mini-reasoning: their real tokenizers (OpenAI's cl100k_base / o200k_base ranks
with each release's special tokens, tests/tiktoken_vocab.py) read alike by OpenAI's BPE, edgephi, transformers and
llama.cpp; the tiny checkpoints exported to ONNX and GGUF against transformers; the <think> block told apart from
the answer (edgephi/reasoning.py, Model.chat(thinking=...), the CLI's --thinking).
"""
from __future__ import annotations

import json
import random
import unicodedata

import numpy as np
import pytest

import tiktoken_vocab as tv
import tiny
import vocab_build as vb
from edgephi.generate import GenerationResponse
from edgephi.reasoning import ReasoningSplitter
from edgephi.tokenizer import Tokenizer

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (edgephi[gguf])")
pytest.importorskip("bpe_openai", reason="bpe-openai (dev extra) ships the BPE ranks")

VARIANTS = ["phi-4", "phi-4-mini-reasoning"]  # Phi-4-reasoning has Phi-4's shapes (test_interop covers its template)
ENCODING = {"phi4": "cl100k_base", "phi4-reasoning": "cl100k_base", "phi4-mini-reasoning": "o200k_base"}
KIND = {"phi-4": "phi4", "phi-4-mini-reasoning": "phi4-mini-reasoning"}
PRE = {"phi-4": "dbrx", "phi-4-mini-reasoning": "gpt-4o"}  # what llama.cpp's own converter names them
# llama.cpp's tokenizer test strings (tests/data, MIT) plus code, whitespace runs, unicode and the special tokens
PLAIN = [t for t, _ in vb.read_vectors(vb.GPT2_VOCAB)] + [
    "def f(x):\n    return x  # 🦙\n\n\t\tend\n", " " * 17 + "x\n\n\n   \t", "ǅungla Ⅻ ﬁ 𝔘 ١٢٣ ๑ ñ ñ 日本語の文",
    "I've 'RE we'LL 'm", "    if a:\r\n        b = [1,2,3]//4", "https://example.com/a/b?c=1", "12345678901 3.14159"]
SPECIAL = {"phi4": ["<|im_start|>user<|im_sep|>hi <|im_end|><|im_start|>assistant<|im_sep|>",
                    "x<|endoftext|>y", " <|dummy_85|> <|fim_prefix|>a<|fim_suffix|>"],
           "phi4-mini-reasoning": ["<|system|>s<|end|><|user|>2+2?<|end|><|assistant|><think>\n4</think> 4<|end|>",
                                   "<|tool|>[]<|/tool|> <|tool_call|>{}<|/tool_call|>x<|endoftext|>"]}
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "<think>\nadd</think>\n4"}, {"role": "user", "content": "And 3+3?"}]
PROMPT, STEPS = 80, 8


@pytest.fixture(scope="module")
def onnx32(tiny_checkpoint, tmp_path_factory):
    """onnx32(variant) -> the ONNX fp32 folder of the tiny checkpoint (the 16-bit bundles come from tiny_bundle)."""
    from edgephi.export.registry import get as exporter
    from edgephi.export.source import Source

    cache: dict = {}

    def get(variant: str):
        if variant not in cache:
            out = tmp_path_factory.mktemp(f"onnx32-{variant}") / "onnx"
            out.mkdir()
            exporter("onnx")(Source.open(tiny_checkpoint(variant)), out, bits=32)
            cache[variant] = out
        return cache[variant]

    return get


@pytest.fixture(scope="module")
def tokenizers(tiny_bundle, tmp_path_factory):
    """tokenizers(kind) -> (folder, edgephi Tokenizer, transformers tokenizer), loaded once per module."""
    from transformers import AutoTokenizer

    cache: dict = {}

    def get(kind: str):
        if kind not in cache:
            variant = {"phi4": "phi-4", "phi4-mini-reasoning": "phi-4-mini-reasoning"}.get(kind)
            d = tiny_bundle(variant) if variant else tv.write_tokenizer(tmp_path_factory.mktemp(kind), kind)
            cache[kind] = (d, Tokenizer.from_dir(d), AutoTokenizer.from_pretrained(d))
        return cache[kind]

    return get


def _llama(bundle, **kwargs):
    from edgephi.formats.gguf import quiet_llama_logs

    quiet_llama_logs()
    return llama_cpp.Llama(str(next((bundle / "gguf").glob("*.gguf"))), n_ctx=256, n_threads=2, verbose=False,
                           **kwargs)


@pytest.mark.parametrize("kind", ["phi4", "phi4-mini-reasoning"])
def test_tokenizer_json_is_openais_bpe(kind):
    """The tokenizer.json built from the ranks encodes as OpenAI's BPE does (bpe-openai's own encoder)."""
    import bpe_openai
    from tokenizers import Tokenizer as HFTokenizer

    ours = HFTokenizer.from_str(tv.tokenizer_json(kind))
    ref = bpe_openai.get_encoding(ENCODING[kind])
    bad = [t for t in PLAIN if ours.encode(t, add_special_tokens=False).ids != ref.encode(t, disallowed_special=())]
    assert not bad, f"{len(bad)}/{len(PLAIN)} differ, e.g. {bad[:3]}"


def test_special_tokens_and_stop_ids(tokenizers):
    phi4 = tokenizers("phi4")[1]
    assert phi4.vocab_size == 100352
    assert [phi4.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|im_sep|>",
                                          "<|endofprompt|>", "<|dummy_0|>", "<|dummy_85|>", "<|dummy_87|>")] == \
        [100257, 100264, 100265, 100266, 100276, 100256, 100349, 100351]
    assert (phi4.bos_id, phi4.eos_id, phi4.stop_ids) == (100257, 100265, {100257, 100265})
    mini = tokenizers("phi4-mini-reasoning")[1]
    assert [mini.token_to_id(t) for t in ("<|endoftext|>", "<|assistant|>", "<|end|>", "<|user|>", "<|system|>")] \
        == [199999, 200019, 200020, 200021, 200022]
    assert mini.stop_ids == {199999, 200019, 200020} and mini.token_to_id("<think>") is None  # plain text


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_reader_gives_the_same_ids(variant, tokenizers):
    """edgephi, HF tokenizers, transformers and llama.cpp (the exported GGUF) agree on every string -- but llama.cpp
    on Phi-4-mini's text with combining marks: its "gpt-4o" regex (what its own converter names the o200k
    pre-tokenizer) leaves \\p{M} out of the letter classes, unlike o200k's (Khmer, Devanagari split differently)."""
    from tokenizers import Tokenizer as HFTokenizer

    bundle, ours, tf = tokenizers(KIND[variant])
    hf = HFTokenizer.from_file(str(bundle / "tokenizer.json"))
    llm = _llama(bundle, vocab_only=True)
    assert llm.metadata["tokenizer.ggml.pre"] == PRE[variant]
    differ = []
    for text in PLAIN + SPECIAL[KIND[variant]]:
        ids = ours.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False).ids == tf.encode(text, add_special_tokens=False), text
        assert ours.decode(ids) == text == llm.detokenize(ids, special=True).decode()
        if llm.tokenize(text.encode(), add_bos=False, special=True) != ids:
            differ.append(text)
    assert all(_mark_after_letter(t) for t in differ), differ
    assert bool(differ) == (variant == "phi-4-mini-reasoning"), "llama.cpp's gpt-4o regex changed: update the test"


def _mark_after_letter(text: str) -> bool:
    cat = [unicodedata.category(c)[0] for c in text]
    return any(a == "L" and b == "M" for a, b in zip(cat, cat[1:]))


@pytest.mark.parametrize("kind", ["phi4", "phi4-reasoning", "phi4-mini-reasoning"])
def test_chat_templates_render_as_transformers(kind, tokenizers):
    _, ours, tf = tokenizers(kind)
    theirs = tf.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True) == theirs
    assert theirs.endswith({"phi4-mini-reasoning": "<|assistant|>"}.get(kind, "<|im_start|>assistant<|im_sep|>"))
    assert ("<think> {Thought section} </think>" in theirs) == (kind == "phi4-reasoning")


@pytest.mark.parametrize("variant", VARIANTS)
def test_export_matches_transformers(variant, tiny_checkpoint, onnx32, tiny_bundle, reference_model):
    """ONNX fp32 within 0.1 % and the bundle's GGUF f16 read by plain llama-cpp-python within 2 % of transformers'
    logits, the same greedy tokens."""
    from edgephi.backends.onnx import OnnxSession
    from edgephi.spec import PhiSpec

    ckpt = tiny_checkpoint(variant)
    spec = PhiSpec.from_hf_config(ckpt)
    prompt = tiny.random_prompt(PROMPT, spec.vocab_size, seed=3)  # past LongRoPE's switch at 64
    ref_toks, ref_logits = tiny.reference_greedy(reference_model(ckpt), prompt, STEPS)
    err = lambda got: float(np.abs(got - ref_logits).max() / np.abs(ref_logits).max())  # noqa: E731
    toks, logits = tiny.session_greedy(OnnxSession(onnx32(variant), n_ctx=128, threads=1), prompt, STEPS)
    assert err(logits) <= 1e-3 and toks == ref_toks
    llm = _llama(tiny_bundle(variant), logits_all=True)
    llm.eval(prompt)
    logits, toks = [], []
    for _ in range(STEPS):
        logits.append(np.array(llm.scores[llm.n_tokens - 1]))
        toks.append(int(np.argmax(logits[-1])))
        llm.eval([toks[-1]])
    assert err(np.stack(logits)) <= 2e-2 and toks == ref_toks


# ---- the <think> block --------------------------------------------------------------------------------------------
ANSWER = "  <think>\nLet me add: 2+2.\n</think>\n\nIt is 4, not <think> 5."


@pytest.mark.parametrize("text, in_reasoning, want", [
    (ANSWER, False, ("Let me add: 2+2.\n", "It is 4, not <think> 5.")),
    ("Hello <think>x</think>", False, ("", "Hello <think>x</think>")),  # a block only opens an answer
    (" \n plain answer", False, ("", " \n plain answer")),  # a model that does not reason: unchanged
    ("\nthe prompt opened it</think> ok", True, ("the prompt opened it", "ok")),
    ("<think>never closed", False, ("never closed", "")),
    ("<thin", False, ("", "<thin")),
    ("<think></think>", False, ("", "")),
])
def test_splitter(text, in_reasoning, want):
    assert ReasoningSplitter(in_reasoning).split(text) == want
    rng = random.Random(0)
    for _ in range(100):  # any split of the stream gives the same parts
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randrange(12))))
        sp, got = ReasoningSplitter(in_reasoning), ["", ""]
        for a, b in zip([0] + cuts, cuts + [len(text)]):
            got = [g + p for g, p in zip(got, sp.feed(text[a:b]))]
        assert tuple(g + p for g, p in zip(got, sp.flush())) == want
    assert ReasoningSplitter.for_prompt("<|assistant|><think>\n").state == "reasoning"


def _scripted(model, pieces):
    def gen(ids, **kwargs):
        for k, piece in enumerate(pieces):
            last = k == len(pieces) - 1
            yield GenerationResponse(text=piece, token=None, prompt_tokens=len(ids), generation_tokens=k,
                                     ttft=0.0, prompt_tps=0.0, generation_tps=0.0, peak_rss_mb=0.0,
                                     finish_reason="stop" if last else None)
    model._gen = gen


def test_chat_shows_or_hides_the_thinking(tiny_bundle):
    import edgephi

    model = edgephi.load(tiny_bundle("phi-4-mini-reasoning"), format="onnx", device="cpu")
    raw = "<think>\nLet me add.\n</think>\n\nIt is 4."
    try:
        for thinking, want in (("show", raw), ("hide", "It is 4.")):
            _scripted(model, ["<", "think>\nLet me", " add.\n</th", "ink>\n\nIt is", " 4.", ""])
            steps = list(model.chat("2+2?", thinking=thinking))
            assert "".join(r.reasoning for r in steps) == "Let me add.\n"
            assert "".join(r.text for r in steps) == want
            assert model.messages[-1]["content"] == raw  # the conversation keeps what the model generated
        with pytest.raises(ValueError, match="thinking"):
            model.chat("x", thinking="maybe")
    finally:
        model.close()


def test_special_think_tokens_survive_skipping(tmp_path):
    """A vocabulary with <think>/</think> as special tokens: the streamed text keeps them (the splitter needs them),
    while other special tokens are still skipped."""
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    hf = HFTokenizer(BPE(vocab={c: i for i, c in enumerate(tv.byte_to_unicode().values())}, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(t, normalized=False, special=True)
                           for t in ("<|endoftext|>", "<think>", "</think>")])
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.reasoning_ids == {257, 258}
    ids = tok.encode("<think>a</think>b<|endoftext|>")
    det = tok.detokenizer(skip_special_tokens=True)
    assert "".join(det.add(i) for i in ids) + det.flush() == "<think>a</think>b"


def test_cli_has_the_thinking_flag():
    from edgephi.cli import build_parser

    for cmd in (["run", "b", "-p", "x"], ["chat", "b"]):
        assert build_parser().parse_args(cmd + ["--thinking", "hide"]).thinking == "hide"
        assert build_parser().parse_args(cmd).thinking == "show"
