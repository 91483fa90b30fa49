package dev.edgephi.core

import org.junit.Assert.assertEquals
import org.junit.Assert.assertTrue
import org.junit.Assert.fail
import org.junit.Test
import java.io.File

/** The Kotlin rendering equals edgephi's Python (transformers') rendering of the same templates. */
class ChatFormatTest {
    private val templates = Json.parse(File(Fixtures.dir, "chat.json").readText()) as List<*>

    @Test
    fun everyKnownTemplateRendersAsPythonDoes() {
        var n = 0
        for (t in templates.map { it as Map<*, *> }.filter { it["refused"] != true }) {
            val format = ChatFormat.of(t["template"] as String)
            for (c in (t["cases"] as List<*>).map { it as Map<*, *> }) {
                val messages = (c["messages"] as List<*>).map { it as Map<*, *> }
                    .map { Message(it["role"] as String, it["content"] as String) }
                val got = format.render(messages, c["add_generation_prompt"] as Boolean, t["eos_token"] as String)
                assertEquals("${t["name"]}: $messages", c["text"], got)
                n++
            }
        }
        assertTrue("$n cases", n >= 24)
    }

    @Test
    fun otherTemplatesAreRefusedByName() {
        for (t in templates.map { it as Map<*, *> }.filter { it["refused"] == true }) {
            try {
                ChatFormat.of(t["template"] as String)
                fail("${t["name"]} accepted")
            } catch (e: ChatTemplateException) {
                assertTrue(e.message!!, e.message!!.contains("use the WebView engine"))
            }
        }
    }

    @Test
    fun noTemplateMeansPhi3sAndTheBundlesConfigIsRead() {
        assertEquals(ChatFormat.Family.PHI3, ChatFormat.of(null).family)
        val cfg = TokenizerConfig.parse(File(Fixtures.dir, "bundle/tokenizer_config.json").readText())
        assertEquals(ChatFormat.Family.PHI3, ChatFormat.of(cfg.chatTemplate).family)
        assertEquals("<|endoftext|>", cfg.bosToken)  // the built-in model's
        val named = TokenizerConfig.parse("""{"chat_template": [{"name": "tool_use", "template": "x"},
            {"name": "default", "template": "${ChatFormat.PHI4.replace("'", "'")}"}], "eos_token": {"content": "<|im_end|>"}}""")
        assertEquals(ChatFormat.Family.PHI4, ChatFormat.of(named.chatTemplate).family)
        assertEquals("<|im_end|>", named.eosToken)
    }

    @Test
    fun anUnknownRoleIsRefused() {
        try {
            ChatFormat.of(null).render(listOf(Message("robot", "hi")))
            fail("rendered role robot")
        } catch (e: ChatTemplateException) {
            assertTrue(e.message!!.contains("role 'robot'"))
        }
    }
}
