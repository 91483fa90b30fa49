package dev.edgephi.core

/** One chat message; role is system, user or assistant. */
data class Message(val role: String, val content: String)

class ChatTemplateException(message: String) : IllegalArgumentException(message)

/**
 * The chat prompt of the Phi templates edgephi bundles carry, written out in Kotlin (a phone app has no Jinja):
 * the template text from tokenizer_config.json is matched, whitespace aside, against the published templates it
 * knows, and render() gives the text transformers' apply_chat_template gives (the JVM tests compare with
 * edgephi's Python rendering).  Any other template is refused by name: the WebView engine renders every template
 * with Jinja, and onnxruntime-genai's applyChatTemplate can too.
 */
class ChatFormat private constructor(val family: Family, private val skipEmptySystem: Boolean) {
    enum class Family {
        /** <|role|>\n content <|end|>\n ... <|assistant|>\n  (Phi-3, Phi-3.5; edgephi's default template) */
        PHI3,
        /** <|role|> content <|end|> ... <|assistant|>  (Phi-4-mini) */
        PHI4_MINI,
        /** <|im_start|>role<|im_sep|> content <|im_end|> ... (Phi-4) */
        PHI4
    }

    fun render(messages: List<Message>, addGenerationPrompt: Boolean = true, eosToken: String = ""): String {
        val b = StringBuilder()
        for ((k, m) in messages.withIndex()) {
            if (m.role !in ROLES) throw ChatTemplateException("messages[$k]: role '${m.role}'; allowed: ${ROLES.joinToString(", ")}")
            when (family) {
                Family.PHI3 -> if (!(m.role == "system" && skipEmptySystem && m.content.isEmpty())) {
                    b.append("<|").append(m.role).append("|>\n").append(m.content).append("<|end|>\n")
                }
                Family.PHI4_MINI -> b.append("<|").append(m.role).append("|>").append(m.content).append("<|end|>")
                Family.PHI4 -> b.append("<|im_start|>").append(m.role).append("<|im_sep|>").append(m.content)
                    .append("<|im_end|>")
            }
        }
        when {
            addGenerationPrompt -> b.append(
                when (family) {
                    Family.PHI3 -> "<|assistant|>\n"
                    Family.PHI4_MINI -> "<|assistant|>"
                    Family.PHI4 -> "<|im_start|>assistant<|im_sep|>"
                })
            family != Family.PHI4 -> b.append(eosToken)
        }
        return b.toString()
    }

    companion object {
        val ROLES = listOf("system", "user", "assistant")

        // Phi-3-mini's published template: what edgephi writes into a bundle whose checkpoint has none
        const val PHI3 = "{% for message in messages %}" +
            "{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}" +
            "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}" +
            "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}" +
            "{% endif %}{% endfor %}" +
            "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
        // Phi-3.5-mini-instruct: an empty system message is left out
        const val PHI3_5 = "{% for message in messages %}" +
            "{% if message['role'] == 'system' and message['content'] %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}" +
            "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}" +
            "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}" +
            "{% endif %}{% endfor %}" +
            "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
        // Phi-4-mini-instruct (its tools branch applies only to messages with a 'tools' key, which Message has not)
        const val PHI4_MINI = "{% for message in messages %}" +
            "{% if message['role'] == 'system' and 'tools' in message and message['tools'] is not none %}" +
            "{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + message['tools'] + '<|/tool|>' + '<|end|>' }}" +
            "{% else %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{% endif %}{% endfor %}" +
            "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}"
        // microsoft/phi-4
        const val PHI4 = "{% for message in messages %}{% if (message['role'] == 'system') %}" +
            "{{'<|im_start|>system<|im_sep|>' + message['content'] + '<|im_end|>'}}" +
            "{% elif (message['role'] == 'user') %}{{'<|im_start|>user<|im_sep|>' + message['content'] + '<|im_end|>'}}" +
            "{% elif (message['role'] == 'assistant') %}" +
            "{{'<|im_start|>assistant<|im_sep|>' + message['content'] + '<|im_end|>'}}{% endif %}{% endfor %}" +
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}"

        private val KNOWN = listOf(
            Triple(PHI3, Family.PHI3, false), Triple(PHI3_5, Family.PHI3, true),
            Triple(PHI4_MINI, Family.PHI4_MINI, false), Triple(PHI4, Family.PHI4, false)
        ).associate { (t, f, skip) -> squeeze(t) to ChatFormat(f, skip) }

        private fun squeeze(t: String) = t.filterNot { it == ' ' || it == '\n' || it == '\t' || it == '\r' }

        /** The format of a template (null: the bundle has none, and edgephi chats with Phi-3's). */
        fun of(template: String?): ChatFormat = KNOWN[squeeze(template ?: PHI3)] ?: throw ChatTemplateException(
            "chat template not one this app writes out (Phi-3, Phi-3.5, Phi-4-mini, Phi-4): " +
                "${template!!.take(60).replace("\n", "\\n")}…; use the WebView engine (Jinja) for this bundle")
    }
}

/** tokenizer_config.json's fields the chat needs: the template (string or named list) and the BOS/EOS strings. */
data class TokenizerConfig(val chatTemplate: String?, val bosToken: String?, val eosToken: String?) {
    companion object {
        fun parse(text: String, jinjaFile: String? = null): TokenizerConfig {
            val d = Json.parse(text) as? Map<*, *> ?: throw BundleException("tokenizer_config.json: not a JSON object")
            var t = d["chat_template"]
            if (t is List<*>) t = t.mapNotNull { it as? Map<*, *> }.firstOrNull { it["name"] == "default" }?.get("template")
            if (t != null && t !is String) throw BundleException("tokenizer_config.json: chat_template is not a string")
            return TokenizerConfig((t as String?) ?: jinjaFile, token(d["bos_token"]), token(d["eos_token"]))
        }

        private fun token(v: Any?): String? = v as? String ?: (v as? Map<*, *>)?.get("content") as? String
    }
}
