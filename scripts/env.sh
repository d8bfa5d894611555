# Sourced by the other scripts: where cargo builds. The target directory lives outside the clone
# (like the Kafka jars) so a fresh clone on the same machine reuses the build.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-${WEIR_CACHE:-$HOME/.cache/weir}/target}
