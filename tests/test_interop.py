"""The same conversation gives the same tokens in every client that reads a bundle, with no edgephi code on their
side: transformers (AutoTokenizer on the bundle folder), onnxruntime-genai (its own tokenizer and chat template on
onnx/) and llama-cpp-python (create_chat_completion on the GGUF), for a tiny model of every family and the
built-in model.  The stop set is the same in manifest.json, genai_config.json and what llama.cpp stops on.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from readonly import tree_hash

og = pytest.importorskip("onnxruntime_genai")
llama_cpp = pytest.importorskip("llama_cpp")

import tiny  # noqa: E402
from edgephi.export.bundle import export_bundle  # noqa: E402

# the Phi-4 family with their real vocabularies (cl100k, o200k) and templates, Phi-4-reasoning's {% generation %} too
VARIANTS = list(tiny.VARIANTS) + ["default", "phi-4", "phi-4-reasoning", "phi-4-mini-reasoning"]
CONVERSATION = [{"role": "user", "content": "Write a loop.\nThanks"},
                {"role": "assistant", "content": "for i in range(3):\n    print(i)  # done"},
                {"role": "user", "content": "And  a while loop?"}]
ANSWER_TOKENS = 8


@pytest.fixture(scope="module")
def bundle(tiny_bundle):
    return tiny_bundle  # ONNX + GGUF at 16 bits, exported once per session (conftest.py)


def _transformers_ids(path: Path) -> list[int]:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(path).apply_chat_template(CONVERSATION, add_generation_prompt=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def _genai_ids(path: Path) -> list[int]:
    tok = og.Tokenizer(og.Model(str(path / "onnx")))
    text = tok.apply_chat_template(json.dumps(CONVERSATION), add_generation_prompt=True)
    return [int(i) for i in tok.encode(text)]


def _llama(path: Path):
    gguf = next((path / "gguf").glob("*.gguf"))
    return llama_cpp.Llama(str(gguf), n_ctx=256, n_threads=2, verbose=False)


def _llama_chat_ids(llm) -> list[int]:
    """The prompt create_chat_completion hands to the model (its chat handler renders and tokenizes)."""
    seen = {}

    def capture(prompt, **kwargs):
        seen["ids"] = list(prompt)
        raise StopIteration

    original, llm.create_completion = llm.create_completion, capture
    try:
        llm.create_chat_completion(messages=CONVERSATION, max_tokens=1)
    except StopIteration:
        pass
    finally:
        llm.create_completion = original
    return seen["ids"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_client_sees_the_prompt_transformers_sees(variant, bundle):
    import edgephi

    path = bundle(variant)
    want = _transformers_ids(path)
    model = edgephi.load(path, format="onnx")
    try:
        assert model.tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=True) == want
        model.messages = CONVERSATION[:-1]
        list(model.chat(CONVERSATION[-1]["content"], max_tokens=1))
        assert model._cached[:len(want)] == want  # what the session evaluated for the prompt
    finally:
        model.close()
    assert _genai_ids(path) == want, "onnxruntime-genai's own tokenizer and template"
    assert _llama_chat_ids(_llama(path)) == want, "llama.cpp's create_chat_completion"


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_stop_set_is_the_same_everywhere(variant, bundle):
    path = bundle(variant)
    stops = set(json.loads((path / "manifest.json").read_text())["stop_ids"])
    genai = json.loads((path / "onnx" / "genai_config.json").read_text())["model"]["eos_token_id"]
    assert set(genai if isinstance(genai, list) else [genai]) == stops
    llm = _llama(path)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    eog = {i for i in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, i)}
    assert eog == stops


@pytest.mark.parametrize("variant", ["phi-2", "phi-3-mini-4k", "phi-4-mini", "default"])
def test_same_greedy_answer_in_each_engine_and_its_own_client(variant, bundle):
    """The same file through edgephi and through the engine's own client (its tokenizer, template and stop rules):
    the same greedy answer, token for token; and running leaves the bundle byte-identical.  (Texts are compared
    only where they are valid UTF-8: a random model emits partial byte sequences, which the clients render
    differently -- onnxruntime-genai ends its string there, llama-cpp-python drops them, edgephi writes U+FFFD.)"""
    import edgephi

    path = bundle(variant)
    before = tree_hash(path)
    ours = {}
    for fmt in ("onnx", "gguf"):
        model = edgephi.load(path, format=fmt, device="cpu")
        model.messages = [dict(m) for m in CONVERSATION[:-1]]
        steps = list(model.chat(CONVERSATION[-1]["content"], max_tokens=ANSWER_TOKENS))
        ours[fmt] = ([r.token for r in steps if r.token is not None], "".join(r.text for r in steps))
        model.close()
    stops = set(json.loads((path / "manifest.json").read_text())["stop_ids"])

    def until_stop(ids):
        return ids[:next((k for k, t in enumerate(ids) if t in stops), len(ids))]

    ids = _genai_ids(path)
    model = og.Model(str(path / "onnx"))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + ANSWER_TOKENS, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.array(ids, dtype=np.int32))
    theirs = []
    while not gen.is_done():
        gen.generate_next_token()
        theirs.append(int(gen.get_next_tokens()[0]))
    assert until_stop(theirs) == ours["onnx"][0], "onnxruntime-genai"

    llm, generated = _llama(path), []
    plain_generate = llm.generate

    def recording(*args, **kwargs):
        for tok in plain_generate(*args, **kwargs):
            generated.append(int(tok))
            yield tok

    llm.generate = recording
    reply = llm.create_chat_completion(messages=CONVERSATION, max_tokens=ANSWER_TOKENS, temperature=0.0,
                                       repeat_penalty=1.0, top_k=1)
    assert until_stop(generated) == ours["gguf"][0], "llama.cpp's create_chat_completion"
    if "\ufffd" not in ours["gguf"][1]:  # the clients disagree only on the answer's leading space (SentencePiece
        # writes one before the first word: transformers' decoder and edgephi drop it, llama.cpp keeps it; with
        # byte-level BPE llama-cpp-python drops it and the others keep it)
        assert reply["choices"][0]["message"]["content"].lstrip() == ours["gguf"][1].lstrip()
    assert tree_hash(path) == before


def test_onnx_folder_reads_as_a_model_folder(bundle):
    """Beside the graph: config.json and generation_config.json, as Optimum's ORTModelForCausalLM and
    transformers.js expect; transformers reads the folder's config and tokenizer."""
    from transformers import AutoConfig, AutoTokenizer

    onnx = bundle("phi-3-mini-4k") / "onnx"
    for name in ("model.onnx", "model.onnx.data", "genai_config.json", "config.json", "generation_config.json",
                 "tokenizer.json", "tokenizer_config.json"):
        assert (onnx / name).is_file(), name
    assert AutoConfig.from_pretrained(onnx).model_type == "phi3"
    assert AutoTokenizer.from_pretrained(onnx).apply_chat_template(CONVERSATION, tokenize=False)


