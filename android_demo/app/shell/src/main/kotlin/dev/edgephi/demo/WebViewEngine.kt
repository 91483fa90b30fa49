package dev.edgephi.demo

import android.annotation.SuppressLint
import android.content.Context
import android.os.Handler
import android.os.Looper
import android.webkit.JavascriptInterface
import android.webkit.WebResourceRequest
import android.webkit.WebResourceResponse
import android.webkit.WebView
import android.webkit.WebViewClient
import androidx.webkit.WebViewAssetLoader
import dev.edgephi.core.Message
import java.io.File
import java.util.concurrent.CountDownLatch
import java.util.concurrent.TimeUnit

/**
 * The second engine: an off-screen WebView running the browser runtime (assets/web: android_demo/web's src/ and
 * vendor/, copied by the build) on the bundle's web/ folder.  Pages come from https://appassets.androidplatform.net
 * (WebViewAssetLoader): /assets/web/ from the APK, /bundle/ from the bundle folder; every response carries
 * COOP/COEP so the page is cross-origin isolated and WASM runs threads.  The runtime picks WebGPU where the
 * WebView has it, WASM otherwise, and says why (description).
 */
@SuppressLint("SetJavaScriptEnabled")
class WebViewEngine(context: Context, bundle: File) : ChatEngine {
    private val main = Handler(Looper.getMainLooper())
    private val web = WebView(context)
    private val loaded = CountDownLatch(1)
    @Volatile private var onPiece: ((Int, String) -> Boolean)? = null
    @Volatile private var finished: CountDownLatch? = null
    @Volatile private var result: String? = null
    @Volatile override var description: String = "WebView (loading)"
        private set
    @Volatile private var error: String? = null

    init {
        val loader = WebViewAssetLoader.Builder()
            .addPathHandler("/assets/", WebViewAssetLoader.AssetsPathHandler(context))
            .addPathHandler("/bundle/", FolderPathHandler(bundle))
            .build()
        web.settings.javaScriptEnabled = true
        web.webViewClient = object : WebViewClient() {
            override fun shouldInterceptRequest(view: WebView, request: WebResourceRequest): WebResourceResponse? =
                loader.shouldInterceptRequest(request.url)?.also {
                    it.responseHeaders = (it.responseHeaders ?: emptyMap()) + mapOf(
                        "Cross-Origin-Opener-Policy" to "same-origin", "Cross-Origin-Embedder-Policy" to "require-corp")
                }
        }
        web.addJavascriptInterface(Bridge(), "EdgephiAndroid")
        web.loadUrl("https://appassets.androidplatform.net/assets/web/android.html")
        if (!loaded.await(10, TimeUnit.MINUTES)) error = "the WebView did not load the model within 10 minutes"
        error?.let { throw IllegalStateException(it) }
    }

    private inner class Bridge {
        @JavascriptInterface fun ready(engine: String, reason: String) { description = "WebView, $engine: $reason"; loaded.countDown() }
        @JavascriptInterface fun failed(message: String) { error = message; loaded.countDown(); finished?.countDown() }
        @JavascriptInterface fun token(id: Int, text: String): Boolean = onPiece?.invoke(id, text) ?: false
        @JavascriptInterface fun done(reason: String) { result = reason; finished?.countDown() }
    }

    override fun generate(messages: List<Message>, settings: Settings, onPiece: (Int, String) -> Boolean): String? {
        this.onPiece = onPiece
        val latch = CountDownLatch(1)
        finished = latch
        val json = messages.joinToString(",", "[", "]") { "{\"role\":${quote(it.role)},\"content\":${quote(it.content)}}" }
        val opts = "{\"maxTokens\":${settings.maxTokens},\"temperature\":${settings.temperature}," +
            "\"topP\":${settings.topP},\"seed\":${settings.seed}}"
        main.post { web.evaluateJavascript("edgephiChat($json, $opts)", null) }
        latch.await()
        error?.let { throw IllegalStateException(it) }
        return result
    }

    override fun cancel() { main.post { web.evaluateJavascript("edgephiStop()", null) } }

    override fun close() { main.post { web.destroy() } }

    private fun quote(s: String): String {
        val b = StringBuilder("\"")
        for (c in s) when {
            c == '"' -> b.append("\\\"")
            c == '\\' -> b.append("\\\\")
            c < ' ' || c == '\u2028' || c == '\u2029' -> b.append(String.format("\\u%04x", c.code))
            else -> b.append(c)
        }
        return b.append('"').toString()
    }
}

/** Files under `root` (the bundle the user pushed into the app's external files), nothing outside it. */
class FolderPathHandler(root: File) : WebViewAssetLoader.PathHandler {
    private val base = root.canonicalFile

    override fun handle(path: String): WebResourceResponse? {
        val f = File(base, path).canonicalFile
        if (!f.path.startsWith(base.path + File.separator) || !f.isFile) return null
        val type = when (f.extension) { "json" -> "application/json"; "jinja" -> "text/plain"; else -> "application/octet-stream" }
        return WebResourceResponse(type, null, f.inputStream())
    }
}
