"""Phi-3's sliding-window attention on top of llama.cpp's KV cache (llama.cpp 0.3.x turns it off for Phi-3).

Convention (transformers): the query at position p attends to keys k with p - W < k <= p (W keys, itself included).

llama.cpp masks a query of sequence s to the cache cells tagged with s at positions <= its own.  So, with one KV
stream (kv_unified) shared by two sequences:

* sequence 0 holds the cells the next query may see: before decoding position p, the cells with k <= p - W are
  copied to sequence 1 and removed from sequence 0 (llama_memory_seq_cp / seq_rm; positions are unchanged, so the
  position check "next position = last cached + 1" still holds);
* sequence 1 keeps them, so that rewind(n) can put the window of position n back without recomputing anything.

A batch [a, b) of queries sees exactly its windows only when every query's window starts at the same cell, i.e.
when b <= W (no window reached yet) or when it holds one token: prompt tokens past the window are decoded one at a
time (batch_limit).  Exact but slower for prompts longer than the window (2047 tokens for Phi-3-mini).

Ring buffer (cells=…, the session's kv_ring option): the context then has only window + slack cells, and the
archive keeps only the newest archived cells that fit (archive_from..), so memory stops growing past the window
(llama.cpp reuses freed cells; positions keep counting).  rewind(n) then continues exactly only while the window
of position n is still held (reusable); the speculative loop rewinds at most 17 tokens, well inside the slack.
"""
from __future__ import annotations

VISIBLE, ARCHIVE = 0, 1


class WindowedCache:
    def __init__(self, llama_cpp, memory, window: int, cells: int | None = None):
        if window < 2:
            raise ValueError(f"sliding_window={window}: must be at least 2")
        self._ll = llama_cpp
        self._mem = memory
        self.window = window
        self.cells = cells  # ring buffer: the context's cell count; None keeps every archived cell
        self.visible_from = 0  # sequence 0 holds the cells at positions >= visible_from
        self.archive_from = 0  # sequence 1 holds the cells at positions archive_from .. visible_from - 1

    def batch_limit(self, pos: int) -> int:
        """Longest batch starting at position pos whose queries all see exactly their window."""
        return max(1, self.window - pos)

    def before_decode(self, pos: int) -> None:
        """Hide the cells the query at `pos` must not see (k <= pos - window)."""
        cut = pos - self.window + 1
        if cut > self.visible_from:
            self._ll.llama_memory_seq_cp(self._mem, VISIBLE, ARCHIVE, self.visible_from, cut)
            self._ll.llama_memory_seq_rm(self._mem, VISIBLE, self.visible_from, cut)
            self.visible_from = cut
        if self.cells is not None and pos + 1 - self.cells > self.archive_from:  # ring: drop the oldest cells
            drop = min(pos + 1 - self.cells, self.visible_from)
            self._ll.llama_memory_seq_rm(self._mem, ARCHIVE, self.archive_from, drop)
            self.archive_from = drop

    def reusable(self, n: int) -> int:
        """n if the cells the query at position n sees are still held, else 0 (recompute from the start)."""
        return n if n == 0 or max(0, n - self.window + 1) >= self.archive_from else 0

    def after_rewind(self, n: int) -> None:
        """The cache now ends at position n - 1: show again the archived cells the query at n may see."""
        lo = max(0, n - self.window + 1)
        if self.reusable(n) != n:
            raise ValueError(f"rewind({n}): the ring buffer no longer holds positions {lo}..{self.archive_from - 1} "
                             "that the next token sees; rewind to 0 and evaluate again")
        if n > 0 and lo < self.visible_from:
            self._ll.llama_memory_seq_cp(self._mem, ARCHIVE, VISIBLE, lo, self.visible_from)
        self.visible_from = min(self.visible_from, lo) if n > 0 else 0
        if n == 0:
            self.archive_from = 0
