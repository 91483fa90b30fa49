package dev.edgephi.core

/**
 * Streaming text assembly for one answer: the pieces an engine decodes per token (onnxruntime-genai's
 * TokenizerStream, the browser runtime's onToken) through the stop rules into the text shown, with the counts
 * and speed the screen reports.  The space SentencePiece writes before an answer's first word is dropped, as
 * edgephi's Python runtime and transformers drop it.  `clock` returns nanoseconds (injected in tests).
 */
class AnswerStream(
    stopIds: Set<Int>,
    stopStrings: List<String> = emptyList(),
    private val maxTokens: Int = Int.MAX_VALUE,
    private val clock: () -> Long = System::nanoTime
) {
    private val stops = StopHandler(stopIds, stopStrings)
    private val out = StringBuilder()
    private val start = clock()
    private var firstTokenAt = 0L
    private var lastTokenAt = 0L
    private var leading = true

    var tokens: Int = 0
        private set
    /** Why the answer ended ("stop", "stop string", "length", "context", "cancelled"), or null while it runs. */
    var finishReason: String? = null
        private set
    val text: String get() = out.toString()
    val done: Boolean get() = finishReason != null

    /** Token `id` decoded as `piece` (id < 0: text without a token); returns the text to append ("" if none). */
    fun add(id: Int, piece: String): String {
        if (done) return ""
        val now = clock()
        if (tokens == 0) firstTokenAt = now
        lastTokenAt = now
        if (id >= 0 && !stops.isStop(id)) tokens++  // id < 0: text an engine held back, no token of its own
        var shown = stops.feed(id, piece)
        if (leading && shown.isNotEmpty()) {  // one space, once: the answer's first text
            if (shown.startsWith(" ")) shown = shown.substring(1)
            leading = false
        }
        out.append(shown)
        if (stops.stopped) finishReason = stops.reason
        else if (tokens >= maxTokens) finish("length")
        return shown
    }

    /** Ends the answer for `reason` (the engine's: "length", "context", "cancelled"); returns held-back text. */
    fun finish(reason: String): String {
        if (done) return ""
        var rest = stops.finish()
        if (leading && rest.startsWith(" ")) rest = rest.substring(1)
        leading = false
        out.append(rest)
        finishReason = reason
        return rest
    }

    /** Seconds to the first token. */
    val ttft: Double get() = if (tokens == 0) 0.0 else (firstTokenAt - start) / 1e9

    /** Tokens per second after the first (the decode speed); null before two tokens. */
    val tokensPerSecond: Double?
        get() = if (tokens < 2 || lastTokenAt == firstTokenAt) null else (tokens - 1) / ((lastTokenAt - firstTokenAt) / 1e9)

    fun summary(): String {
        val speed = tokensPerSecond?.let { String.format(java.util.Locale.ROOT, ", %.1f tok/s", it) } ?: ""
        return "$tokens tokens$speed, ${finishReason ?: "running"}"
    }
}
