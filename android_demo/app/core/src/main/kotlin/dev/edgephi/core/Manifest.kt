package dev.edgephi.core

import java.io.File

/** A bundle that is missing, incomplete, or whose manifest.json is corrupt; the message names the file and field. */
class BundleException(message: String) : IllegalArgumentException(message)

/** One format's entry in manifest.json (edgephi/manifest.py's FormatEntry). */
data class FormatEntry(
    val format: String,
    val entry: String,
    val files: List<String>,
    val bits: Int,
    val quant: String,
    val sizes: Map<String, Long>,
    val extra: Map<String, Any?>
) {
    /** The folder of the entry, relative to the bundle ("onnx", "web"). */
    val folder: String get() = entry.substringBeforeLast('/', "")
}

/**
 * manifest.json as edgephi writes it (schema 1): what the bundle holds, its stop ids and context.  parse() checks
 * the types of the fields the app uses, as edgephi/manifest.py does, and checkFiles() that every listed file is
 * there with its recorded size (a half-copied bundle is refused before a session opens it).
 */
data class Manifest(
    val name: String,
    val modelType: String,
    val vocabSize: Int,
    val contextLength: Int,
    val stopIds: Set<Int>,
    val bosId: Int?,
    val formats: Map<String, FormatEntry>,
    val tokenizerFiles: List<String>,
    val edgephiVersion: String
) {
    fun format(name: String): FormatEntry = formats[name] ?: throw BundleException(
        "$MANIFEST: the bundle has no $name model (it has ${formats.keys.joinToString(", ")}); export it with " +
            "`edgephi export MODEL --format $name`")

    fun checkFiles(root: File) {
        for (f in tokenizerFiles) {
            if (!File(root, f).isFile) throw BundleException("${File(root, f)}: tokenizer file listed in $MANIFEST but missing")
        }
        for (e in formats.values) for (f in e.files) {
            val p = File(root, f)
            if (!p.exists()) throw BundleException("$p: listed in $MANIFEST but missing")
            val want = e.sizes[f] ?: continue
            val got = treeSize(p)
            if (got != want) throw BundleException("$p: $got bytes, $MANIFEST recorded $want: the file was truncated " +
                "or replaced after export; copy the bundle again")
        }
    }

    companion object {
        const val MANIFEST = "manifest.json"
        const val SCHEMA = 1L

        fun load(root: File): Manifest {
            val path = File(root, MANIFEST)
            if (!path.isFile) throw BundleException("$path: missing; $root is not a complete edgephi bundle")
            val m = parse(path.readText(Charsets.UTF_8), path.toString())
            m.checkFiles(root)
            return m
        }

        fun parse(text: String, where: String = MANIFEST): Manifest {
            val d = try {
                Json.parse(text)
            } catch (e: JsonException) {
                throw BundleException("$where: corrupt manifest (${e.message})")
            }
            val top = d as? Map<*, *> ?: throw BundleException("$where: corrupt manifest (not a JSON object)")
            val schema = top["schema"]
            if (schema != SCHEMA) throw BundleException("$where: schema $schema; this app reads schema $SCHEMA")
            val spec = obj(top, "spec", where)
            val vocab = int(spec, "vocab_size", "$where: spec")
            if (vocab <= 0) throw BundleException("$where: spec: field 'vocab_size' is $vocab; it must be > 0")
            val isId = { v: Any? -> v is Long && v >= 0 && v < vocab }
            val stops = list(top, "stop_ids", where)
            if (!stops.all(isId)) throw BundleException("$where: field 'stop_ids' is $stops; it must be a list of " +
                "token ids in 0..${vocab - 1}")
            val bos = top["bos_id"]
            if (bos != null && !isId(bos)) throw BundleException("$where: field 'bos_id' is $bos; it must be null or " +
                "a token id in 0..${vocab - 1}")
            val formats = obj(top, "formats", where)
            if (formats.isEmpty()) throw BundleException("$where: field 'formats' names no format")
            val ctx = int(top, "context_length", where)
            if (ctx <= 0) throw BundleException("$where: field 'context_length' is $ctx; it must be > 0")
            return Manifest(
                name = (spec["name"] as? String) ?: (spec["model_type"] as? String) ?: "model",
                modelType = str(spec, "model_type", "$where: spec"),
                vocabSize = vocab,
                contextLength = ctx,
                stopIds = stops.map { (it as Long).toInt() }.toSet(),
                bosId = (bos as Long?)?.toInt(),
                formats = formats.entries.associate { (k, v) -> k.toString() to entry(k.toString(), v, where) },
                tokenizerFiles = list(top, "tokenizer_files", where).map { path(it, "$where: tokenizer_files") },
                edgephiVersion = str(top, "edgephi_version", where)
            )
        }

        private fun entry(name: String, v: Any?, where: String): FormatEntry {
            val at = "$where: formats['$name']"
            val e = v as? Map<*, *> ?: throw BundleException("$at is $v; it must be an object")
            val files = list(e, "files", at).map { path(it, "$at: files") }
            if (files.isEmpty()) throw BundleException("$at: field 'files' is empty")
            val entry = path(e["entry"], "$at: entry")
            if (files.none { entry == it || entry.startsWith(it.trimEnd('/') + "/") }) {
                throw BundleException("$at: entry '$entry' is not one of its files")
            }
            val sizes = (e["sizes"] as? Map<*, *> ?: emptyMap<String, Any?>()).entries.associate { (f, n) ->
                if (n !is Long || n < 0) throw BundleException("$at: sizes['$f'] is $n; it must be a size in bytes")
                f.toString() to n
            }
            @Suppress("UNCHECKED_CAST")
            return FormatEntry(str(e, "format", at), entry, files, int(e, "bits", at), str(e, "quant", at), sizes,
                (e["extra"] as? Map<String, Any?>) ?: emptyMap())
        }

        private fun obj(d: Map<*, *>, key: String, where: String): Map<*, *> =
            d[key] as? Map<*, *> ?: throw missingOr(d, key, where, "an object")

        private fun list(d: Map<*, *>, key: String, where: String): List<*> =
            d[key] as? List<*> ?: throw missingOr(d, key, where, "a list")

        private fun str(d: Map<*, *>, key: String, where: String): String =
            d[key] as? String ?: throw missingOr(d, key, where, "a string")

        private fun int(d: Map<*, *>, key: String, where: String): Int {
            val v = d[key] as? Long ?: throw missingOr(d, key, where, "an integer")
            if (v > Int.MAX_VALUE || v < Int.MIN_VALUE) throw BundleException("$where: field '$key' is $v; out of range")
            return v.toInt()
        }

        private fun path(v: Any?, where: String): String {
            val ok = v is String && v.isNotEmpty() && !v.startsWith("/") && '\\' !in v && v.split('/').none { it == ".." }
            if (!ok) throw BundleException("$where: $v is not a path inside the bundle")
            return v as String
        }

        private fun missingOr(d: Map<*, *>, key: String, where: String, what: String) = BundleException(
            if (key !in d) "$where: missing field '$key'" else "$where: field '$key' is ${d[key]}; it must be $what")

        private fun treeSize(f: File): Long =
            if (f.isFile) f.length() else f.walk().filter { it.isFile }.map { it.length() }.sum()
    }
}
