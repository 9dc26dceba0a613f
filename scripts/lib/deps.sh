# Installs the Debian packages tailor's components need, only when they are missing.
# Sourced by scripts/dev and scripts/test; nothing here assumes a running system service.

_apt_updated=0

_apt_install() {
    local sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1; then sudo=(sudo); else
            echo "error: missing packages ($*) and not root; install them or run as root" >&2
            return 1
        fi
    fi
    if [ "$_apt_updated" -eq 0 ]; then
        "${sudo[@]}" apt-get update -q
        _apt_updated=1
    fi
    # Only the packages' binaries are used; their system services are never relied upon.
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q --no-install-recommends "$@"
}

_have_postgres() {
    [ -n "${TAILOR_PG_BIN:-}" ] && [ -x "$TAILOR_PG_BIN/postgres" ] && return 0
    compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null
}

# ensure_deps NAME... where NAME is postgres, registry, skopeo, wrk, ruby (the BOSH template
# harness) or curl (scripts/registry-gc).
ensure_deps() {
    local missing=()
    for dep in "$@"; do
        case "$dep" in
            postgres) _have_postgres || missing+=(postgresql) ;;
            registry) command -v docker-registry >/dev/null 2>&1 || missing+=(docker-registry) ;;
            skopeo) command -v skopeo >/dev/null 2>&1 || missing+=(skopeo) ;;
            wrk) command -v wrk >/dev/null 2>&1 || missing+=(wrk) ;;
            ruby) command -v ruby >/dev/null 2>&1 || missing+=(ruby) ;;
            curl) command -v curl >/dev/null 2>&1 || missing+=(curl) ;;
            *) echo "ensure_deps: unknown dependency $dep" >&2; return 2 ;;
        esac
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        echo "installing missing packages: ${missing[*]}" >&2
        _apt_install "${missing[@]}"
    fi
}
