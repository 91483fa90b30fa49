"""The CLI's checks of its flags and text: every bad value is refused before anything is loaded or written, with
the flag's name (ValueError; cli.main prints it as one line and exits 1)."""
from __future__ import annotations

from .sampling import check_settings

SAMPLING_FLAGS = {"temperature": "--temperature", "top_k": "--top-k", "top_p": "--top-p", "min_p": "--min-p",
                  "repetition_penalty": "--repetition-penalty"}


def export_formats(value: str | None, default: tuple[str, ...], known) -> tuple[str, ...]:
    """--format's comma-separated list (default when not given); an empty list is refused."""
    if value is None:
        return tuple(default)
    formats = tuple(dict.fromkeys(f.strip() for f in value.split(",") if f.strip()))
    if not formats:
        raise ValueError(f"--format {value!r}: names no format; choose from {', '.join(known)}")
    return formats


def check_export(args, formats: tuple[str, ...]) -> None:
    """Options that only one format reads need that format among the exported ones."""
    for flag, given, fmt in (("--gguf-quant", args.gguf_quant, "gguf"), ("--onnx-asym", args.onnx_asym, "onnx")):
        if given and fmt not in formats:
            raise ValueError(f"{flag} applies to the {fmt} format, which is not exported (--format "
                             f"{','.join(formats)}); add {fmt} to --format or drop {flag}")


def check_generation(args) -> None:
    """The generation flags of run and chat; the prompt, system message and stop strings must be valid UTF-8."""
    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens {args.max_tokens}: must be >= 1")
    min_tokens = getattr(args, "min_tokens", 0) or 0
    if not 0 <= min_tokens <= args.max_tokens:
        raise ValueError(f"--min-tokens {min_tokens}: must be between 0 and --max-tokens ({args.max_tokens})")
    ctx = getattr(args, "ctx", None)
    if ctx is not None and ctx < 1:
        raise ValueError(f"--ctx {ctx}: must be >= 1 (leave it out for the model's default)")
    threads = getattr(args, "threads", None)
    if threads is not None and threads < 1:
        raise ValueError(f"--threads {threads}: must be >= 1 (leave it out for one per physical core)")
    check_settings(args.temperature, args.top_k, args.top_p, args.min_p, args.repetition_penalty,
                   names=SAMPLING_FLAGS)
    for what, text in (("prompt", getattr(args, "prompt", None)), ("--system", args.system)):
        check_text(text, what)
    for s in args.stop or ():
        check_text(s, "--stop")
        if not s:
            raise ValueError("--stop '': a stop string cannot be empty")


def check_text(text: str | None, what: str) -> None:
    """Text from argv or stdin that was not valid UTF-8 reaches Python as lone surrogates (surrogateescape)."""
    if text is None:
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start]
        shown = f"byte 0x{ord(bad) - 0xDC00:02x}" if 0xDC80 <= ord(bad) <= 0xDCFF else f"U+{ord(bad):04X}"
        raise ValueError(f"{what} is not valid UTF-8 ({shown} at character {e.start})") from None
