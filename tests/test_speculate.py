"""Speculative decoding's loop (edgephi/speculate.py, edgephi/drafters.py) over toy sessions: greedy output equals
plain decoding, sampled output follows plain sampling's distribution (a chi-square test, with a biased rule as the
negative control), verify calls never cross the LongRoPE switch, and the cache stays consistent for the next turn.
The formats (ONNX, GGUF, onnx-npu) are checked on tiny exports in test_speculate_formats.py."""
from __future__ import annotations

import math

import numpy as np
import pytest

import vocab_build
from edgephi.api import Model
from edgephi.backends.base import Session
from edgephi.drafters import AdaptiveK, ModelDrafter, NgramDrafter
from edgephi.generate import generate_step, stream
from edgephi.sampling import greedy, make_logits_processors, make_sampler
from edgephi.select import Choice
from edgephi.speculate import Speculator, probabilities
from edgephi.tokenizer import Tokenizer


class TableSession(Session):
    """Logits are a fixed random function of (last two tokens, position): exact next-token probabilities are
    known, calls are recorded, and a wrong cache gives wrong logits."""

    def __init__(self, vocab: int, n_ctx: int = 512, seed: int = 0, scale: float = 1.5, loop: bool = False):
        rng = np.random.default_rng(seed)
        self.table = (rng.standard_normal((vocab, vocab, 4, vocab)) * scale).astype(np.float32)
        if loop:  # a strong preference for repeating the token three back: the text repeats, drafts hit
            for a in range(vocab):
                for b in range(vocab):
                    self.table[a, b, :, (a + b) % vocab] += 6.0
        self.vocab, self.n_ctx, self.tokens, self.calls = vocab, n_ctx, [], []
        self.n_past = self.n_evaluated = 0

    def row(self, tokens) -> np.ndarray:
        return self.table[tokens[-2] if len(tokens) > 1 else 0, tokens[-1], len(tokens) % 4]

    def forward(self, ids, all_logits=False):
        ids = self.check_ids(ids, self.vocab)
        self.check_room(len(ids))
        self.calls.append((self.n_past, len(ids)))
        rows = []
        for t in ids:
            self.tokens.append(int(t))
            rows.append(self.row(self.tokens))
        self.n_past = len(self.tokens)
        self.n_evaluated += len(ids)
        return np.stack(rows) if all_logits else rows[-1]

    def rewind(self, n):
        if not 0 <= n <= self.n_past:
            raise ValueError(n)
        del self.tokens[n:]
        self.n_past = n


def run(session, prompt, n, speculator=None, sampler=greedy, procs=()):
    return [t for t, _ in generate_step(prompt, session, sampler, procs, n, speculator=speculator)]


@pytest.mark.parametrize("loop", [True, False])
def test_greedy_ngram_equals_plain(loop):
    prompt = [1, 2, 3, 1, 2, 3, 4, 1, 2]
    plain = run(TableSession(12, loop=loop), prompt, 60)
    s = TableSession(12, loop=loop)
    spec = Speculator(NgramDrafter())
    # a forward's cost as a model, not the wall clock, so the adaptive draft length is the same on a loaded machine
    spec.control.observe = lambda n, seconds, c=spec.control: AdaptiveK.observe(c, n, 1.0 + 0.05 * n)
    assert run(s, prompt, 60, spec) == plain
    assert s.n_past == len(prompt) + 59  # every yielded token but the last is cached, nothing rejected stays
    assert s.tokens == prompt + plain[:-1]
    if loop:
        assert spec.stats.accepted > 10 and len(s.calls) < 50  # drafts hit: fewer forwards than tokens
    assert 0 <= spec.stats.accepted <= spec.stats.drafted


def test_greedy_with_repetition_penalty_and_a_model_drafter():
    prompt = [5, 6, 7, 5, 6]
    procs = make_logits_processors(1.3)
    plain = run(TableSession(16, loop=True), prompt, 40, procs=procs)
    draft = ModelDrafter(TableSession(16, seed=1, loop=True), 16)  # another model: some drafts right, some wrong
    spec = Speculator(draft)
    assert run(TableSession(16, loop=True), prompt, 40, spec, procs=procs) == plain
    assert 0 < spec.stats.accepted < spec.stats.drafted


@pytest.mark.parametrize("n_ctx, max_tokens", [(30, 100), (512, 7), (25, 1)])
def test_context_and_token_limits_as_plain(n_ctx, max_tokens):
    prompt = [1, 2, 3, 1, 2, 3, 1, 2]
    plain = run(TableSession(8, n_ctx=n_ctx, loop=True), prompt, max_tokens)
    s = TableSession(8, n_ctx=n_ctx, loop=True)
    assert run(s, prompt, max_tokens, Speculator(NgramDrafter())) == plain
    assert max(p + t for p, t in s.calls) <= n_ctx


