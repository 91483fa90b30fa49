"""edgephi.tokenizer against llama.cpp's tokenizer test vectors (tests/data, MIT), streaming, chat, errors."""
from __future__ import annotations

import json
import random
import shutil

import pytest

import vocab_build as vb
from edgephi.tokenizer import Tokenizer

PHI3_VECTORS = vb.read_vectors(vb.PHI3_VOCAB)
GPT2_VECTORS = vb.read_vectors(vb.GPT2_VOCAB)


@pytest.fixture(scope="session")
def phi3_dir(tmp_path_factory):
    return vb.write_phi3_tokenizer(tmp_path_factory.mktemp("phi3-tok"))


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory):
    return vb.write_gpt2_tokenizer(tmp_path_factory.mktemp("gpt2-tok"), codegen_whitespace=False)


@pytest.fixture(scope="session")
def phi2_dir(tmp_path_factory):
    return vb.write_gpt2_tokenizer(tmp_path_factory.mktemp("phi2-tok"))


@pytest.fixture(scope="session")
def phi3_hf(phi3_dir):
    return Tokenizer.from_dir(phi3_dir, prefer="tokenizers")


@pytest.fixture(scope="session")
def phi3_sp(phi3_dir):
    return Tokenizer.from_dir(phi3_dir, prefer="sentencepiece")


@pytest.fixture(scope="session")
def gpt2(gpt2_dir):
    return Tokenizer.from_dir(gpt2_dir)


@pytest.fixture(scope="session")
def phi2(phi2_dir):
    return Tokenizer.from_dir(phi2_dir)


@pytest.fixture(params=["phi3_hf", "phi3_sp", "gpt2", "phi2"])
def any_tok(request):
    return request.getfixturevalue(request.param)


def _vectors_for(name):
    return PHI3_VECTORS if name.startswith("phi3") else GPT2_VECTORS


def test_vector_files_parse():
    assert len(PHI3_VECTORS) == 46 and len(GPT2_VECTORS) == 46
    assert PHI3_VECTORS[0][0] == "ied 4 ½ months" and PHI3_VECTORS[2] == ("", [])
    assert [t for t, _ in PHI3_VECTORS] == [t for t, _ in GPT2_VECTORS]


@pytest.mark.parametrize("name", ["phi3_hf", "phi3_sp", "gpt2"])
def test_llamacpp_vectors(name, request):
    tok = request.getfixturevalue(name)
    vectors = _vectors_for(name)
    bad = [(text, want, tok.encode(text)) for text, want in vectors if tok.encode(text) != want]
    detail = "\n".join(f"  {t!r}: want {w} got {g}" for t, w, g in bad[:5])
    assert not bad, f"{name}: {len(vectors) - len(bad)}/{len(vectors)} vectors match\n{detail}"


def test_transformers_reads_same_ids(phi3_dir, phi2_dir):
    transformers = pytest.importorskip("transformers")
    ht = transformers.AutoTokenizer.from_pretrained(str(phi3_dir))
    ok = sum(ht.encode(t, add_special_tokens=False) == ids for t, ids in PHI3_VECTORS)
    assert ok == len(PHI3_VECTORS), f"transformers: {ok}/{len(PHI3_VECTORS)} vectors match"
    msgs = [{"role": "user", "content": "Hi"}]
    ours = Tokenizer.from_dir(phi3_dir)
    assert ht.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        ours.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    theirs = ht.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
    theirs = list(theirs["input_ids"] if hasattr(theirs, "keys") else theirs)
    assert ours.apply_chat_template(msgs, add_generation_prompt=True) == theirs
    h2 = transformers.AutoTokenizer.from_pretrained(str(phi2_dir))
    assert h2.encode("    return x\t\t") == Tokenizer.from_dir(phi2_dir).encode("    return x\t\t")


def test_backends_agree_on_decode(phi3_hf, phi3_sp):
    for text, ids in PHI3_VECTORS:
        assert phi3_hf.decode(ids) == phi3_sp.decode(ids) == text
    assert phi3_hf.vocab_size == phi3_sp.vocab_size == 32011
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.choice([rng.randrange(32011), rng.randrange(3, 259)]) for _ in range(rng.randrange(1, 12))]
        for skip in (False, True):
            assert phi3_hf.decode(ids, skip) == phi3_sp.decode(ids, skip), ids


def _stream(tok, ids, skip=False):
    det = tok.detokenizer(skip_special_tokens=skip)
    pieces = [det.add(i) for i in ids]
    pieces.append(det.flush())
    assert det.text == "".join(pieces)
    return pieces


