"""Train edgephi's built-in default model: a small Phi-3-architecture code model on the Python standard library.

    nice -n 19 python benchmarks/train_default_model.py --out edgephi/data/default-model

Data (phi-1 "textbook-quality code" in spirit, and free to redistribute): every ``*.py`` file of CPython 3.11.7's
standard library (PSF licence), sources with their docstrings and comments, minus test suites (any ``test``,
``tests``, ``idle_test`` folder), ``site-packages``, the build config folder, and large or machine-generated files
(see ``EXCLUDE_*`` below).  Files are sorted, shuffled with a fixed seed, and 1% of them are held out as a
validation set for the loss curve.  The exact file list (with sizes and SHA-256) goes into data_recipe.json beside
the model.

Tokenizer: our own SentencePiece-style BPE with byte fallback trained with ``tokenizers`` on the training files
(" " → "▁"; unknown characters fall back to the 256 <0xNN> byte pieces), 4096 ids, Phi-3's special tokens and chat
template.  With ``--pre-tokenizer split`` (the default) the trainer cuts the text before every run of whitespace
("▁", "\\n", "\\r"), so in a learned piece these characters can only form its beginning ("\\n▁▁▁▁▁▁▁▁return",
"▁self.", "▁▁▁▁") and never follow another character (no "def▁", no ":\\n").  onnxruntime-genai's own tokenizer cuts
the text into chunks exactly there (see ``OG_NOOP_PRE_TOKENIZER``) and runs BPE chunk by chunk; since no piece crosses
such a cut, that gives the same ids as BPE on the whole text (transformers, edgephi, llama.cpp's SentencePiece
merging).  ``--pre-tokenizer none`` reproduces the older vocabulary (trained on lines with no pre-tokenizer: pieces
like "def▁" and ":\\n"), which onnxruntime-genai splits differently.  Model: transformers' Phi3ForCausalLM,
tied embeddings, trained on the CPU with AdamW and a cosine schedule driven by a wall-clock budget (``--minutes``);
``--steps N`` replays a run step for step (the number of steps a run took is recorded in training.json).
Outputs: the checkpoint in Hugging Face layout (fp16 safetensors), benchmarks/results/default_model_loss.csv/.png.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

ROOT = Path(__file__).resolve().parent.parent
STDLIB = Path("/root/.pyenv/versions/3.11.7/lib/python3.11")
RESULTS = ROOT / "benchmarks" / "results"
SEED = 1234
VOCAB_SIZE = 4096
SPECIALS = ["<unk>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
BYTE_PIECES = [f"<0x{b:02X}>" for b in range(256)]
EXCLUDE_DIRS = {"test", "tests", "idle_test", "site-packages", "pydoc_data", "__pycache__"}
EXCLUDE_DIR_PREFIXES = ("config-3.11",)  # build configuration (Makefile, python-config.py)
EXCLUDE_FILE_PREFIXES = ("_sysconfigdata",)  # generated at build time
MAX_FILE_BYTES = 256 * 1024
# encodings/*.py made by Tools/unicode/gencodec.py are mostly 256-entry decoding tables
GENERATED_MARKERS = ("generated from", "gencodec.py")
from edgephi.tokenizer import PHI3_CHAT_TEMPLATE as CHAT_TEMPLATE  # noqa: E402  (Phi-3's published one)
from edgephi.benchmarks.loss_curve import write_loss  # noqa: E402
# Where onnxruntime-genai (onnxruntime-extensions' SpmTokenize, "no-op pre-tokenizer" branch) may cut the text
# into chunks before BPE: before one of these characters that follows a character not among them (it cuts there
# once a chunk holds more than 10 characters, and any chunk at 100+ characters without such a place).  A space is
# "▁" after the normalizer.
SPLIT_CHARS = "\u2581\r\n"
# Shipped as tokenizer.json's pre_tokenizer.  For transformers (and edgephi, which runs it) it does nothing: the
# normalizer has turned every " " into "▁" before the pre-tokenizer runs, so there is no " " left to split at.  A
# top-level Split on a String is what makes onnxruntime-genai take its no-op branch (split only as above) instead of
# the Llama-3 regex it applies when tokenizer.json has no pre_tokenizer, which cuts letters from digits and
# punctuation ("self." | "_key" becomes "self" | "._" | "key").  llama.cpp ignores it (the GGUF export reads this
# tokenizer as SentencePiece-style, "llama").
OG_NOOP_PRE_TOKENIZER = {"type": "Split", "pattern": {"String": " "}, "behavior": "Isolated", "invert": False}
MODEL = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2)


# ---- data -------------------------------------------------------------------------------------------------------
def excluded(rel: Path, text: str) -> str | None:
    """Why a stdlib file is left out, or None."""
    if any(p in EXCLUDE_DIRS or p.startswith(EXCLUDE_DIR_PREFIXES) for p in rel.parts[:-1]):
        return "folder"
    if rel.name.startswith(EXCLUDE_FILE_PREFIXES):
        return "generated"
    if len(text.encode("utf-8")) > MAX_FILE_BYTES:
        return "large"
    if rel.parts[0] == "encodings" and any(m in text[:600] for m in GENERATED_MARKERS):
        return "generated"
    return None


def collect(stdlib: Path) -> tuple[list[tuple[str, str]], dict]:
    files, skipped = [], {}
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib)
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            skipped[str(rel)] = "not utf-8"
            continue
        why = excluded(rel, text)
        if why:
            if why != "folder":
                skipped[str(rel)] = why
            continue
        files.append((str(rel), text))
    return files, skipped


def split(files, seed: int):
    rng = random.Random(seed)
    order = list(range(len(files)))
    rng.shuffle(order)
    n_val = max(4, len(files) // 100)
    val = [files[i] for i in order[:n_val]]
    train = [files[i] for i in order[n_val:]]
    return train, val


# ---- tokenizer --------------------------------------------------------------------------------------------------
def train_tokenizer(texts: list[str], vocab_size: int, pre_tokenizer: str = "split") -> Tokenizer:
    """SentencePiece-style BPE (Llama / Phi-3 layout: "▁" for space, byte fallback), trained on lines.

    ``pre_tokenizer="split"``: whole files, cut before every whitespace run (see the module docstring); the returned
    tokenizer carries OG_NOOP_PRE_TOKENIZER, which changes nothing for transformers.  ``"none"``: lines (keeping
    their "\\n", so ":\\n" is learned but no merge crosses a line break) with no pre-tokenizer, as the older model."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    if pre_tokenizer == "split":
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(f"[{SPLIT_CHARS}]+"), behavior="merged_with_next")
    elif pre_tokenizer != "none":
        raise ValueError(f"pre_tokenizer {pre_tokenizer!r}: 'split' or 'none'")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(BYTE_PIECES), special_tokens=SPECIALS,
                                  limit_alphabet=160, max_token_length=16, show_progress=False)

    def lines():
        for t in texts:
            yield from t.splitlines(keepends=True)

    tok.train_from_iterator(texts if pre_tokenizer == "split" else lines(), trainer)
    # Re-number: specials, then the 256 byte pieces (as Llama's tokenizer.json), then the learned pieces.
    spec = json.loads(tok.to_str())
    spec["pre_tokenizer"] = OG_NOOP_PRE_TOKENIZER if pre_tokenizer == "split" else None
    learned = sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])
    vocab = {s: i for i, s in enumerate(SPECIALS)}
    for b in BYTE_PIECES:
        vocab[b] = len(vocab)
    for piece, _ in learned:
        if piece not in vocab:
            vocab[piece] = len(vocab)
    spec["model"]["vocab"] = vocab
    spec["model"]["byte_fallback"] = True
    spec["added_tokens"] = [
        {"id": vocab[s], "content": s, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True} for s in SPECIALS]
    spec["decoder"] = json.loads(decoders.Sequence([
        decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]).__getstate__())
    if pre_tokenizer == "split":
        bad = [p for p in vocab if not chunk_piece(p)]
        assert not bad, f"pieces with whitespace after another character: {bad[:10]}"
    out = Tokenizer.from_str(json.dumps(spec))
    eot = vocab["<|endoftext|>"]
    out.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", pair="<|endoftext|> $A <|endoftext|> $B", special_tokens=[("<|endoftext|>", eot)])
    return out