def test_verify_calls_never_cross_the_longrope_switch():
    prompt = [1, 2, 3, 1, 2, 3, 1, 2]
    s = TableSession(8, loop=True)
    out = run(s, prompt, 80, Speculator(NgramDrafter(), k=8, no_cross=40))
    assert out == run(TableSession(8, loop=True), prompt, 80)
    for start, t in s.calls[1:]:
        assert start + t <= 40 or start >= 40, s.calls  # positions start..start+t-1 on one side of the switch
    assert any(t > 1 for start, t in s.calls if start >= 40) and any(t > 1 for start, t in s.calls[1:] if start < 40)


def test_adaptive_k_grows_on_hits_and_pauses_on_misses():
    c = AdaptiveK(4, 16)
    c.update(4, 4)
    assert c.next_k() == 8
    c.update(8, 8)
    assert c.next_k() == 16
    c.update(16, 16)
    assert c.next_k() == 16  # k_max
    c.update(6, 2)
    assert c.next_k() == 3
    c.update(3, 0)
    assert c.next_k() == 0 and c.next_k() == 1  # one token without drafting
    c.update(1, 0)
    assert [c.next_k() for _ in range(3)] == [0, 0, 1]  # then two


def test_draft_length_is_capped_where_measured_speed_peaks():
    bandwidth_bound, compute_bound = AdaptiveK(16, 16), AdaptiveK(16, 16)
    for n in range(1, 18):
        bandwidth_bound.observe(n, 0.1)  # a CPU decode step reads every weight: 17 tokens cost one
        compute_bound.observe(n, 0.1 * max(1, n / 3))  # past 3 tokens a forward runs at prefill speed
    for c in (bandwidth_bound, compute_bound):
        c.rate = 0.95
    assert bandwidth_bound.next_k() == 16
    assert compute_bound.next_k() == 2  # 3 tokens a forward at the cost of one
    fresh = AdaptiveK(4, 16)
    assert fresh.next_k() == 4  # nothing measured: the acceptance rule alone
    fresh.observe(5, 0.1)
    assert fresh.next_k() == 0  # one plain step, to measure a single token's forward
    fresh.observe(1, 0.1)
    assert fresh.next_k() == 4


def test_ngram_drafter_proposes_what_followed_the_latest_match():
    d = NgramDrafter(max_ngram=3, min_ngram=1)
    assert d.propose([1, 2, 3, 9, 1, 2, 3, 7, 1, 2, 3], 3)[0] == [7, 1, 2]
    assert d.propose([4, 5, 6], 3)[0] == []  # a new sequence: the index starts over
    assert d.propose([4, 5, 6, 4], 2)[0] == [5, 6]
    assert NgramDrafter().propose([4, 5, 6, 4], 2)[0] == []  # by default a single token is not a match
    assert NgramDrafter().propose([8, 4, 5, 6, 4, 5], 2)[0] == [6, 4]


def test_ngram_drafter_continues_a_loop_past_the_end_of_the_text():
    # the latest match of (7, 8) ends two tokens back: the loop of period 2 is copied on, k tokens, not 2
    assert NgramDrafter().propose([1, 7, 8, 7, 8], 5)[0] == [7, 8, 7, 8, 7]
    assert NgramDrafter().propose([5, 1, 2, 3, 1, 2, 3, 1, 2], 7)[0] == [3, 1, 2, 3, 1, 2, 3]


# ---- sampling: the distribution of sequences equals plain sampling's --------------------------------------------
V, PROMPT, GEN, TRIALS = 4, [3, 1, 2, 3, 1], 4, 2500
SETTINGS = dict(temperature=1.0, top_k=3, top_p=0.97, min_p=0.0)
SCALE = 0.6  # flat enough that drafts are often accepted and often rejected