@pytest.mark.parametrize("name", ["phi3_hf", "phi3_sp", "gpt2"])
def test_streamed_decode_equals_decode(name, request):
    tok = request.getfixturevalue(name)
    for text, ids in _vectors_for(name):
        want = tok.decode(ids)
        assert "".join(_stream(tok, ids)) == want, text
        if name.startswith("phi3"):
            assert want == text  # SentencePiece decode strips only the dummy-prefix space
        ids_bos = tok.encode(text, add_special_tokens=True)
        for skip in (False, True):
            assert "".join(_stream(tok, ids_bos, skip)) == tok.decode(ids_bos, skip)


def test_stream_holds_partial_utf8(phi3_hf, phi3_sp, gpt2):
    for tok in (phi3_hf, phi3_sp):
        ids = tok.encode("a 🦙 b")  # 🦙 is four byte-fallback pieces
        pieces = _stream(tok, ids)
        assert all("\ufffd" not in p for p in pieces) and any(p.startswith("🦙") for p in pieces)
        assert "".join(pieces) == "a 🦙 b"
    ids = gpt2.encode("我想在apple工作")
    pieces = _stream(gpt2, ids)
    assert all("\ufffd" not in p for p in pieces) and "".join(pieces) == "我想在apple工作"


@pytest.mark.parametrize("name", ["phi3_hf", "phi3_sp", "gpt2", "phi2"])
def test_stream_random_ids_exact(name, request):
    tok = request.getfixturevalue(name)
    rng = random.Random(1)
    byte_ids = list(range(3, 259)) if name.startswith("phi3") else list(range(188, 256))
    for _ in range(300):
        ids = [rng.choice([rng.randrange(tok.vocab_size), rng.choice(byte_ids), rng.choice(byte_ids)])
               for _ in range(rng.randrange(1, 16))]
        for skip in (False, True):
            assert "".join(_stream(tok, ids, skip)) == tok.decode(ids, skip), ids


def test_special_tokens_in_text(phi3_hf, phi3_sp):
    text = "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n"
    a, b = phi3_hf.encode(text), phi3_sp.encode(text)
    assert a == b
    for tok_text, tid in [("<|system|>", 32006), ("<|end|>", 32007), ("<|user|>", 32010), ("<|assistant|>", 32001)]:
        assert tid in a and phi3_hf.token_to_id(tok_text) == phi3_sp.token_to_id(tok_text) == tid
        assert phi3_hf.id_to_token(tid) == phi3_sp.id_to_token(tid) == tok_text
    assert phi3_hf.decode(a) == phi3_sp.decode(a)
    assert phi3_hf.decode(a, skip_special_tokens=True) == phi3_sp.decode(a, skip_special_tokens=True)


def test_bos(phi3_hf, phi3_sp, phi2):
    for tok in (phi3_hf, phi3_sp):
        assert tok.bos_id == 1 and tok.add_bos_token
        assert tok.encode("Hello", add_special_tokens=True) == [1] + tok.encode("Hello")
    assert phi2.bos_id == phi2.eos_id == 50256 and not phi2.add_bos_token
    assert phi2.encode("Hello", add_special_tokens=True) == phi2.encode("Hello") == [15496]


def test_phi2_whitespace_tokens(phi2, gpt2):
    four = phi2.token_to_id(" " * 4)
    assert phi2.token_to_id(" " * 31) == 50257 and phi2.token_to_id(" " * 2) == 50286
    assert phi2.token_to_id("\t" * 9) == 50287 and phi2.token_to_id("\t\t") == 50294
    assert four == 50284 and phi2.vocab_size == 50295
    ids = phi2.encode("    return x")
    assert ids[0] == four and phi2.decode(ids) == "    return x"
    assert phi2.encode("\t\t") == [50294]
    ids = phi2.encode("def f(x):\n        return x\n\t\tpass")
    assert phi2.token_to_id(" " * 8) in ids and 50294 in ids
    assert phi2.decode(ids) == "def f(x):\n        return x\n\t\tpass"
    assert all(i < 50257 for i in gpt2.encode("    return x"))  # plain GPT-2 has no such tokens


def test_chat_template_phi3(phi3_hf, phi3_sp):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}]
    want = ("<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello!<|end|>\n"
            "<|user|>\n2+2?<|end|>\n<|assistant|>\n")
    for tok in (phi3_hf, phi3_sp):
        assert tok.chat_template == vb.PHI3_CHAT_TEMPLATE
        assert tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) == want
        assert tok.apply_chat_template(msgs[:2], tokenize=False) == (
            "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|endoftext|>")


def test_chat_template_fallback(phi2):
    assert phi2.chat_template is None
    assert phi2.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                    tokenize=False) == "<|user|>\nHi<|end|>\n<|assistant|>\n"


@pytest.mark.parametrize("msgs, where", [
    ([{"role": "user", "content": "a"}, {"role": "wizard", "content": "b"}], "messages[1]"),
    ([{"role": "user"}], "messages[0]"),
    ([{"content": "x"}], "messages[0]"),
    ([{"role": "user", "content": "a"}, "hello"], "messages[1]"),
])
def test_chat_bad_messages(phi3_hf, msgs, where):
    with pytest.raises(ValueError, match=where.replace("[", r"\[").replace("]", r"\]")):
        phi3_hf.apply_chat_template(msgs)


