// Plain Kotlin (no Android API): manifest reading, chat formatting, stop handling, streaming text assembly.
// Written to compile with Kotlin 1.3 (Debian's kotlinc, run-jvm-tests.sh) and with this build's Kotlin 2.0.
plugins { id("org.jetbrains.kotlin.jvm") }

kotlin { jvmToolchain(17) }

dependencies { testImplementation("junit:junit:4.13.2") }

tasks.test {
    // fixtures from edgephi's Python side: `python core/fixtures.py core/build/fixtures` (make -C android_demo test-jvm)
    systemProperty("edgephi.fixtures", layout.buildDirectory.dir("fixtures").get().asFile.path)
}
