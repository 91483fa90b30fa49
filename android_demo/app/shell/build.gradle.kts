// The chat app.  Engines: onnxruntime-genai on the bundle's onnx/ folder (CPU; NPU through QNN where the phone
// has a Hexagon HTP), and a WebView running the browser runtime (android_demo/web) on the bundle's web/ folder.
plugins {
    id("com.android.application")
    id("org.jetbrains.kotlin.android")
}

android {
    namespace = "dev.edgephi.demo"
    compileSdk = 35
    defaultConfig {
        applicationId = "dev.edgephi.demo"
        minSdk = 26          // Android 8.0: WebView with WebAssembly SIMD via updates, onnxruntime-genai's AAR
        targetSdk = 35
        versionCode = 1
        versionName = "0.1.0"
        ndk { abiFilters += listOf("arm64-v8a") }
    }
    // 16 KB pages (Android 15+): native libraries are stored uncompressed and 16 KB-aligned in the APK (AGP >= 8.5.1
    // does this when legacy packaging is off); tools/check_16k.py checks the APK's .so files (ELF LOAD alignment
    // >= 16 KB and zip offsets).  onnxruntime's own .so files must be built 16 KB-aligned, which check_16k.py
    // reports for the versions below.
    packaging { jniLibs { useLegacyPackaging = false } }
    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_17
        targetCompatibility = JavaVersion.VERSION_17
    }
    kotlinOptions { jvmTarget = "17" }
    buildTypes { release { isMinifyEnabled = false } }
}

// the browser runtime for the WebView engine: web/src, web/vendor (npm ci in ../web makes it) and the bridge page
val copyWebRuntime by tasks.registering(Copy::class) {
    val web = rootProject.file("../web")
    from(web) { include("src/**", "vendor/**", "android.html") }
    into(layout.projectDirectory.dir("src/main/assets/web"))
    doFirst { check(File(web, "vendor").isDirectory) { "run `npm ci` in $web first (it makes vendor/)" } }
}
tasks.named("preBuild") { dependsOn(copyWebRuntime) }

dependencies {
    implementation(project(":core"))
    implementation("com.microsoft.onnxruntime:onnxruntime-genai-android:0.18.0")  // as the Python package tested here
    implementation("com.microsoft.onnxruntime:onnxruntime-android-qnn:1.22.0")     // QNN EP + libQnnHtp*.so
    implementation("androidx.webkit:webkit:1.12.1")
    implementation("androidx.appcompat:appcompat:1.7.0")
    implementation("org.jetbrains.kotlinx:kotlinx-coroutines-android:1.9.0")
}
