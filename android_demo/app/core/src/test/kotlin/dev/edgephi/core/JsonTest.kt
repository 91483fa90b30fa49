package dev.edgephi.core

import org.junit.Assert.assertEquals
import org.junit.Assert.assertTrue
import org.junit.Assert.fail
import org.junit.Test

class JsonTest {
    @Test
    fun parsesEveryKind() {
        val v = Json.parse("""{"a": [1, -2.5, 3e2, true, false, null], "b": {"c": "x\ty\u00e9\"\\"}, "d": ""}""")
        assertEquals(
            mapOf("a" to listOf(1L, -2.5, 300.0, true, false, null), "b" to mapOf("c" to "x\tyé\"\\"), "d" to ""), v)
    }

    @Test
    fun keepsKeyOrderAndUnicode() {
        val v = Json.parse("""{"z": 1, "a": "日本語 🙂", "m": []}""") as Map<*, *>
        assertEquals(listOf("z", "a", "m"), v.keys.toList())
        assertEquals("日本語 🙂", v["a"])
    }

    @Test
    fun errorsNameThePosition() {
        for ((bad, what) in listOf("{\"a\": }" to "unexpected character", "[1, 2" to "expected ',' or ']'",
            "\"abc" to "unterminated string", "{} x" to "unexpected text", "01x" to "unexpected text",
            "[1.]" to "digits expected", "\"\\q\"" to "bad escape")) {
            try {
                Json.parse(bad)
                fail("parsed $bad")
            } catch (e: JsonException) {
                assertTrue("${e.message} for $bad", e.message!!.contains(what) && e.message!!.contains("at character"))
            }
        }
    }

    @Test
    fun refusesDeepNesting() {
        try {
            Json.parse("[".repeat(1000) + "]".repeat(1000))
            fail("parsed 1000 levels")
        } catch (e: JsonException) {
            assertTrue(e.message!!.contains("nesting deeper than"))
        }
    }
}