def chunk_piece(piece: str) -> bool:
    """Whether a piece stays inside one chunk of onnxruntime-genai's split: whitespace only at its beginning."""
    return not any(c in SPLIT_CHARS and piece[i - 1] not in SPLIT_CHARS for i, c in enumerate(piece) if i)


def tokenizer_config() -> dict:
    added = {str(i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                      "special": True} for i, s in enumerate(SPECIALS)}
    return {
        "add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": added,
        "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "unk_token": "<unk>", "chat_template": CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
        "model_max_length": 2048, "tokenizer_class": "PreTrainedTokenizerFast",
        "additional_special_tokens": ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
    }


def encode_docs(tok: Tokenizer, texts: list[str]) -> np.ndarray:
    eot = tok.token_to_id("<|endoftext|>")
    ids: list[int] = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        ids.append(eot)
        ids.extend(enc.ids)
    ids.append(eot)
    return np.asarray(ids, dtype=np.int16)


# ---- model ------------------------------------------------------------------------------------------------------
def model_config(vocab_size: int, eot: int):
    from transformers import Phi3Config

    cfg = Phi3Config(vocab_size=vocab_size, max_position_embeddings=2048, original_max_position_embeddings=2048,
                     rope_theta=10000.0, rms_norm_eps=1e-5, hidden_act="silu", sliding_window=None,
                     tie_word_embeddings=True, bos_token_id=eot, eos_token_id=eot, pad_token_id=eot,
                     initializer_range=0.02, attention_dropout=0.0, resid_pdrop=0.0, embd_pdrop=0.0, **MODEL)
    cfg._attn_implementation = "sdpa"
    return cfg


