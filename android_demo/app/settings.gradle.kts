// The Android app: :core (plain Kotlin, JVM-tested) and :shell (the Android application).  Not built on the
// machines this project is developed on (no Android SDK there); see README.md for the commands.
pluginManagement {
    repositories { google(); mavenCentral(); gradlePluginPortal() }
}
dependencyResolutionManagement {
    repositories { google(); mavenCentral() }
}
rootProject.name = "edgephi-android"
include(":core", ":shell")
