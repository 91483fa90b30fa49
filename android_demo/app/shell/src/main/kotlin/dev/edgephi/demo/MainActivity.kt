package dev.edgephi.demo

import android.app.Activity
import android.os.Bundle
import android.widget.AdapterView
import android.widget.ArrayAdapter
import android.widget.Button
import android.widget.EditText
import android.widget.ScrollView
import android.widget.Spinner
import android.widget.TextView
import dev.edgephi.core.AnswerStream
import dev.edgephi.core.ChatFormat
import dev.edgephi.core.Manifest
import dev.edgephi.core.Message
import dev.edgephi.core.TokenizerConfig
import java.io.File
import java.util.concurrent.Executors

/**
 * The chat screen.  The bundle is the folder `adb push`ed to the app's external files (README.md); the engine is
 * chosen in the spinner: onnxruntime-genai on the CPU, on the NPU through QNN (offered only on a Snapdragon with
 * the HTP libraries in the APK, else the reason is shown), or the WebView running the browser runtime.
 */
class MainActivity : Activity() {
    private val worker = Executors.newSingleThreadExecutor()
    private lateinit var status: TextView
    private lateinit var log: TextView
    private lateinit var input: EditText
    private var engine: ChatEngine? = null
    private var manifest: Manifest? = null
    private var format: ChatFormat? = null
    private val messages = ArrayList<Message>()

    private val bundleDir: File get() = File(getExternalFilesDir(null), "bundle")

    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        setContentView(R.layout.activity_main)
        status = findViewById(R.id.status)
        log = findViewById(R.id.log)
        input = findViewById(R.id.input)
        val qnnWhy = GenaiEngine.qnnUnavailable(applicationInfo.nativeLibraryDir)
        val choices = listOf("onnxruntime-genai · CPU", "onnxruntime-genai · NPU (QNN)" + (qnnWhy?.let { " — not here: $it" } ?: ""),
            "WebView · browser runtime (WebGPU / WASM)")
        val spinner = findViewById<Spinner>(R.id.engine)
        spinner.adapter = ArrayAdapter(this, android.R.layout.simple_spinner_dropdown_item, choices)
        spinner.onItemSelectedListener = object : AdapterView.OnItemSelectedListener {
            override fun onItemSelected(p: AdapterView<*>?, v: android.view.View?, pos: Int, id: Long) = load(pos, qnnWhy)
            override fun onNothingSelected(p: AdapterView<*>?) {}
        }
        findViewById<Button>(R.id.pick).setOnClickListener { load(spinner.selectedItemPosition, qnnWhy) }
        findViewById<Button>(R.id.send).setOnClickListener { send() }
        findViewById<Button>(R.id.stop).setOnClickListener { engine?.cancel() }
    }

    private fun load(choice: Int, qnnWhy: String?) {
        status.text = "Loading ${bundleDir} …"
        worker.execute {
            val text = try {
                engine?.close()
                engine = null
                val m = Manifest.load(bundleDir)
                val tok = File(bundleDir, "tokenizer_config.json")
                val jinja = File(bundleDir, "chat_template.jinja").takeIf { it.isFile }?.readText()
                val cfg = if (tok.isFile) TokenizerConfig.parse(tok.readText(), jinja) else TokenizerConfig(jinja, null, null)
                val e = when (choice) {
                    0 -> GenaiEngine(File(bundleDir, m.format("onnx").folder), ChatFormat.of(cfg.chatTemplate), cfg.eosToken ?: "", "cpu")
                    1 -> {
                        if (qnnWhy != null) throw IllegalStateException("NPU (QNN) not available: $qnnWhy")
                        GenaiEngine(File(bundleDir, m.format("onnx").folder), ChatFormat.of(cfg.chatTemplate), cfg.eosToken ?: "", "qnn")
                    }
                    else -> { m.format("web"); WebViewEngine(this, bundleDir) }
                }
                manifest = m
                engine = e
                messages.clear()
                "${m.name} · ${e.description} · context ${m.contextLength}"
            } catch (e: Exception) {
                "Could not load the model: ${e.message}"
            }
            runOnUiThread { status.text = text; log.text = "" }
        }
    }

    private fun send() {
        val e = engine ?: return
        val m = manifest ?: return
        val text = input.text.toString().trim()
        if (text.isEmpty()) return
        input.setText("")
        messages.add(Message("user", text))
        log.append("\n> $text\n")
        worker.execute {
            val answer = AnswerStream(m.stopIds, maxTokens = 256)
            val reason = try {
                e.generate(messages, Settings()) { id, piece ->
                    val shown = answer.add(id, piece)
                    if (shown.isNotEmpty()) runOnUiThread { log.append(shown); scrollDown() }
                    !answer.done
                }
            } catch (err: Exception) {
                runOnUiThread { status.text = err.message }
                "error"
            }
            val rest = answer.finish(reason ?: "stop")
            messages.add(Message("assistant", answer.text))
            runOnUiThread { log.append(rest + "\n[" + answer.summary() + "]\n"); scrollDown() }
        }
    }

    private fun scrollDown() = findViewById<ScrollView>(R.id.scroll).post { findViewById<ScrollView>(R.id.scroll).fullScroll(ScrollView.FOCUS_DOWN) }

    override fun onDestroy() {
        engine?.close()
        worker.shutdown()
        super.onDestroy()
    }
}
