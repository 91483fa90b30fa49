"""The edgephi command line: a table of subcommands, each calling the API function with the same arguments."""
from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import sys
import threading

from . import __version__
from .cli_checks import check_export, check_generation, check_text, export_formats
from .cli_runtime import add_runtime_flags, gen_options, load_options, stats_suffix, with_prompt_cache
from .formats import FORMATS

log = logging.getLogger("edgephi")
EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPT = 1, 2, 130
_SIGNALED: list[int] = []  # SIGINT/SIGTERM received by export and run (exit 128 + the first one)


# ---- export -------------------------------------------------------------------------------------------------------
def _progress_factory(quiet: bool):
    if quiet:
        return None
    from tqdm import tqdm

    def factory(fmt: str, total: int):
        bar = tqdm(total=total, desc=f"{fmt:>6}", unit="tensor", leave=True, file=sys.stderr)

        def progress(done: int, total_: int) -> None:
            bar.total = total_
            bar.n = done
            bar.refresh()
            if done >= total_:
                bar.close()

        return progress

    return factory


def cmd_export(args) -> int:
    from edgephi.export.bundle import DEFAULT_FORMATS, export_bundle

    bits = 4 if args.q4 else args.bits
    formats = export_formats(args.format, DEFAULT_FORMATS, FORMATS)
    check_export(args, formats)
    options = {}
    if args.gguf_quant:
        options.setdefault("gguf", {})["quant"] = args.gguf_quant
    if args.onnx_asym:
        options.setdefault("onnx", {})["symmetric"] = False
    # no --format: every default format that can hold this model (export_bundle says which it leaves out)
    out, manifest = export_bundle(args.model, args.output, formats=formats if args.format else None, bits=bits,
                                  force=args.force, options=options, progress=_progress_factory(args.quiet))
    print(f"\nbundle: {out}")
    print(f"{'format':<8}{'file':<44}{'size':>10}{'bits/weight':>13}{'time':>9}")
    for fmt, e in manifest.formats.items():
        print(f"{fmt:<8}{e.entry:<44}{_size(e.nbytes):>10}{manifest.bits_per_weight(fmt):>13.2f}{e.seconds:>8.1f}s")
    if args.check:
        _print_check(out, args)
    return 0


def _print_check(bundle, args) -> None:
    from edgephi.benchmarks.quality import check_bundle

    print("\nquality on held-out Python (edgephi/data/heldout):")
    scores = check_bundle(bundle, threads=getattr(args, "threads", None))
    ref = next((s.ppl for s in scores if s.label.startswith("reference")), None)
    for s in scores:
        print(f"  {s.label}: {s.note}" if s.note else "  " + s.line(None if s.label.startswith("reference") else ref))


def cmd_check(args) -> int:
    _print_check(args.bundle, args)
    return 0


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


# ---- generation ---------------------------------------------------------------------------------------------------
def _gen_kwargs(args) -> dict:
    return dict(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                stop=tuple(args.stop or ()), **gen_options(args))


def _load(args):
    import edgephi

    bundle = args.bundle
    if bundle is None:  # the built-in model: the CLI exports its bundle on first use, the runtime never does
        from edgephi.export.bundle import default_bundle

        bundle = default_bundle()
    opts = {}
    if args.threads:
        opts["threads"] = args.threads
    if getattr(args, "ctx", None) is not None:
        opts["n_ctx"] = args.ctx
    opts.update(load_options(args))  # --kv-type, --kv-ring, --prompt-cache: loaded if it exists, else saved
    return with_prompt_cache(edgephi.load(bundle, device=args.device, format=args.format, **opts), args)


def _stats(r, evaluated: int) -> str:
    return (f"[{r.generation_tokens} tokens, {r.generation_tps:.1f} tok/s, ttft {r.ttft * 1000:.0f} ms, "
            f"prompt {evaluated} tokens at {r.prompt_tps:.1f} tok/s{stats_suffix(r)}, {r.finish_reason}]")


def _write(text: str) -> None:
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except OSError as e:  # a full disk or a closed pipe behind stdout
        if e.filename is None:
            e.filename = "standard output"
        raise


