package dev.edgephi.core

/**
 * Stop handling over a stream of decoded pieces: a stop id ends the answer (the manifest's stop_ids: end of text,
 * end of turn), and so does a stop string, even one split across pieces.  Text that may be the start of a stop
 * string is held back until the next piece shows whether it is; feed() returns what can be shown now.
 */
class StopHandler(val stopIds: Set<Int>, stopStrings: List<String> = emptyList()) {
    private val strings = stopStrings.filter { it.isNotEmpty() }
    private val held = StringBuilder()
    var stopped: Boolean = false
        private set
    var reason: String? = null
        private set

    fun isStop(id: Int): Boolean = id in stopIds

    /** The piece of token `id`: what may be shown now ("" while held back or once stopped). */
    fun feed(id: Int, piece: String): String {
        if (stopped) return ""
        if (isStop(id)) {
            stopped = true
            reason = "stop"
            return flushHeld()
        }
        held.append(piece)
        val text = held.toString()
        var cut = -1
        for (s in strings) {
            val at = text.indexOf(s)
            if (at >= 0 && (cut < 0 || at < cut)) cut = at
        }
        if (cut >= 0) {
            stopped = true
            reason = "stop string"
            held.setLength(0)
            return text.substring(0, cut)
        }
        var keep = 0  // the longest end of the text that begins some stop string
        for (s in strings) for (n in minOf(s.length - 1, text.length) downTo 1) {
            if (n > keep && text.endsWith(s.substring(0, n))) { keep = n; break }
        }
        held.setLength(0)
        held.append(text.substring(text.length - keep))
        return text.substring(0, text.length - keep)
    }

    /** At the end of the stream: the held-back text (it turned out not to be a stop string). */
    fun finish(): String = if (stopped) "" else flushHeld()

    private fun flushHeld(): String {
        val out = held.toString()
        held.setLength(0)
        return out
    }
}
