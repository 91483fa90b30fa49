package dev.edgephi.core

/**
 * A small JSON reader (RFC 8259) for the bundle's own files, so the core needs no library: objects become
 * Map<String, Any?> (in file order), arrays List<Any?>, numbers Long when integral else Double, and true, false,
 * null, strings as themselves.  Errors name the position.
 */
class JsonException(message: String) : IllegalArgumentException(message)

object Json {
    private const val MAX_DEPTH = 256

    fun parse(text: String): Any? {
        val r = Reader(text)
        r.space()
        val v = r.value(0)
        r.space()
        if (r.i != text.length) r.fail("unexpected text after the value")
        return v
    }

    private class Reader(val s: String) {
        var i = 0

        fun fail(what: String): Nothing = throw JsonException("JSON: $what at character $i")

        fun space() {
            while (i < s.length && (s[i] == ' ' || s[i] == '\n' || s[i] == '\r' || s[i] == '\t')) i++
        }

        fun value(depth: Int): Any? {
            if (depth > MAX_DEPTH) fail("nesting deeper than $MAX_DEPTH")
            if (i >= s.length) fail("unexpected end")
            return when (s[i]) {
                '{' -> obj(depth)
                '[' -> arr(depth)
                '"' -> str()
                't' -> word("true", true)
                'f' -> word("false", false)
                'n' -> word("null", null)
                else -> num()
            }
        }

        fun word(w: String, v: Any?): Any? {
            if (!s.startsWith(w, i)) fail("unexpected character '${s[i]}'")
            i += w.length
            return v
        }

        fun obj(depth: Int): Map<String, Any?> {
            val out = LinkedHashMap<String, Any?>()
            i++
            space()
            if (i < s.length && s[i] == '}') { i++; return out }
            while (true) {
                space()
                if (i >= s.length || s[i] != '"') fail("expected a string key")
                val k = str()
                space()
                if (i >= s.length || s[i] != ':') fail("expected ':'")
                i++
                space()
                out[k] = value(depth + 1)
                space()
                if (i < s.length && s[i] == ',') { i++; continue }
                if (i < s.length && s[i] == '}') { i++; return out }
                fail("expected ',' or '}'")
            }
        }

        fun arr(depth: Int): List<Any?> {
            val out = ArrayList<Any?>()
            i++
            space()
            if (i < s.length && s[i] == ']') { i++; return out }
            while (true) {
                space()
                out.add(value(depth + 1))
                space()
                if (i < s.length && s[i] == ',') { i++; continue }
                if (i < s.length && s[i] == ']') { i++; return out }
                fail("expected ',' or ']'")
            }
        }

        fun str(): String {
            val b = StringBuilder()
            i++
            while (true) {
                if (i >= s.length) fail("unterminated string")
                val c = s[i++]
                when {
                    c == '"' -> return b.toString()
                    c == '\\' -> {
                        if (i >= s.length) fail("unterminated escape")
                        when (val e = s[i++]) {
                            '"', '\\', '/' -> b.append(e)
                            'b' -> b.append('\b')
                            'f' -> b.append('\u000c')
                            'n' -> b.append('\n')
                            'r' -> b.append('\r')
                            't' -> b.append('\t')
                            'u' -> {
                                if (i + 4 > s.length) fail("short \\u escape")
                                val hex = s.substring(i, i + 4)
                                if (!hex.all { it in '0'..'9' || it in 'a'..'f' || it in 'A'..'F' }) fail("bad \\u escape")
                                b.append(Integer.parseInt(hex, 16).toChar())
                                i += 4
                            }
                            else -> fail("bad escape '\\$e'")
                        }
                    }
                    c < ' ' -> fail("control character in a string")
                    else -> b.append(c)
                }
            }
        }

        fun num(): Any {
            val start = i
            if (i < s.length && s[i] == '-') i++
            val digits = i
            while (i < s.length && s[i] in '0'..'9') i++
            if (i == digits) fail("unexpected character '${s[start]}'")
            var integral = true
            if (i < s.length && s[i] == '.') {
                integral = false
                i++
                val frac = i
                while (i < s.length && s[i] in '0'..'9') i++
                if (i == frac) fail("digits expected after '.'")
            }
            if (i < s.length && (s[i] == 'e' || s[i] == 'E')) {
                integral = false
                i++
                if (i < s.length && (s[i] == '+' || s[i] == '-')) i++
                val exp = i
                while (i < s.length && s[i] in '0'..'9') i++
                if (i == exp) fail("digits expected in the exponent")
            }
            val t = s.substring(start, i)
            if (integral) t.toLongOrNull()?.let { return it }
            return t.toDouble()
        }
    }
}
