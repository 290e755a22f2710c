#!/bin/sh
# Outpost installer, as served by `outpost-cloud serve --releases DIR` at /install.sh.
#
#   curl -sfL --cacert ca.crt https://CLOUD:8444/install.sh | sh -s - --token OPT1.…
#
# Options (each also as an environment variable):
#   --token T          OUTPOST_TOKEN             join token from `outpost-cloud token create NODE`
#   --url URL          OUTPOST_URL               the cloud's hub URL (default: the serving cloud)
#   --node-name N      OUTPOST_NODE_NAME         node name (default: the host name)
#   --data-dir D       OUTPOST_DATA_DIR          the agent's data folder (/var/lib/outpost)
#   --version V        INSTALL_OUTPOST_VERSION   release to install (default: the cloud's latest)
#   --bin-dir D        INSTALL_OUTPOST_BIN_DIR   where outpost goes (/usr/local/bin)
#   --release-url U    INSTALL_OUTPOST_RELEASE_URL  a mirror of /releases (https:// or file://)
#   --skip-start       INSTALL_OUTPOST_SKIP_START=true  install and enable, but do not start
#   --init I           INSTALL_OUTPOST_INIT      systemd or none (default: detected)
#                      INSTALL_OUTPOST_SYSTEMD_DIR  where the unit goes (/etc/systemd/system)
#
# The binary and the unit are checked against SHA256SUMS, and SHA256SUMS against its Ed25519
# signature with the key pinned below; the binary must run here (`outpost version`) before it
# replaces anything. A second run changes nothing and says so. The binary unpacks itself on its
# first start: everything this script runs, and the agent through outpost.env, unpacks into
# /var/cache/outpost/ (XDG_CACHE_HOME=/var/cache), not into root's home.
# outpost-uninstall.sh (next to the binary) removes what this installed.
#
# The whole script is one function, called on the last line: a download cut short runs nothing.

