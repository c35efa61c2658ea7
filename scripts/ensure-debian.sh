# Sourced by scripts/test: the Debian tools that tests need, installed with apt-get when missing
# (CI runs as root on a fresh Debian machine). Where one cannot be installed, this says so and
# its tests fail with the same advice: never a silent skip.
#   promtool (package prometheus): tests/unit/test_prometheus.py checks prometheus/*.yml with it.
#   ruby with the redis gem (ruby, ruby-redis): the README's Ruby snippets run with a real client
#   (tests/unit/test_readme.py, tests/integration/test_retrain_runs.py).

# ensure_debian NAME CHECK-COMMAND PACKAGE...: run CHECK-COMMAND; when it fails, install PACKAGEs.
ensure_debian() {
    local name=$1 check=$2
    shift 2
    bash -c "$check" >/dev/null 2>&1 && return 0
    local advice="install it (Debian: apt-get install --no-install-recommends $*)"
    local -a root=()
    if ((EUID != 0)); then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
            root=(sudo -n)
        else
            echo "$name: not found, and installing it needs root; $advice" >&2
            return 0
        fi
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "$name: not found, and there is no apt-get; $advice" >&2
        return 0
    fi
    echo "$name: installing Debian's $* package(s)" >&2
    local log
    log=$(mktemp)
    # Without `apt-get update` first when the package lists already have them (quick); with it
    # once when they do not (a fresh image ships without lists).
    if ! "${root[@]}" env DEBIAN_FRONTEND=noninteractive \
            apt-get install -y -qq --no-install-recommends "$@" >"$log" 2>&1; then
        if ! { "${root[@]}" apt-get update -qq && "${root[@]}" env DEBIAN_FRONTEND=noninteractive \
                apt-get install -y -qq --no-install-recommends "$@"; } >"$log" 2>&1; then
            tail -n 20 "$log" >&2
            echo "$name: apt-get could not install $*; $advice" >&2
        fi
    fi
    rm -f "$log"
    return 0
}

ensure_promtool() { ensure_debian promtool "command -v promtool" prometheus; }
ensure_ruby() { ensure_debian "ruby with the redis gem" "ruby -e 'require \"redis\"'" ruby ruby-redis; }
