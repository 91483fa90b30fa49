package dev.edgephi.demo

import ai.onnxruntime.genai.Config
import ai.onnxruntime.genai.Generator
import ai.onnxruntime.genai.GeneratorParams
import ai.onnxruntime.genai.Model
import ai.onnxruntime.genai.Tokenizer
import android.os.Build
import dev.edgephi.core.ChatFormat
import dev.edgephi.core.Message
import java.io.File

/**
 * onnxruntime-genai on the bundle's onnx/ folder, untouched (genai_config.json, model.onnx + .data, tokenizer).
 * device "cpu" or "qnn": QNN appends the QNN execution provider with the HTP backend; nodes it cannot place run on
 * the CPU, so the screen reports it as "QNN (HTP, CPU fallback)".  The prompt is core.ChatFormat's rendering,
 * encoded by genai's own tokenizer (the same ids as edgephi's: tests/test_interop.py).
 */
class GenaiEngine(folder: File, private val format: ChatFormat, private val eosToken: String, device: String) : ChatEngine {
    private val model: Model
    private val tokenizer: Tokenizer
    @Volatile private var cancelled = false
    override val description: String

    init {
        val config = Config(folder.path)
        config.clearProviders()
        if (device == "qnn") {
            config.appendProvider("qnn")
            config.setProviderOption("qnn", "backend_path", "libQnnHtp.so")
            config.setProviderOption("qnn", "htp_performance_mode", "burst")
        }
        model = Model(config)
        tokenizer = Tokenizer(model)
        description = if (device == "qnn") "onnxruntime-genai, QNN (HTP, CPU fallback) on ${soc()}"
        else "onnxruntime-genai, CPU (${Runtime.getRuntime().availableProcessors()} cores)"
    }

    override fun generate(messages: List<Message>, settings: Settings, onPiece: (Int, String) -> Boolean): String? {
        cancelled = false
        val ids = tokenizer.encode(format.render(messages, true, eosToken))
        val params = GeneratorParams(model)
        params.setSearchOption("max_length", (ids.getSequence(0).size + settings.maxTokens).toDouble())
        params.setSearchOption("do_sample", settings.temperature > 0)
        if (settings.temperature > 0) {
            params.setSearchOption("temperature", settings.temperature)
            params.setSearchOption("top_p", settings.topP)
            params.setSearchOption("random_seed", settings.seed.toDouble())
        }
        Generator(model, params).use { gen ->
            gen.appendTokenSequences(ids)
            tokenizer.createStream().use { stream ->
                while (!gen.isDone && !cancelled) {
                    gen.generateNextToken()
                    val id = gen.getLastTokenInSequence(0)
                    if (!onPiece(id, stream.decode(id))) return null
                }
            }
            return if (cancelled) "cancelled" else "length"
        }
    }

    override fun cancel() { cancelled = true }

    override fun close() {
        tokenizer.close()
        model.close()
    }

    companion object {
        /** Why QNN is not offered on this phone, or null when it is worth trying. */
        fun qnnUnavailable(nativeLibDir: String): String? {
            val soc = soc()
            if (!soc.startsWith("SM") && !soc.startsWith("QCS") && !soc.contains("Qualcomm", true)) {
                return "no Snapdragon SoC ($soc)"
            }
            if (!File(nativeLibDir, "libQnnHtp.so").exists()) return "libQnnHtp.so is not in the APK"
            return null
        }

        fun soc(): String = if (Build.VERSION.SDK_INT >= 31) "${Build.SOC_MANUFACTURER} ${Build.SOC_MODEL}" else Build.HARDWARE
    }
}