def lr_at(progress: float, base: float, warmup: float) -> float:
    if progress < warmup:
        return base * progress / warmup
    p = min(1.0, (progress - warmup) / (1 - warmup))
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


@torch.no_grad()
def val_loss(model, val: np.ndarray, seq: int, n_batches: int = 2, bs: int = 4) -> float:
    model.eval()
    n = (len(val) - 1) // seq
    starts = np.linspace(0, (n - 1) * seq, n_batches * bs).astype(int)
    losses = []
    for b in range(n_batches):
        x = torch.stack([torch.from_numpy(val[s:s + seq + 1].astype(np.int64)) for s in starts[b * bs:(b + 1) * bs]])
        losses.append(model(input_ids=x[:, :-1], labels=x[:, :-1]).loss.item())
    model.train()
    return float(np.mean(losses))


def train(args, train_ids: np.ndarray, val_ids: np.ndarray, vocab_size: int, eot: int, log_rows: list):
    from transformers import Phi3ForCausalLM

    torch.manual_seed(SEED)
    if args.init:  # continue training a saved checkpoint (stored fp16, trained in fp32)
        model = Phi3ForCausalLM.from_pretrained(args.init, dtype=torch.float32)
        model.config.eos_token_id = eot
    else:
        model = Phi3ForCausalLM(model_config(vocab_size, eot))
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    rng = np.random.default_rng(SEED)
    seq, bs = args.seq, args.batch
    n_windows = (len(train_ids) - 1) // seq
    order = rng.permutation(n_windows)
    budget = args.minutes * 60
    t0 = time.time()
    step, pos, smooth = 0, 0, None
    while True:
        elapsed = time.time() - t0
        progress = step / args.steps if args.steps else elapsed / budget
        if progress >= 1:
            break
        lr = lr_at(progress, args.lr, args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        if pos + bs > n_windows:
            order, pos = rng.permutation(n_windows), 0
        idx = order[pos:pos + bs]
        pos += bs
        x = torch.stack([torch.from_numpy(train_ids[i * seq:i * seq + seq].astype(np.int64)) for i in idx])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        smooth = loss.item() if smooth is None else 0.9 * smooth + 0.1 * loss.item()
        row = {"step": step, "tokens": step * bs * seq, "seconds": round(time.time() - t0, 1), "lr": lr,
               "train_loss": round(loss.item(), 4), "val_loss": None}
        if step % args.eval_every == 0:
            row["val_loss"] = round(val_loss(model, val_ids, seq), 4)
        log_rows.append(row)
        if step % 10 == 0 or row["val_loss"] is not None:
            print(f"step {step:5d}  {row['seconds']:7.0f}s  lr {lr:.2e}  loss {loss.item():.3f} (avg {smooth:.3f})"
                  + (f"  val {row['val_loss']:.3f}" if row["val_loss"] is not None else ""), flush=True)
    final_val = val_loss(model, val_ids, seq, n_batches=4)
    log_rows.append({"step": step, "tokens": step * bs * seq, "seconds": round(time.time() - t0, 1), "lr": 0.0,
                     "train_loss": None, "val_loss": round(final_val, 4)})
    return model, step, time.time() - t0, final_val


# ---- outputs ----------------------------------------------------------------------------------------------------
def save(model, tok: Tokenizer, out: Path, recipe: dict, training: dict) -> None:
    from transformers import GenerationConfig

    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    eot, end = tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|end|>")
    model.config.eos_token_id = [eot, end]
    model.half().save_pretrained(staging, safe_serialization=True)
    GenerationConfig(bos_token_id=eot, eos_token_id=[eot, end], pad_token_id=eot).save_pretrained(staging)
    tok.save(str(staging / "tokenizer.json"))
    (staging / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2) + "\n")
    (staging / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "unk_token": "<unk>", "additional_special_tokens": ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
    }, indent=2) + "\n")
    (staging / "data_recipe.json").write_text(json.dumps(recipe, indent=1) + "\n")
    (staging / "training.json").write_text(json.dumps(training, indent=2) + "\n")
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("tokenizer.model", "LICENSE-vocab"):  # the Phi-3 stand-in vocabulary; ours replaces it
        (out / stale).unlink(missing_ok=True)
    for f in staging.iterdir():
        os.replace(f, out / f.name)
    staging.rmdir()


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="checkpoint directory (Hugging Face layout)")
    ap.add_argument("--stdlib", type=Path, default=STDLIB)
    ap.add_argument("--minutes", type=float, default=36.0, help="wall-clock training budget (drives the schedule)")
    ap.add_argument("--steps", type=int, default=0, help="train exactly this many steps instead (replay a run)")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=float, default=0.03, help="fraction of the run")
    ap.add_argument("--eval-every", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pre-tokenizer", choices=("split", "none"), default="split",
                    help="vocabulary: 'split' = cut before every whitespace run while training (no piece has "
                         "whitespace after another character, as onnxruntime-genai's tokenizer needs) or 'none' "
                         "(the older vocabulary)")
    ap.add_argument("--init", type=Path, default=None,
                    help="continue from this checkpoint (its tokenizer too) instead of a fresh model")
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    random.seed(SEED)
    np.random.seed(SEED)
    t_start = time.time()
    files, skipped = collect(args.stdlib)
    train_files, val_files = split(files, SEED)
    print(f"{len(files)} files ({sum(len(t) for _, t in files) / 1e6:.1f} M chars): "
          f"{len(train_files)} train, {len(val_files)} validation; {len(skipped)} skipped", flush=True)
    if args.init:  # same files and seed give the same split; reuse the checkpoint's tokenizer
        tok = Tokenizer.from_file(str(args.init / "tokenizer.json"))
    else:
        tok = train_tokenizer([t for _, t in train_files], VOCAB_SIZE, args.pre_tokenizer)
    vocab_size = tok.get_vocab_size()
    train_ids = encode_docs(tok, [t for _, t in train_files])
    val_ids = encode_docs(tok, [t for _, t in val_files])
    n_bytes = sum(len(t.encode("utf-8")) for _, t in train_files)
    print(f"tokenizer: {vocab_size} ids in {time.time() - t_start:.0f}s; {len(train_ids)} train tokens "
          f"({n_bytes / len(train_ids):.2f} bytes/token), {len(val_ids)} validation tokens", flush=True)

    recipe = {
        "source": f"CPython {platform.python_version()} standard library, {args.stdlib} (PSF licence)",
        "rule": "every *.py file, UTF-8, sorted by path; excluded: folders named " + ", ".join(sorted(EXCLUDE_DIRS))
                + f", folders starting with {EXCLUDE_DIR_PREFIXES}, files starting with {EXCLUDE_FILE_PREFIXES}, files "
                f"over {MAX_FILE_BYTES} bytes, encodings/* generated by gencodec; documents joined with "
                "<|endoftext|>; 1% of files (seeded shuffle) held out for validation",
        "seed": SEED,
        "train_files": [[p, len(t.encode()), hashlib.sha256(t.encode()).hexdigest()[:16]] for p, t in
                        sorted(train_files)],
        "validation_files": sorted(p for p, _ in val_files),
        "skipped": skipped,
        "train_bytes": n_bytes, "train_tokens": int(len(train_ids)),
    }
    log_rows: list = []
    model, steps, seconds, final_val = train(args, train_ids, val_ids, vocab_size, tok.token_to_id("<|endoftext|>"),
                                             log_rows)
    training = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
        "replay": f"python benchmarks/train_default_model.py --out {args.out} --steps {steps} "
                  f"--seq {args.seq} --batch {args.batch} --lr {args.lr} --warmup {args.warmup} --threads {args.threads} "
                  f"--pre-tokenizer {args.pre_tokenizer}",
        "steps": steps, "train_seconds": round(seconds, 1), "tokens_seen": steps * args.seq * args.batch,
        "epochs": round(steps * args.seq * args.batch / len(train_ids), 3),
        "final_val_loss_nats_per_token": round(final_val, 4),
        "optimizer": {"name": "AdamW", "lr": args.lr, "betas": [0.9, 0.95], "weight_decay": 0.1, "clip": 1.0,
                      "schedule": f"linear warmup {args.warmup:.0%}, cosine to 10%"},
        "seq": args.seq, "batch": args.batch, "threads": args.threads, "dtype": "fp32 training, fp16 stored",
        "model": MODEL, "vocab_size": vocab_size, "tokenizer_pre_tokenizer": args.pre_tokenizer,
        "train_bytes_per_token": round(n_bytes / len(train_ids), 3), "seed": SEED, "init": str(args.init) if args.init else None,
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cpus, torch {torch.__version__}",
        "git_commit": git_commit(),
    }
    save(model, tok, args.out, recipe, training)
    write_loss(log_rows, args.results / "default_model_loss.csv", args.results / "default_model_loss.png")
    print(f"saved {args.out}: {steps} steps in {seconds / 60:.1f} min, validation loss {final_val:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
