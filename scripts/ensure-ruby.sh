# Sourced by scripts/test: puts ruby with the `redis` gem on PATH for the tests that run the
# README's Ruby snippets with a real Ruby client (tests/integration/test_retrain_runs.py). Both
# come from Debian (ruby, ruby-redis), installed with apt-get when missing (CI runs as root on a
# fresh Debian machine). Where they cannot be installed, this says so and the tests fail with the
# same advice: never a silent skip.

ensure_ruby() {
    ruby -e 'require "redis"' >/dev/null 2>&1 && return 0
    local advice="install Ruby and the redis gem (Debian: apt-get install --no-install-recommends ruby ruby-redis)"
    local -a root=()
    if ((EUID != 0)); then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
            root=(sudo -n)
        else
            echo "ruby: not found with the redis gem, and installing it needs root; $advice" >&2
            return 0
        fi
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "ruby: not found with the redis gem, and there is no apt-get; $advice" >&2
        return 0
    fi
    echo "ruby: installing Debian's ruby and ruby-redis packages" >&2
    local log
    log=$(mktemp)
    # Without `apt-get update` first when the package lists already have them (quick); with it
    # once when they do not (a fresh image ships without lists).
    if ! "${root[@]}" env DEBIAN_FRONTEND=noninteractive \
            apt-get install -y -qq --no-install-recommends ruby ruby-redis >"$log" 2>&1; then
        if ! { "${root[@]}" apt-get update -qq && "${root[@]}" env DEBIAN_FRONTEND=noninteractive \
                apt-get install -y -qq --no-install-recommends ruby ruby-redis; } >"$log" 2>&1; then
            tail -n 20 "$log" >&2
            echo "ruby: apt-get could not install ruby ruby-redis; $advice" >&2
        fi
    fi
    rm -f "$log"
    return 0
}
