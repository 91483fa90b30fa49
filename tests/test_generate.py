"""generate/stream/chat logic over a Session, checked with a deterministic toy session."""
from __future__ import annotations

import numpy as np
import pytest

import vocab_build
from edgephi.api import Model
from edgephi.backends.base import ContextFullError, Session
from edgephi.generate import stream
from edgephi.select import Choice
from edgephi.tokenizer import Tokenizer

WORDS = [450, 4799, 1701, 29879, 26024, 975, 278, 17366, 11203, 29889]  # ordinary Phi-3 pieces


class ToySession(Session):
    """Next token = a function of the whole cached sequence: a wrong cache gives different tokens."""

    def __init__(self, vocab: int, n_ctx: int = 512):
        self.vocab, self.n_ctx, self.tokens = vocab, n_ctx, []
        self.n_past = self.n_evaluated = 0

    def _logits(self):
        h = (sum((i + 1) * t for i, t in enumerate(self.tokens)) * 2654435761) % len(WORDS)
        out = np.zeros(self.vocab, dtype=np.float32)
        out[WORDS[h]] = 5.0
        return out

    def forward(self, ids, all_logits=False):
        self.check_room(len(ids))
        rows = []
        for t in ids:
            self.tokens.append(int(t))
            rows.append(self._logits())
        self.n_past = len(self.tokens)
        self.n_evaluated += len(ids)
        return np.stack(rows) if all_logits else rows[-1]

    def rewind(self, n):
        del self.tokens[n:]
        self.n_past = len(self.tokens)


class ToyBackend:
    name, format = "toy", "onnx"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return Tokenizer.from_dir(vocab_build.write_phi3_tokenizer(tmp_path_factory.mktemp("tok")))


def fresh_greedy(prompt, n):
    s = ToySession(32064)
    out = []
    logits = s.forward(prompt)
    for _ in range(n):
        t = int(np.argmax(logits))
        out.append(t)
        logits = s.forward([t])
    return out


def test_stream_is_greedy_and_text_is_exact(tok):
    s = ToySession(32064)
    prompt = tok.encode("Hello there", add_special_tokens=True)
    rs = list(stream(s, tok, prompt, max_tokens=10))
    toks = [r.token for r in rs if r.token is not None]
    assert toks == fresh_greedy(prompt, 10)
    assert "".join(r.text for r in rs) == tok.decode(toks, skip_special_tokens=True)
    assert rs[-1].finish_reason == "length" and rs[-1].generation_tokens == 10


def test_stop_ids_and_stop_strings(tok):
    prompt = tok.encode("Hello there", add_special_tokens=True)
    expected = fresh_greedy(prompt, 10)
    k = expected.index(expected[3])  # where that token first appears
    rs = list(stream(ToySession(32064), tok, prompt, max_tokens=10, stop_ids={expected[3]}))
    assert [r.token for r in rs if r.token is not None] == expected[:k] and rs[-1].finish_reason == "stop"
    full = tok.decode(expected, skip_special_tokens=True)
    needle = full[len(full) // 2: len(full) // 2 + 3]
    rs = list(stream(ToySession(32064), tok, prompt, max_tokens=10, stop_strings=[needle]))
    text = "".join(r.text for r in rs)
    assert text == full[: full.index(needle)] and rs[-1].finish_reason == "stop"


def test_prompt_past_the_context_is_refused(tok):
    with pytest.raises(ContextFullError, match="context"):
        list(stream(ToySession(32064, n_ctx=8), tok, list(range(100, 120))))


def test_chat_second_turn_evaluates_only_new_tokens(tok):
    session = ToySession(32064)
    model = Model("toy", manifest=type("M", (), {"stop_ids": [32000, 32007]})(),
                  choice=Choice(ToyBackend, "cpu"), session=session, tokenizer=tok)
    first = list(model.chat("What is a prime number?", max_tokens=6))
    n1 = session.n_evaluated
    turn1_tokens = len(tok.apply_chat_template(model.messages[:1], add_generation_prompt=True))
    assert n1 == turn1_tokens + 5  # the prompt, then every generated token but the last
    second = list(model.chat("And 7?", max_tokens=6))
    full = tok.apply_chat_template(model.messages[:3], add_generation_prompt=True)
    n2 = session.n_evaluated - n1
    assert n2 == second[-1].prompt_tokens + 5
    # only the new turn is evaluated: its own tokens, plus the first answer's last token, which was sampled
    # (max_tokens reached) but never fed to the model
    prefix = tok.apply_chat_template(model.messages[:2], tokenize=False)
    answer = model.messages[1]["content"]
    suffix = tok.apply_chat_template(model.messages[:3], add_generation_prompt=True,
                                     tokenize=False)[prefix.rfind(answer) + len(answer):]
    assert suffix.startswith("<|end|>") and "And 7?" in suffix
    assert second[-1].prompt_tokens == len(tok.encode(suffix)) + 1
    assert len(session.tokens) == n1 + n2 - 0 and session.tokens[:turn1_tokens] == full[:turn1_tokens]
    # and the answer equals a fresh session's over the whole conversation as the chat holds it: the first answer
    # as the ids it was generated as (re-encoding its text may split it otherwise: "s" "s" -> "ss")
    assert first[-1].generation_tokens == 6
    answer_ids = [r.token for r in first if r.token is not None]
    conversation = full[:turn1_tokens] + answer_ids + tok.encode(suffix)
    assert [r.token for r in second if r.token is not None] == fresh_greedy(conversation, 6)[:6]
    model.reset()
    assert model.messages == []


def test_bad_settings_and_text_are_refused_at_the_call(tok):
    """Refused when chat()/stream() is called, before the turn is recorded or the cache touched."""
    model = Model("toy", manifest=type("M", (), {"stop_ids": [32000]})(), choice=Choice(ToyBackend, "cpu"),
                  session=ToySession(32064), tokenizer=tok)
    for kwargs, words in (({"max_tokens": 0}, "max_tokens=0"), ({"temperature": float("nan")}, "temperature"),
                          ({"top_p": 2.0}, "top_p")):
        with pytest.raises(ValueError, match=words):
            model.chat("hello", **kwargs)
        with pytest.raises(ValueError, match=words):
            model.stream("hello", **kwargs)
    with pytest.raises(ValueError, match="not valid UTF-8"):
        model.chat("caf\udce9")
    with pytest.raises(ValueError, match="not valid UTF-8"):
        model.generate("caf\udce9")
    assert model.messages == [] and model.session.n_evaluated == 0
