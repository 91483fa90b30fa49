package dev.edgephi.demo

import dev.edgephi.core.Message

/** Sampling settings the chat screen passes to either engine. */
data class Settings(val maxTokens: Int = 256, val temperature: Double = 0.0, val topP: Double = 1.0, val seed: Long = 0)

/**
 * One way of running the bundle.  generate() streams each token's id and decoded piece to onPiece (called on a
 * background thread) and returns when the answer ends; the caller's core.AnswerStream applies the stop ids and
 * strings and assembles the text.  `description` says which device runs it and why.
 */
interface ChatEngine : AutoCloseable {
    val description: String
    fun generate(messages: List<Message>, settings: Settings, onPiece: (Int, String) -> Boolean): String?
    fun cancel()
}
