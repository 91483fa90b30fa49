#!/usr/bin/env bash
# The core module's JVM tests with Debian's kotlinc (1.3) and JUnit 4 jars: no Gradle.  Usage: run-jvm-tests.sh FIXTURES
set -euo pipefail
fixtures=$(realpath "$1")  # before the cd below
cd "$(dirname "$0")"
out=build/jvm-test
jars=/usr/share/java
cp="$jars/junit4.jar:$jars/hamcrest-core.jar"
rm -rf "$out" && mkdir -p "$out"
kotlinc -nowarn -cp "$cp" src/main/kotlin src/test/kotlin -d "$out/classes" 2>&1 | grep -v -- '-Xverify:none' || true
[ -f "$out/classes/dev/edgephi/core/JsonTest.class" ] || { echo "kotlinc failed"; exit 1; }
tests=$(cd "$out/classes" && ls dev/edgephi/core/*Test.class | sed 's/\.class$//; s#/#.#g')
java -Dedgephi.fixtures="$fixtures" -cp "$out/classes:$cp:$jars/kotlin-stdlib.jar" org.junit.runner.JUnitCore $tests