def exact_sequence_probs(session: TableSession) -> np.ndarray:
    """P(sequence of GEN tokens) under plain sampling, by enumeration: (V ** GEN,)."""
    probs = np.zeros(V ** GEN)
    for code in range(V ** GEN):
        seq = [(code // V ** i) % V for i in reversed(range(GEN))]
        p, ctx = 1.0, list(PROMPT)
        for tok in seq:
            p *= probabilities(session.row(ctx), **SETTINGS)[tok]
            ctx.append(tok)
        probs[code] = p
    return probs


def chi_square_exceeds(counts: np.ndarray, probs: np.ndarray, alpha_z: float = 3.719) -> tuple[bool, float, float]:
    """Pearson's chi-square over cells with expected count >= 5 (the rest pooled); critical value at alpha = 1e-4
    by the Wilson-Hilferty approximation.  (exceeds, statistic, critical)."""
    n = counts.sum()
    exp = probs * n
    big = exp >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(exp[big], exp[~big].sum())
    keep = exp > 0
    stat = float((((obs - exp) ** 2)[keep] / exp[keep]).sum())
    df = int(keep.sum()) - 1
    crit = df * (1 - 2 / (9 * df) + alpha_z * math.sqrt(2 / (9 * df))) ** 3
    return stat > crit, stat, crit


def sample_counts(make_speculator, seed0: int) -> np.ndarray:
    counts = np.zeros(V ** GEN, dtype=np.int64)
    for trial in range(TRIALS):
        s = TableSession(V, seed=3, scale=SCALE)
        spec = make_speculator(np.random.default_rng(seed0 + trial))
        sampler = make_sampler(**SETTINGS, seed=seed0 + 10 ** 6 + trial)
        toks = run(s, PROMPT, GEN, spec, sampler=sampler)
        counts[sum(t * V ** i for i, t in enumerate(reversed(toks)))] += 1
    return counts


class BiasedSpeculator(Speculator):
    """Negative control: accepts every draft the target gives any probability (no min(1, p/q) coin)."""

    def _judge(self, tokens, drafts, q, rows, processors):
        out = []
        for i, d in enumerate(drafts):
            if self._p(rows[i])[d] == 0:
                break
            out.append((d, rows[i]))
        return out + [(self._draw(self._p(rows[len(out)])), rows[len(out)])]


@pytest.mark.parametrize("kind", ["ngram", "model"])
def test_speculative_sampling_follows_the_plain_distribution(kind):
    probs = exact_sequence_probs(TableSession(V, seed=3, scale=SCALE))

    def make(rng, cls=Speculator):
        drafter = (NgramDrafter(min_ngram=1) if kind == "ngram"  # 1-grams: many drafts in 4-token answers
                   else ModelDrafter(TableSession(V, seed=4, scale=SCALE), V))
        return cls(drafter, k=3, rng=rng, **SETTINGS)

    specs: list[Speculator] = []
    counts = sample_counts(lambda rng: specs.append(make(rng)) or specs[-1], 0)
    exceeds, stat, crit = chi_square_exceeds(counts, probs)
    assert not exceeds, f"chi-square {stat:.1f} > {crit:.1f}: speculative sampling is biased"
    drafted, accepted = sum(s.stats.drafted for s in specs), sum(s.stats.accepted for s in specs)
    assert drafted > TRIALS and 0.1 * drafted < accepted < 0.9 * drafted  # drafts were made, some rejected
    if kind == "ngram":
        plain = sample_counts(lambda rng: None, 0)
        assert not chi_square_exceeds(plain, probs)[0]  # plain sampling passes the same test
    biased = sample_counts(lambda rng: make(rng, BiasedSpeculator), 0)
    assert chi_square_exceeds(biased, probs)[0], "the test cannot tell a biased acceptance rule apart"


# ---- through the API: stats in the response, the chat's cache after a stop inside a round -------------------------
@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return Tokenizer.from_dir(vocab_build.write_phi3_tokenizer(tmp_path_factory.mktemp("tok")))


class ToyBackend:
    name, format = "toy", "onnx"


WORDS = [450, 4799, 1701, 29879, 26024, 975, 278, 17366]


class WordSession(TableSession):
    """A looping model over ordinary Phi-3 pieces."""

    def __init__(self):
        super().__init__(len(WORDS), loop=True)
        self.vocab = 32064

    def row(self, tokens):
        out = np.full(32064, -10.0, np.float32)
        out[WORDS] = super().row([WORDS.index(t) if t in WORDS else 0 for t in tokens[-2:]])
        return out


def test_stream_reports_drafted_and_accepted_and_chat_keeps_a_consistent_cache(tok):
    words = WORDS
    session = WordSession()
    manifest = type("M", (), {"stop_ids": [words[3]], "spec": None})()
    model = Model("toy", manifest=manifest, choice=Choice(ToyBackend, "cpu"), session=session, tokenizer=tok)
    rs = list(model.stream([1] + words[:3] * 3, max_tokens=40, ignore_eos=True, speculate="ngram"))
    assert rs[-1].drafted_tokens > 0 and 0 < rs[-1].accepted_tokens <= rs[-1].drafted_tokens
    plain = [r.token for r in stream(WordSession(), tok, [1] + words[:3] * 3, max_tokens=40)]
    assert [r.token for r in rs] == plain
    for turn in range(3):  # stop ids end answers inside rounds; the next turn must still see a consistent cache
        list(model.chat(f"turn {turn}", max_tokens=30, speculate="ngram"))
        assert model.session.tokens[:len(model._cached)] == model._cached
    with pytest.raises(FileNotFoundError, match="speculate"):
        model.generate("x", speculate="/nonexistent/draft")


def test_bench_tables_compare_each_engine_with_its_own_plain_run():
    """benchmarks/bench_speculate.py's task table (no timing here: synthetic rows)."""
    from edgephi.benchmarks.bench_speculate import tasks_markdown

    def row(subject, spec, tps, toks):
        return {"subject": subject, "spec": spec, "round": 0, "tasks": {"edit": {"decode_tps": tps, "tokens": toks,
                                                                     "drafted": 9, "accepted": 8}}}

    rows = [row("edgephi onnx", False, 100.0, [1, 2]), row("edgephi onnx", True, 260.0, [1, 2]),
            row("onnxruntime-genai", False, 150.0, [1, 2]), row("onnxruntime-genai", True, 200.0, [1, 3])]
    md = "\n".join(tasks_markdown(rows, ["edit"]))
    assert "**1.30×** the best peer's speculation" in md and "edgephi onnx 2.60×" in md
    assert "within each round: median 1.30×" in md
    assert "| onnxruntime-genai | own | 200 | NO" in md  # its speculation changed its greedy tokens
    assert "NOT comparable: onnxruntime-genai (own speculation)" in md
    rows[2]["tasks"]["edit"]["tokens"] = [1, 4]  # the peer's plain run wrote another text than edgephi on its file
    md = "\n".join(tasks_markdown(rows, ["edit"]))
    assert "| onnxruntime-genai | none | 150 | NO" in md and "onnxruntime-genai (plain)" in md


def test_min_tokens_holds_back_the_stop_tokens_with_and_without_speculation(tok):
    """min_tokens (vLLM's; onnxruntime-genai's min_length, llama.cpp's --ignore-eos): the stop tokens cannot be
    drawn before it, so every engine of benchmarks/bench_speculate.py generates the same text."""
    words = WORDS
    manifest = type("M", (), {"stop_ids": [], "spec": None})()
    model = Model("toy", manifest=manifest, choice=Choice(ToyBackend, "cpu"), session=WordSession(), tokenizer=tok)
    prompt = [1] + words[:3] * 3
    free = [r.token for r in model.stream(prompt, max_tokens=40, ignore_eos=True)]
    at = next(i for i in range(6, 40) if free[i] not in free[:i])  # the stop token: first drawn at `at` > 5
    stop = free[at]
    manifest.stop_ids = [stop]

    def tokens(**kw):
        rs = list(model.stream(prompt, max_tokens=40, **kw))
        return [r.token for r in rs if r.token is not None], rs[-1].finish_reason

    assert tokens() == (free[:at], "stop")  # (the stop token itself is not part of the answer)
    assert tokens(min_tokens=at) == (free[:at], "stop")  # held back only before position `at`
    held, finish = tokens(min_tokens=40)
    assert len(held) == 40 and stop not in held and finish == "length" and held[:at] == free[:at]
    assert tokens(min_tokens=40, speculate="ngram") == (held, "length")
    for bad, rule in ((-1, ">= 0"), (True, ">= 0"), (1.5, ">= 0"), (41, "<= max_tokens")):
        with pytest.raises(ValueError, match=f"min_tokens={bad!r}: .*{rule}"):
            model.generate(prompt, max_tokens=40, min_tokens=bad)
    with pytest.raises(ValueError, match="min_tokens"):
        model.generate(prompt, min_tokens=3, json_schema={"type": "object"})


def test_verify_cost_check_times_and_splits_a_verify_forward(tiny_bundle, capsys):
    """benchmarks/verify_cost_check.py: forwards of 1 and 17 tokens timed, the 17-token ones split by operator."""
    import re

    from edgephi.benchmarks import verify_cost_check

    assert verify_cost_check.main([str(tiny_bundle("default") / "onnx"), "--rounds", "2", "--threads", "1"]) == 0
    timing, ops = capsys.readouterr().out.strip().splitlines()
    t1, t17, ratio, speed = (float(x) for x in re.search(
        r"1 token ([\d.]+) ms, 17 tokens ([\d.]+) ms = ([\d.]+)x one token; .* runs at ([\d.]+)x plain", timing).groups())
    assert t1 > 0 and t17 > 0 and abs(speed * ratio - 17) < 0.2
    shares = [float(x) for x in re.findall(r"\(([\d.]+)%\)", ops)]
    assert ops.startswith("17-token forward by operator") and "MatMul" in ops and 0 < sum(shares) <= 100.1
