package dev.edgephi.core

import org.junit.Assert.assertEquals
import org.junit.Assert.assertTrue
import org.junit.Assert.fail
import org.junit.Test
import java.io.File
import java.nio.file.Files

class ManifestTest {
    private val bundle = File(Fixtures.dir, "bundle")
    private val text = File(bundle, "manifest.json").readText()

    @Test
    fun readsTheBuiltInModelsBundle() {
        val m = Manifest.load(bundle)
        assertEquals("phi3", m.modelType)
        assertEquals(4096, m.vocabSize)
        assertEquals(2048, m.contextLength)
        assertEquals(setOf(1, 4, 5), m.stopIds)
        assertEquals(1, m.bosId)
        val onnx = m.format("onnx")
        assertEquals("onnx/model.onnx", onnx.entry)
        assertEquals("onnx", onnx.folder)
        assertEquals(4, onnx.bits)
        assertTrue(onnx.files.contains("onnx/genai_config.json"))
        assertTrue(m.tokenizerFiles.contains("tokenizer.json"))
    }

    @Test
    fun aMissingFormatSaysHowToExportIt() {
        expect("has no web model (it has onnx); export it with `edgephi export MODEL --format web`") {
            Manifest.parse(text).format("web")
        }
    }

    @Test
    fun corruptFieldsAreNamed() {
        expect("corrupt manifest (JSON:") { Manifest.parse(text.substring(0, text.length / 2)) }
        expect("schema 2; this app reads schema 1") { Manifest.parse(text.replace("\"schema\": 1", "\"schema\": 2")) }
        expect("field 'stop_ids' is [1, 4, 99999]") { Manifest.parse(text.replace(Regex("\"stop_ids\": \\[[^]]*]"), "\"stop_ids\": [1, 4, 99999]")) }
        expect("missing field 'context_length'") { Manifest.parse(text.replace("\"context_length\"", "\"context_len\"")) }
        expect("is not a path inside the bundle") { Manifest.parse(text.replace("\"onnx/model.onnx\",", "\"../model.onnx\",")) }
    }

    @Test
    fun aTruncatedFileIsRefusedWithItsSizes() {
        val copy = Files.createTempDirectory("edgephi-bundle").toFile()
        try {
            bundle.copyRecursively(copy)
            val data = File(copy, "onnx/model.onnx.data")
            val size = data.length()
            java.io.RandomAccessFile(data, "rw").use { it.setLength(size / 2) }
            expect("model.onnx.data: ${size / 2} bytes, manifest.json recorded $size") { Manifest.load(copy) }
            data.delete()
            expect("model.onnx.data: listed in manifest.json but missing") { Manifest.load(copy) }
        } finally {
            copy.deleteRecursively()
        }
    }

    private fun expect(part: String, block: () -> Unit) {
        try {
            block()
            fail("no error; expected one with: $part")
        } catch (e: BundleException) {
            assertTrue("'${e.message}' lacks '$part'", e.message!!.contains(part))
        }
    }
}