@pytest.mark.parametrize("name, rstrip", [("my-model", True), ("Phi-3-mini-custom", False)])
def test_llama_cpp_strips_whitespace_where_the_tokenizer_does(name, rstrip, tiny_checkpoint, tmp_path):
    """llama.cpp strips the whitespace after special tokens only when general.name names Phi-3; the exporter picks
    the name so that this equals the tokenizer's own rstrip flags (a Phi-3 tokenizer in a folder named otherwise,
    and a Phi-3-named model whose tokenizer does not strip)."""
    import shutil

    ckpt = tmp_path / name
    shutil.copytree(tiny_checkpoint("phi-3-mini-4k"), ckpt)
    if not rstrip:
        tj = json.loads((ckpt / "tokenizer.json").read_text())
        for t in tj["added_tokens"]:
            t["rstrip"] = False
        (ckpt / "tokenizer.json").write_text(json.dumps(tj))
        (ckpt / "tokenizer.model").unlink()  # keep one source of flags: tokenizer.json
        cfg = json.loads((ckpt / "tokenizer_config.json").read_text())
        for t in cfg["added_tokens_decoder"].values():
            t["rstrip"] = False
        (ckpt / "tokenizer_config.json").write_text(json.dumps(cfg))
    out = tmp_path / "bundle"
    export_bundle(str(ckpt), out, formats=("gguf",), bits=16)
    llm = _llama(out)
    assert ("phi3" in llm.metadata["general.name"].lower().replace("-", "")) == rstrip
    assert _llama_chat_ids(llm) == _transformers_ids(out)
