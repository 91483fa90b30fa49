"""The tokenizer files a bundle carries, written so that every client reads the same tokenizer and chat template.

Copied from the checkpoint (edgephi.formats.TOKENIZER_FILES, plus config.json where a folder is to be read as a
model folder by other runtimes), with one change: a checkpoint without a chat template gets the one edgephi chats
with (edgephi.chat_template.PHI3_CHAT_TEMPLATE) written into the copy of tokenizer_config.json, so that
transformers, onnxruntime-genai and llama.cpp (the GGUF's tokenizer.chat_template) render the same prompt.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from edgephi.formats import TOKENIZER_FILES

from .source import Source

log = logging.getLogger(__name__)
CONFIG = "tokenizer_config.json"


def chat_template(src: Source) -> str | None:
    """The template every format carries: the checkpoint's, or edgephi's fallback (None without a tokenizer)."""
    return src.tokenizer.effective_chat_template if src.tokenizer is not None else None


def write_tokenizer_files(src: Source, dest: Path, extra: tuple[str, ...] = ()) -> list[Path]:
    """Copy the tokenizer files (and `extra` checkpoint files) into dest; returns the files written."""
    written = []
    for name in TOKENIZER_FILES + extra:
        if (src.directory / name).is_file():
            shutil.copy2(src.directory / name, dest / name)
            written.append(dest / name)
    template, path = chat_template(src), src.directory / CONFIG
    config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    if template is not None and not config.get("chat_template") and not (src.directory / "chat_template.jinja").is_file():
        config["chat_template"] = template
        log.info("%s: no chat template; the bundle carries edgephi's (Phi-3's published one)", src.directory)
        (dest / CONFIG).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        written.append(dest / CONFIG)
    return sorted(set(written))