def test_chat_template_is_sandboxed_and_can_raise(tmp_path, phi3_dir):
    d = tmp_path / "tok"
    shutil.copytree(phi3_dir, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{{ raise_exception('no system role') }}"
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="no system role"):
        Tokenizer.from_dir(d).apply_chat_template([{"role": "user", "content": "x"}])
    cfg["chat_template"] = "{{ messages.append(1) }}"
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="chat template failed: SecurityError"):
        Tokenizer.from_dir(d).apply_chat_template([{"role": "user", "content": "x"}])


@pytest.mark.parametrize("template, words", [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "items"),
    ("{{ 'x' * 100000000 }}", "'\\*' would build"),
    ("{{ 2 ** 100000 }}", "exponent"),
    ("{% for i in range(100000) %}{{ messages[0]['content'] * 100 }}{% endfor %}", "output passes"),
    ("{{ 1 / 0 }}", "ZeroDivisionError"),
    ("{{ messages[0].nope.deeper }}", "UndefinedError"),
    ("{% for %}", "does not compile"),
])
def test_hostile_or_broken_templates_are_clean_errors(tmp_path, phi3_dir, template, words):
    """A template is untrusted input: bounded work and output, and every failure a ValueError naming it."""
    d = tmp_path / "tok"
    shutil.copytree(phi3_dir, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = template
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=words):
        Tokenizer.from_dir(d).apply_chat_template([{"role": "user", "content": "x" * 100}])


def test_stop_ids(phi3_hf, phi3_sp, phi2):
    for tok in (phi3_hf, phi3_sp):
        assert {32000, 32001, 32007} <= tok.stop_ids and tok.eos_id == 32000
        assert isinstance(tok.stop_ids, frozenset)
    assert phi2.stop_ids == frozenset({50256})


@pytest.mark.parametrize("eos", [32007, [32000, 32007], [2]])
def test_generation_config_eos(tmp_path, phi3_dir, eos):
    d = tmp_path / "tok"
    shutil.copytree(phi3_dir, d)
    (d / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": eos}))
    tok = Tokenizer.from_dir(d)
    extra = {eos} if isinstance(eos, int) else set(eos)
    assert tok.stop_ids == frozenset({32000, 32001, 32007} | extra)


def test_missing_files(tmp_path, gpt2_dir):
    with pytest.raises(FileNotFoundError, match="tokenizer.json.*tokenizer.model") as e:
        Tokenizer.from_dir(tmp_path)
    assert str(tmp_path) in str(e.value)
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        Tokenizer.from_dir(gpt2_dir, prefer="sentencepiece")
    with pytest.raises(FileNotFoundError, match="nope"):
        Tokenizer.from_dir(tmp_path / "nope")
    with pytest.raises(ValueError, match="prefer"):
        Tokenizer.from_dir(gpt2_dir, prefer="tiktoken")


def test_corrupt_files(tmp_path, phi3_dir):
    d = tmp_path / "tok"
    shutil.copytree(phi3_dir, d)
    (d / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_dir(d)
    (d / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "Nope"}}')
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_dir(d)
    (d / "tokenizer.model").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="tokenizer.model"):
        Tokenizer.from_dir(d, prefer="sentencepiece")
    (d / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        Tokenizer.from_dir(d, prefer="tokenizers")


def test_sentencepiece_model_proto(phi3_dir):
    from sentencepiece import sentencepiece_model_pb2 as spm_pb2

    m = spm_pb2.ModelProto()
    m.ParseFromString((phi3_dir / "tokenizer.model").read_bytes())
    assert m.trainer_spec.model_type == spm_pb2.TrainerSpec.BPE and m.trainer_spec.byte_fallback
    assert len(m.pieces) == 32000 and m.pieces[0].piece == "<unk>" and m.pieces[3].piece == "<0x00>"
    assert m.normalizer_spec.add_dummy_prefix and not m.normalizer_spec.remove_extra_whitespaces


def test_builders_deterministic(tmp_path, phi3_dir, phi2_dir):
    a = vb.write_phi3_tokenizer(tmp_path / "a")
    b = vb.write_gpt2_tokenizer(tmp_path / "b")
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        assert (a / name).read_bytes() == (phi3_dir / name).read_bytes(), name
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (b / name).read_bytes() == (phi2_dir / name).read_bytes(), name
    assert not (b / "tokenizer.model").exists() and not (a / "generation_config.json").exists()


def test_no_torch_import():
    import os
    import subprocess
    import sys
    from pathlib import Path

    import edgephi.tokenizer

    root = str(Path(edgephi.tokenizer.__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    code = "import sys, edgephi.tokenizer; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
