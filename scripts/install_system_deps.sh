#!/usr/bin/env bash
# Installs what the tests and the demo need from the system, only when missing:
# Java for ScienceWorld and TextWorldExpress, OpenBLAS for fast MLX matmuls on Linux CPU and a C compiler to build
# duomem_mlx/cpu/gemv_forward.c (MLX's one-row products through OpenBLAS's sgemv).
set -euo pipefail
missing=()
java_runs() {  # `java` must run: macOS's /usr/bin/java is a stub that fails when no JDK is installed
  java -version >/dev/null 2>&1 || { [ -n "${JAVA_HOME:-}" ] && "$JAVA_HOME/bin/java" -version >/dev/null 2>&1; } ||
    { [ -x /usr/libexec/java_home ] && /usr/libexec/java_home >/dev/null 2>&1; }
}
java_runs || missing+=(default-jre-headless)
if [ "$(uname -s)" = Linux ] && ! ls /usr/lib/*/openblas-pthread/libopenblas.so.0 >/dev/null 2>&1; then
  missing+=(libopenblas0-pthread)
fi
if [ "$(uname -s)" = Linux ] && ! command -v cc >/dev/null 2>&1 && ! command -v gcc >/dev/null 2>&1; then
  missing+=(gcc libc6-dev)
fi
[ ${#missing[@]} -eq 0 ] && exit 0
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "installing ${missing[*]} (apt-get)"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
elif command -v apt-get >/dev/null 2>&1; then
  echo "missing ${missing[*]}: run 'sudo apt-get install ${missing[*]}'" >&2
  exit 1
elif [ "$(uname -s)" = Darwin ]; then
  echo "Error: no Java runs; ScienceWorld and TextWorldExpress need Java 11+: brew install openjdk, then" \
    "export JAVA_HOME=\$(brew --prefix openjdk)/libexec/openjdk.jdk/Contents/Home" \
    "(or put \$(brew --prefix openjdk)/bin first on PATH)" >&2
  exit 1
else
  echo "note: ${missing[*]} not found; ScienceWorld and TextWorldExpress need Java 11+" >&2
fi