def cmd_run(args) -> int:
    check_generation(args)
    kwargs = _gen_kwargs(args)
    if args.json_schema is not None:  # constrained decoding: the answer parses and validates (edgephi/constrain.py)
        from .constrain import read_json_schema

        kwargs["json_schema"] = read_json_schema(args.json_schema)
    model = _load(args)
    if args.raw or not model.tokenizer.chat_template:
        responses = model.stream(args.prompt, **kwargs)
    else:
        responses = model.chat(args.prompt, system=args.system, thinking=args.thinking, **kwargs)
    last = None
    for r in responses:
        _write(r.text)
        last = r
    _write("\n")
    if args.verbose and last is not None:
        print(_stats(last, last.prompt_tokens), file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    from edgephi.backends.base import ContextFullError

    check_generation(args)
    model = _load(args)
    kwargs = _gen_kwargs(args)
    # Ctrl-C stops an answer even when the shell started us with SIGINT ignored (a background job, nohup, some CI
    # runners): Python installs its KeyboardInterrupt handler only when SIGINT is not ignored at start-up
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if hasattr(sys.stdin, "reconfigure"):  # a line that is not UTF-8 is refused below, not the rest of the input
        sys.stdin.reconfigure(errors="surrogateescape")
    print(f"edgephi {__version__} · {model.path} · {model.backend} on {model.device} · context "
          f"{model.session.n_ctx} tokens\n/reset starts over, /exit quits, Ctrl-C stops an answer.", flush=True)
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print()
            return 0
        except UnicodeDecodeError as e:  # stdin's decoder is strict in a UTF-8 locale
            print(f"edgephi: error: the line is not valid UTF-8 (byte 0x{e.object[e.start]:02x}); type it again",
                  file=sys.stderr, flush=True)
            continue
        try:
            check_text(line, "the line")
        except ValueError as e:  # in the C locale stdin decodes with surrogateescape
            print(f"edgephi: error: {e}; type it again", file=sys.stderr, flush=True)
            continue
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit", "/bye"):
            return 0
        if line == "/reset":
            model.reset()
            print("[conversation reset]", flush=True)
            continue
        last = None
        answer = model.chat(line, system=args.system, thinking=args.thinking, **kwargs)
        try:
            for r in answer:
                sys.stdout.write(r.text)
                sys.stdout.flush()
                last = r
            print(flush=True)
            if last is not None:
                print(_stats(last, last.prompt_tokens), flush=True)
        except KeyboardInterrupt:
            print("\n[stopped]", flush=True)
        except ContextFullError as e:
            model.messages = model.messages[:-2]  # drop the turn that did not fit
            print(f"\n[{e}; /reset starts a new conversation]", flush=True)
        finally:
            answer.close()  # the model records exactly what its cache holds, even after Ctrl-C


# ---- inspection ---------------------------------------------------------------------------------------------------
def cmd_info(args) -> int:
    from edgephi.manifest import Manifest

    m = Manifest.load(args.bundle)  # checks every field and every file's recorded size
    verified = m.verify(args.bundle) if args.verify else None  # and with --verify every file's sha256
    s = m.spec
    print(f"bundle      {args.bundle}\nmodel       {m.source.get('model')} ({s.model_type}, "
          f"{s.n_params / 1e9:.3f} B parameters)\nlayers      {s.num_hidden_layers} × hidden {s.hidden_size}, "
          f"heads {s.num_attention_heads}/{s.num_key_value_heads} kv, head_dim {s.head_dim}, rotary {s.rotary_dim}")
    print(f"context     {m.context_length} tokens" + (f", sliding window {s.effective_sliding_window}"
                                                     if s.effective_sliding_window else "")
          + (", LongRoPE" if s.rope_scaling else ""))
    print(f"stop ids    {m.stop_ids}\nexported    {m.created} by edgephi {m.edgephi_version}")
    for fmt, e in m.formats.items():
        print(f"{fmt:<11} {e.entry}  {e.quant}  {_size(e.nbytes)}  {m.bits_per_weight(fmt):.2f} bits/weight, "
              f"needs {_size(m.memory_bytes(fmt))} to run")
    if verified is not None:
        print(f"verified    {verified} files: sha256 as recorded at export")
    return 0


def cmd_devices(args) -> int:
    from edgephi.devices import probe
    from edgephi.select import availability

    p = probe()
    print(f"machine: {p.system} {p.machine}, {p.cpu_count} CPUs; onnxruntime providers: {', '.join(p.ort_providers)}")
    for backend, device, why in availability(p):
        print(f"  {device:<6} {backend:<9} {'available' if why is None else 'unavailable: ' + why}")
    if args.verify:
        from edgephi.manifest import Manifest
        from edgephi.verify import verify_all

        m = Manifest.load(args.verify)
        needs = {f: m.memory_bytes(f) for f in m.formats}
        for backend, device, why in availability(p, tuple(m.formats), needs):
            if why and "needs" in why:
                print(f"  {device:<6} {backend:<9} cannot hold {args.verify}: {why}")

        print(f"\ndevice check of {args.verify} (a short prompt on each backend against a CPU reference):")
        for backend, device, verdict in verify_all(args.verify, p):
            print(f"  {device:<6} {backend:<9} {verdict if isinstance(verdict, str) else verdict.line()}")
    return 0


# ---- the table ----------------------------------------------------------------------------------------------------
def _add_gen_flags(p, bundle_required: bool) -> None:
    p.add_argument("bundle", nargs=None if bundle_required else "?", default=None,
                   help="bundle directory from `edgephi export` (default: the built-in model)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "npu", "metal", "cuda"])
    p.add_argument("--format", default=None, choices=list(FORMATS), help="force one format")
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--thinking", default="show", choices=["show", "hide"], help="a reasoning model's <think> block")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: physical cores)")
    p.add_argument("--ctx", type=int, default=None, help="context length to allocate (default: the model's, capped)")
    add_runtime_flags(p)  # --speculate, --prompt-cache, --kv-type, --kv-ring


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, like every other error."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"edgephi: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="edgephi", description="Export and run Phi models on your own device.")
    ap.add_argument("--version", action="version", version=f"edgephi {__version__}")
    ap.add_argument("-v", "--verbose", action="store_true", help="log the backend choice and tracebacks")
    # -v works before or after the subcommand
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="log the backend choice and tracebacks")
    sub = ap.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_parser = sub.add_parser
    sub.add_parser = lambda *a, **k: _add_parser(*a, parents=[common], **k)

    p = sub.add_parser("export", help="export a Phi checkpoint to one bundle (ONNX, GGUF, Core ML)")
    p.add_argument("model", help="alias (phi-3-mini, phi-2, …, default), local directory or Hugging Face repo id")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--q4", action="store_true", help="4-bit weights (the default)")
    g.add_argument("--bits", type=int, default=4, choices=[4, 8, 16, 32])
    p.add_argument("--format", default=None,
                   help=f"comma-separated subset of {','.join(FORMATS)} (default: onnx,gguf,coreml)")
    p.add_argument("-o", "--output", default=None, help="bundle directory (default: ./<model>-edgephi-q4)")
    p.add_argument("--force", action="store_true", help="replace an existing bundle")
    p.add_argument("--gguf-quant", default=None, choices=["q4_k_m", "q4_0", "q8_0", "f16", "bf16"])
    p.add_argument("--onnx-asym", action="store_true", help="asymmetric int4 (zero points) for ONNX")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument("--check", action="store_true",
                   help="after export, print perplexity and KL divergence to the 16-bit model on held-out text")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("check", help="perplexity of a bundle's models on held-out text, KL to the 16-bit model")
    p.add_argument("bundle")
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("chat", help="interactive chat that keeps the KV cache between turns")
    _add_gen_flags(p, bundle_required=False)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("run", help="print one answer to stdout")
    _add_gen_flags(p, bundle_required=False)
    p.add_argument("-p", "--prompt", required=True)
    p.add_argument("--raw", action="store_true", help="complete the prompt as is, without the chat template")
    p.add_argument("--json-schema", metavar="FILE", default=None, help="answer JSON valid against this schema")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("info", help="describe a bundle")
    p.add_argument("bundle")
    p.add_argument("--verify", action="store_true", help="also recompute every model file's sha256 and compare it "
                   "with manifest.json (reads the whole bundle)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("devices", help="list every backend and device: available, or why not")
    p.add_argument("--verify", metavar="BUNDLE", default=None,
                   help="check every accelerator that can run BUNDLE against the CPU now (the verdicts are kept)")
    p.set_defaults(func=cmd_devices)

    p = sub.add_parser("bench", help="measure every backend (and --peers) on a bundle or a random-weight --shape")
    from edgephi.benchmarks.bench import add_arguments as _bench_arguments, cmd_bench  # stdlib imports only

    _bench_arguments(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("serve", help="OpenAI-compatible server: chat, completions, tools, structured output")
    from edgephi.serve.cli import add_arguments as _serve_arguments, cmd_serve  # stdlib imports only

    _serve_arguments(p)
    p.set_defaults(func=cmd_serve)
    return ap


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        name = e.filename2 or e.filename  # a copy names its source first
        kept = "; nothing was kept" if any("nothing was kept" in n for n in getattr(e, "__notes__", ())) else ""
        return f"no space left on device{' writing ' + str(name) if name else ''}{kept}"
    msg = str(e) or e.__class__.__name__
    if isinstance(e, KeyError):
        msg = msg.strip("'\"")
    return msg.splitlines()[0] if len(msg.splitlines()) == 1 else " ".join(msg.split())


def _on_signal(signum, frame) -> None:
    _SIGNALED.append(signum)
    raise KeyboardInterrupt


def _interrupted() -> int:
    print("\nedgephi: interrupted", file=sys.stderr)
    return 128 + _SIGNALED[0] if _SIGNALED else EXIT_INTERRUPT


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="edgephi: %(message)s", stream=sys.stderr)
    debug = args.verbose or os.environ.get("EDGEPHI_DEBUG")
    _SIGNALED.clear()
    old = {}
    if args.command in ("export", "run") and threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):  # both may write a bundle: SIGTERM cleans up as Ctrl-C does
            old[sig] = signal.signal(sig, _on_signal)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return _interrupted()
    except (ValueError, KeyError, OSError, RuntimeError, NotImplementedError, ImportError) as e:
        if _SIGNALED:  # the error came of an interrupt a library swallowed (and failed after): the interrupt wins
            return _interrupted()
        if debug:
            raise
        print(f"edgephi: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
