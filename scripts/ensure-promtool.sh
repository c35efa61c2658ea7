# Sourced by scripts/test: puts promtool on PATH for tests/unit/test_prometheus.py, which checks
# prometheus/*.yml with it. promtool comes from Debian's prometheus package; it is installed
# with apt-get when missing (CI runs as root on a fresh Debian machine). Where it cannot be
# installed, this says so and the test fails with the same advice: never a silent skip.

ensure_promtool() {
    command -v promtool >/dev/null 2>&1 && return 0
    local advice="install promtool (Debian: apt-get install --no-install-recommends prometheus)"
    local -a root=()
    if ((EUID != 0)); then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
            root=(sudo -n)
        else
            echo "promtool: not found, and installing it needs root; $advice" >&2
            return 0
        fi
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "promtool: not found, and there is no apt-get; $advice" >&2
        return 0
    fi
    echo "promtool: installing Debian's prometheus package" >&2
    local log
    log=$(mktemp)
    # Without `apt-get update` first when the package lists already have it (quick); with it
    # once when they do not (a fresh image ships without lists).
    if ! "${root[@]}" env DEBIAN_FRONTEND=noninteractive \
            apt-get install -y -qq --no-install-recommends prometheus >"$log" 2>&1; then
        if ! { "${root[@]}" apt-get update -qq && "${root[@]}" env DEBIAN_FRONTEND=noninteractive \
                apt-get install -y -qq --no-install-recommends prometheus; } >"$log" 2>&1; then
            tail -n 20 "$log" >&2
            echo "promtool: apt-get could not install prometheus; $advice" >&2
        fi
    fi
    rm -f "$log"
    return 0
}
