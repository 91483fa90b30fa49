package dev.edgephi.core

import java.io.File

/** The directory core/fixtures.py wrote (system property edgephi.fixtures; the Makefile sets it). */
object Fixtures {
    val dir: File by lazy {
        val d = System.getProperty("edgephi.fixtures") ?: error("set -Dedgephi.fixtures=DIR (core/fixtures.py DIR makes it)")
        File(d).also { require(it.isDirectory) { "$it: no fixtures directory; run core/fixtures.py $it" } }
    }
}
