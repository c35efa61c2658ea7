# Sourced by scripts/test and scripts/demo: puts a recent-enough uv on PATH, installing it
# with pip on first use. --target keeps it out of the system Python (and out of PEP 668's way).

STILLTAG_UV_VERSION=0.13.9        # installed when no usable uv is found
STILLTAG_UV_MIN_MINOR=9           # uv 0.9 or newer reads uv.lock

_uv_usable() {
    local version
    version=$("$1" --version 2>/dev/null | awk '{print $2}') || return 1
    [[ $version =~ ^0\.([0-9]+)\. ]] && (( BASH_REMATCH[1] >= STILLTAG_UV_MIN_MINOR )) && return 0
    [[ $version =~ ^[1-9][0-9]*\. ]]
}

ensure_uv() {
    if command -v uv >/dev/null 2>&1 && _uv_usable uv; then
        return 0
    fi
    local target="${XDG_CACHE_HOME:-$HOME/.cache}/stilltag/uv-$STILLTAG_UV_VERSION"
    if [[ ! -x $target/bin/uv ]]; then
        local python
        python=$(command -v python3 || command -v python) || {
            echo "stilltag needs Python 3.11+ with pip; no python3 found" >&2
            return 1
        }
        echo "installing uv $STILLTAG_UV_VERSION with pip into $target" >&2
        "$python" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --target "$target" \
            "uv==$STILLTAG_UV_VERSION"
    fi
    export PATH="$target/bin:$PATH"
    _uv_usable uv || { echo "uv at $target/bin/uv does not run" >&2; return 1; }
}
