package dev.edgephi.core

import org.junit.Assert.assertEquals
import org.junit.Assert.assertFalse
import org.junit.Assert.assertNull
import org.junit.Assert.assertTrue
import org.junit.Test

class StreamTest {
    private val end = 32007  // <|end|>

    @Test
    fun aStopIdEndsTheAnswerAndIsNotShown() {
        val s = AnswerStream(setOf(32000, end))
        val shown = listOf(10 to " Hello", 11 to ",", 12 to " world", end to "<|end|>", 13 to " more")
            .joinToString("") { (id, p) -> s.add(id, p) }
        assertEquals("Hello, world", shown)
        assertEquals("Hello, world", s.text)
        assertEquals("stop", s.finishReason)
        assertEquals(3, s.tokens)
    }

    @Test
    fun aStopStringSplitAcrossPiecesIsHeldBackThenCut() {
        val s = AnswerStream(emptySet(), listOf("\nUser:"))
        assertEquals("Sure", s.add(1, "Sure"))
        assertEquals("", s.add(2, "\nUs"))  // could be the stop string: held
        assertEquals("", s.add(3, "er"))
        assertEquals("", s.add(4, ": next"))
        assertEquals("Sure", s.text)
        assertEquals("stop string", s.finishReason)
    }

    @Test
    fun heldTextThatIsNoStopIsShownLaterOrAtTheEnd() {
        val s = AnswerStream(emptySet(), listOf("###"))
        assertEquals("a", s.add(1, "a#"))
        assertEquals("#b", s.add(2, "b"))
        assertEquals("c", s.add(3, "c##"))
        assertEquals("##", s.finish("length"))
        assertEquals("a#bc##", s.text)
    }

    @Test
    fun theLeadingSpaceGoesAndMaxTokensEnds() {
        val s = AnswerStream(emptySet(), maxTokens = 3)
        s.add(1, " ")
        s.add(2, " two")
        assertFalse(s.done)
        s.add(3, " three")
        assertEquals(" two three", s.text)
        assertEquals("length", s.finishReason)
        assertEquals("", s.add(4, "x"))
    }

    @Test
    fun speedIsTokensAfterTheFirstOverTheirTime() {
        var now = 0L
        val s = AnswerStream(emptySet(), clock = { now })
        assertNull(s.tokensPerSecond)
        now = 500_000_000L
        s.add(1, "a")
        for (i in 2..11) { now += 100_000_000L; s.add(i, "b") }
        assertEquals(0.5, s.ttft, 1e-9)
        assertEquals(10.0, s.tokensPerSecond!!, 1e-9)
        s.finish("cancelled")
        assertTrue(s.summary(), s.summary() == "11 tokens, 10.0 tok/s, cancelled")
    }
}