outpost_install() {
    set -eu
    umask 022

    # Pinned by the cloud that served this script.
    pinned_base_url='@@BASE_URL@@'
    pinned_cloud_url='@@CLOUD_URL@@'
    pinned_version='@@DEFAULT_VERSION@@'
    pinned_release_key='@@RELEASE_PUBKEY@@'
    pinned_cloud_ca='@@CLOUD_CA@@'

    info() { echo "[outpost] $*" >&2; }
    fatal() {
        echo "[outpost] error: $*" >&2
        exit 1
    }
    # Where the onefile binary unpacks itself (outpost/<version>-<build>/): /var/cache, for the
    # agent under systemd or not, and for every run of it here.
    cache_home=/var/cache
    truthy() {
        case "${1:-}" in
            1 | true | yes | on | TRUE | YES) return 0 ;;
            *) return 1 ;;
        esac
    }

    token="${OUTPOST_TOKEN:-}"
    cloud_url="${OUTPOST_URL:-$pinned_cloud_url}"
    node_name="${OUTPOST_NODE_NAME:-}"
    data_dir="${OUTPOST_DATA_DIR:-/var/lib/outpost}"
    version="${INSTALL_OUTPOST_VERSION:-$pinned_version}"
    bin_dir="${INSTALL_OUTPOST_BIN_DIR:-/usr/local/bin}"
    release_url="${INSTALL_OUTPOST_RELEASE_URL:-$pinned_base_url/releases}"
    skip_start="${INSTALL_OUTPOST_SKIP_START:-false}"
    init="${INSTALL_OUTPOST_INIT:-}"
    systemd_dir="${INSTALL_OUTPOST_SYSTEMD_DIR:-/etc/systemd/system}"

    while [ $# -gt 0 ]; do
        case "$1" in
            --token) token="${2:?--token needs a value}"; shift 2 ;;
            --url) cloud_url="${2:?--url needs a value}"; shift 2 ;;
            --node-name) node_name="${2:?--node-name needs a value}"; shift 2 ;;
            --data-dir) data_dir="${2:?--data-dir needs a value}"; shift 2 ;;
            --version) version="${2:?--version needs a value}"; shift 2 ;;
            --bin-dir) bin_dir="${2:?--bin-dir needs a value}"; shift 2 ;;
            --release-url) release_url="${2:?--release-url needs a value}"; shift 2 ;;
            --init) init="${2:?--init needs a value}"; shift 2 ;;
            --skip-start) skip_start=true; shift ;;
            -h | --help)
                echo "usage: sh install.sh [--token T] [--url URL] [--node-name N] [--data-dir D]"
                echo "         [--version V] [--bin-dir D] [--release-url U] [--init systemd|none]"
                echo "         [--skip-start]   (the script's header lists the environment variables)"
                return 0
                ;;
            *) fatal "unknown option $1 (see --help)" ;;
        esac
    done
    release_url="${release_url%/}"

    [ "$(id -u)" -eq 0 ] || fatal "run as root (it installs to $bin_dir and $systemd_dir)"

    case "$(uname -m)" in
        x86_64 | amd64) arch=amd64 ;;
        aarch64 | arm64) arch=arm64 ;;
        armv7* | armv8l) arch=arm ;;
        *) fatal "no Outpost build for this machine ($(uname -m)): there are amd64 (x86_64), arm64 (aarch64) and arm (armv7l)" ;;
    esac

    if [ -z "$init" ]; then
        if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
            init=systemd
        else
            init=none
        fi
    fi
    case "$init" in
        systemd | none) ;;
        *) fatal "--init is systemd or none, not $init" ;;
    esac

    if command -v curl >/dev/null 2>&1; then
        downloader=curl
    elif command -v wget >/dev/null 2>&1; then
        downloader=wget
    else
        fatal "neither curl nor wget is installed"
    fi
    command -v openssl >/dev/null 2>&1 ||
        fatal "openssl is needed to check the release signature; install it and run again"

    tmp="$(mktemp -d 2>/dev/null || mktemp -d -t outpost-install.XXXXXX)"
    trap 'rm -rf "$tmp"' EXIT
    trap 'rm -rf "$tmp"; exit 130' INT TERM
    printf '%s\n' "$pinned_release_key" >"$tmp/release.pub"
    printf '%s\n' "$pinned_cloud_ca" >"$tmp/cloud-ca.crt"

    fetch() { # URL FILE
        if [ "$downloader" = curl ]; then
            curl -fsSL --retry 3 --cacert "$tmp/cloud-ca.crt" -o "$2" "$1"
        else
            wget -q --ca-certificate="$tmp/cloud-ca.crt" -O "$2" "$1"
        fi || fatal "cannot download $1"
    }
    sha256_of() {
        if command -v sha256sum >/dev/null 2>&1; then
            sha256sum "$1" | cut -d ' ' -f 1
        else
            openssl dgst -sha256 -r "$1" | cut -d ' ' -f 1
        fi
    }
    changed=""
    note_change() { changed="$changed $1"; }

    # The token pins the cloud's CA; a token from another cloud would fail at join anyway.
    if [ -n "$token" ] && [ "$cloud_url" = "$pinned_cloud_url" ]; then
        token_ca="$(echo "$token" | cut -d . -f 2)"
        served_ca="$(openssl x509 -in "$tmp/cloud-ca.crt" -outform DER | openssl dgst -sha256 -r |
            cut -d ' ' -f 1)"
        [ "$token_ca" = "$served_ca" ] ||
            fatal "the token was made by another cloud (its CA is ${token_ca%"${token_ca#????????????}"}…, this one's ${served_ca%"${served_ca#????????????}"}…)"
    fi

    # -- the signed checksums ------------------------------------------------------------------
    openssl pkey -pubin -in "$tmp/release.pub" -noout >/dev/null 2>&1 ||
        fatal "this openssl ($(openssl version)) cannot read Ed25519 keys: 1.1.1 or newer is needed"
    info "release $version for linux-$arch from $release_url"
    fetch "$release_url/$version/SHA256SUMS" "$tmp/SHA256SUMS"
    fetch "$release_url/$version/SHA256SUMS.sig" "$tmp/SHA256SUMS.sig"
    openssl pkeyutl -verify -pubin -inkey "$tmp/release.pub" -rawin \
        -in "$tmp/SHA256SUMS" -sigfile "$tmp/SHA256SUMS.sig" >/dev/null 2>&1 ||
        fatal "SHA256SUMS of release $version is not signed by this cloud's release key: refusing it"
    expected() { awk -v name="$1" '$2 == name { print $1 }' "$tmp/SHA256SUMS"; }
    verified_fetch() { # NAME FILE
        want="$(expected "$1")"
        [ -n "$want" ] || fatal "release $version has no $1"
        fetch "$release_url/$version/$1" "$2"
        got="$(sha256_of "$2")"
        [ "$got" = "$want" ] ||
            fatal "$1 does not match its checksum (sha256 $got, signed $want): refusing it"
    }

    # -- the binary ----------------------------------------------------------------------------
    binary="$bin_dir/outpost"
    want_binary="$(expected "outpost-linux-$arch")"
    [ -n "$want_binary" ] || fatal "release $version has no binary for linux-$arch"
    if [ -f "$binary" ] && [ "$(sha256_of "$binary")" = "$want_binary" ]; then
        info "unchanged: $binary"
    else
        verified_fetch "outpost-linux-$arch" "$tmp/outpost"
        mkdir -p "$bin_dir"
        cp "$tmp/outpost" "$binary.new"
        chmod 0755 "$binary.new"
        # Run from $bin_dir, not $tmp: /tmp may be mounted noexec.
        if ! ran="$(XDG_CACHE_HOME="$cache_home" "$binary.new" version 2>&1)"; then
            rm -f "$binary.new"
            fatal "the outpost binary of release $version does not run on this machine: $(echo "$ran" | tail -n 1)"
        fi
        mv -f "$binary.new" "$binary"
        info "installed: $binary"
        note_change binary
    fi

    # -- the unit and its environment file -----------------------------------------------------
    env_file=/etc/outpost/outpost.env
    unit=""
    if [ "$init" = systemd ]; then
        unit="$systemd_dir/outpost.service"
        [ -n "$(expected outpost.service)" ] ||
            fatal "the cloud serves no outpost.service with release $version (put it in its release folder)"
        verified_fetch outpost.service "$tmp/outpost.service"
        if [ "$bin_dir" != /usr/local/bin ]; then
            sed "s#/usr/local/bin/outpost#$binary#g" "$tmp/outpost.service" >"$tmp/unit"
            mv "$tmp/unit" "$tmp/outpost.service"
        fi
        from_unit="$(sed -n 's/^EnvironmentFile=-\{0,1\}//p' "$tmp/outpost.service" | head -n 1)"
        [ -z "$from_unit" ] || env_file="$from_unit"
        if [ -f "$unit" ] && cmp -s "$tmp/outpost.service" "$unit"; then
            info "unchanged: $unit"
        else
            mkdir -p "$systemd_dir"
            cp "$tmp/outpost.service" "$unit.new"
            chmod 0644 "$unit.new"
            mv -f "$unit.new" "$unit"
            info "installed: $unit"
            note_change unit
        fi
    fi
    if [ -f "$env_file" ]; then
        info "kept: $env_file"
    else
        mkdir -p "$(dirname "$env_file")"
        {
            echo "# Settings for the Outpost agent, KEY=value (no quotes, no expansion): OUTPOST_RUN_ARGS,"
            echo "# OUTPOST_URL, OUTPOST_LOG_LEVEL, ... (outpost run --help lists them)."
            echo "OUTPOST_DATA_DIR=$data_dir"
            echo "# Where the binary unpacks itself on its first start (outpost/<version>-<build>/)."
            echo "XDG_CACHE_HOME=$cache_home"
        } >"$env_file"
        chmod 0600 "$env_file"  # root's alone: it may come to hold credentials (a proxy URL)
        info "installed: $env_file"
        note_change env
    fi

    # -- joining -------------------------------------------------------------------------------
    if [ -f "$data_dir/identity/node.crt" ]; then
        info "already joined: $data_dir/identity"
    else
        [ -n "$token" ] ||
            fatal "this gateway has not joined a cloud: pass --token (from \`outpost-cloud token create NODE\`)"
        set -- join --cloud "$cloud_url" --token "$token" --data-dir "$data_dir"
        [ -z "$node_name" ] || set -- "$@" --node-name "$node_name"
        XDG_CACHE_HOME="$cache_home" "$binary" "$@" || fatal "joining $cloud_url failed (the token is still unused if the cloud refused it)"
        note_change join
    fi

    # -- the uninstaller -----------------------------------------------------------------------
    uninstall="$bin_dir/outpost-uninstall.sh"
    # The folder this build unpacks into, <version>-<build key>, for the copy of it an `outpost`
    # run by hand as root leaves in /root/.cache (a stand-in without JSON gives none).
    built="$(XDG_CACHE_HOME="$cache_home" "$binary" version --json 2>/dev/null || true)"
    build_version="$(echo "$built" | sed -n 's/.*"version": *"\([0-9A-Za-z.+_-]*\)".*/\1/p')"
    build_key="$(echo "$built" | sed -n 's/.*"source_key": *"\([0-9a-f]*\)".*/\1/p')"
    pid_file=/run/outpost.pid
    log_file=/var/log/outpost.log
    {
        echo '#!/bin/sh'
        echo '# Removes Outpost as install.sh installed it. --keep-data keeps the data folder'
        echo '# (identity, store, images, pod state).'
        echo 'set -u'
        echo '[ "$(id -u)" -eq 0 ] || { echo "run as root" >&2; exit 1; }'
        echo 'keep_data=false; [ "${1:-}" = --keep-data ] && keep_data=true'
        if [ "$init" = systemd ]; then
            echo 'systemctl disable --now outpost.service 2>/dev/null || true'
            echo "rm -f '$unit'"
            echo 'systemctl daemon-reload 2>/dev/null || true'
        else
            echo "if [ -f '$pid_file' ]; then"
            echo "    pid=\$(cat '$pid_file'); kill \"\$pid\" 2>/dev/null"
            echo '    n=0; while kill -0 "$pid" 2>/dev/null && [ $n -lt 50 ]; do sleep 0.2; n=$((n + 1)); done'
            echo '    kill -9 "$pid" 2>/dev/null'
            echo "    rm -f '$pid_file'"
            echo 'fi'
            echo "rm -f '$log_file'"
        fi
        echo '# The pods outlive the agent by design; they go with it here.'
        echo 'if command -v runc >/dev/null 2>&1 && [ -d /run/outpost/runc ]; then'
        echo '    for c in $(runc --root /run/outpost/runc list -q 2>/dev/null); do'
        echo '        runc --root /run/outpost/runc delete -f "$c" 2>/dev/null'
        echo '    done'
        echo '    rm -rf /run/outpost/runc'
        echo 'fi'
        echo "rm -f '$binary' '$env_file'"
        echo "rmdir '$(dirname "$env_file")' 2>/dev/null"
        echo "# Unpacked binaries: every one this installer ran, and this one's in root's home."
        echo "rm -rf '$cache_home/outpost'"
        if [ -n "$build_version" ] && [ -n "$build_key" ]; then
            echo "rm -rf '/root/.cache/outpost/$build_version-$build_key'"
            echo "rmdir /root/.cache/outpost 2>/dev/null"
        fi
        echo "if [ \"\$keep_data\" = false ]; then rm -rf '$data_dir'; fi"
        echo "rm -f '$uninstall'"
        # A folder of its own (--bin-dir), left empty now; never a system one.
        case "$bin_dir" in
            /usr/local/bin | /usr/local/sbin | /usr/bin | /usr/sbin | /bin | /sbin) ;;
            *) echo "rmdir '$bin_dir' 2>/dev/null" ;;
        esac
        echo 'echo "[outpost] removed"'
    } >"$tmp/uninstall"
    if [ -f "$uninstall" ] && cmp -s "$tmp/uninstall" "$uninstall"; then
        info "unchanged: $uninstall"
    else
        cp "$tmp/uninstall" "$uninstall.new"
        chmod 0755 "$uninstall.new"
        mv -f "$uninstall.new" "$uninstall"
        info "installed: $uninstall"
        note_change uninstall
    fi

    # -- starting ------------------------------------------------------------------------------
    if [ "$init" = systemd ]; then
        case "$changed" in *unit*) systemctl daemon-reload ;; esac
        if ! systemctl is-enabled --quiet outpost.service 2>/dev/null; then
            systemctl enable outpost.service
            note_change enable
        fi
        if truthy "$skip_start"; then
            info "not started (--skip-start): systemctl start outpost"
        elif ! systemctl is-active --quiet outpost.service; then
            systemctl start outpost.service
            info "started: outpost.service"
            note_change start
        elif [ -n "$changed" ]; then
            systemctl restart outpost.service
            info "restarted: outpost.service"
            note_change restart
        else
            info "running: outpost.service"
        fi
    else
        running=""
        if [ -f "$pid_file" ] && kill -0 "$(cat "$pid_file")" 2>/dev/null; then
            running="$(cat "$pid_file")"
        fi
        if truthy "$skip_start"; then
            info "not started (--skip-start): $binary run"
        elif [ -n "$running" ] && [ -z "$changed" ]; then
            info "running: pid $running"
        else
            if [ -n "$running" ]; then
                kill "$running" 2>/dev/null || true
                note_change restart
            else
                note_change start
            fi
            (
                # The token is spent; the agent needs none.
                unset OUTPOST_TOKEN
                export XDG_CACHE_HOME="$cache_home"
                # KEY=value lines as systemd reads them: no quotes, no expansion.
                while IFS= read -r line || [ -n "$line" ]; do
                    case "$line" in
                        '#'* | '') ;;
                        [A-Za-z_]*=*) export "$line" ;;
                    esac
                done <"$env_file"
                # shellcheck disable=SC2086 # the words of OUTPOST_RUN_ARGS, as in the unit
                # Immune to the hang-up of the terminal this ran from (nohup, which not every
                # busybox has): an ignored signal stays ignored across exec.
                (
                    trap '' HUP
                    exec "$binary" run ${OUTPOST_RUN_ARGS:-} >>"$log_file" 2>&1 </dev/null
                ) &
                echo $! >"$pid_file"
            )
            info "started: pid $(cat "$pid_file"), logging to $log_file (no systemd: it is not restarted at boot)"
        fi
    fi

    # -- unpacked copies of earlier builds ------------------------------------------------------
    # Each build unpacks into its own folder, tens of MB of a gateway's flash; once the agent
    # runs this build, the folders of earlier ones are unused. Not with --skip-start: the
    # agent still running may be the earlier build.
    case "$changed" in *binary*)
        if [ -n "$build_version" ] && [ -n "$build_key" ] && ! truthy "$skip_start"; then
            for old in "$cache_home"/outpost/*-*; do
                [ -d "$old" ] && [ "$old" != "$cache_home/outpost/$build_version-$build_key" ] || continue
                rm -rf "$old"
                info "removed the unpacked copy of an earlier build: $old"
            done
        fi
        ;;
    esac

    if [ -z "$changed" ]; then
        info "nothing changed: Outpost $version is installed"
    else
        info "done:$changed"
    fi
}

outpost_install "$@"
