#!/bin/sh
# Paddock machine bootstrap: gets the agent (baked into the image, or downloaded from the
# master), runs it until it exits, then powers the machine off. The instance is launched with
# InstanceInitiatedShutdownBehavior=terminate, so powering off ends its billing: a machine whose
# agent is gone never lingers.
#
# PADDOCK_ROOT is empty on a real machine. The test suite's boot emulator sets it to a
# per-instance folder and runs this script on the test host: every path below lives under it,
# and nothing that only makes sense on a real machine (installing packages, switching user,
# powering off) happens then.
#
# The token is never printed, never put on a command line (where `ps` would show it) and never
# written anywhere but the 0600 env file and a 0600 temporary file for wget.

set -u

root="${PADDOCK_ROOT:-}"
env_file="$root/etc/paddock/agent.env"
agent="$root/opt/paddock/bin/paddock"
workdir="$root/var/lib/paddock"
log="$root/var/log/paddock-agent.log"
# How long to keep trying to download the agent: the master may be restarting.
download_for="${PADDOCK_DOWNLOAD_SECONDS:-600}"

say() {
    echo "paddock-bootstrap: $*" >&2
}

# Ends the machine's life: on a real machine by powering off (which terminates the instance),
# under the emulator by exiting.
finish() {
    status="$1"
    if [ -z "$root" ]; then
        say "powering off (status $status)"
        sync
        poweroff || shutdown -h now || halt -p
        # poweroff returns before the machine is down; do not let runcmd carry on meanwhile.
        sleep 600
    fi
    exit "$status"
}

if [ ! -r "$env_file" ]; then
    say "cannot read $env_file"
    finish 1
fi
# Every variable of the env file is exported: the agent reads them from its environment.
set -a
# shellcheck source=/dev/null
. "$env_file"
set +a
for var in PADDOCK_MASTER_URL PADDOCK_AGENT_TOKEN PADDOCK_MACHINE_ID; do
    eval "value=\${$var:-}"
    # shellcheck disable=SC2154 # value is set by the eval above
    if [ -z "$value" ]; then
        say "$var is missing from $env_file"
        finish 1
    fi
done
unset value

# Stock images lack git, which the agent needs to check out. Images built with the Packer
# template have it, so they boot without waiting for a package index.
install_git() {
    say "installing git"
    if command -v apt-get >/dev/null 2>&1; then
        DEBIAN_FRONTEND=noninteractive apt-get -q update &&
            DEBIAN_FRONTEND=noninteractive apt-get -q install -y --no-install-recommends git
    elif command -v dnf >/dev/null 2>&1; then
        dnf -q -y install git
    elif command -v yum >/dev/null 2>&1; then
        yum -q -y install git
    else
        false
    fi
}

# The bearer header as a curl config line, so the token reaches curl on stdin, not argv.
# printf is a shell builtin: it does not show up in the process list either.
curl_auth_config() {
    escaped=$(printf '%s' "$PADDOCK_AGENT_TOKEN" | sed 's/[\\"]/\\&/g')
    printf 'header = "Authorization: Bearer %s"\n' "$escaped"
}

# One download attempt into "$1". Prints the HTTP status (000 when the master was unreachable).
fetch_once() {
    url="$PADDOCK_MASTER_URL/agent/download"
    if command -v curl >/dev/null 2>&1; then
        curl_auth_config | curl --silent --show-error --connect-timeout 10 --max-time 300 \
            --config - --output "$1" --write-out '%{http_code}' "$url" 2>/dev/null || true
    elif command -v wget >/dev/null 2>&1; then
        # wget takes headers only from its command line or a config file: a private one, next
        # to the agent (a folder only root writes to on a real machine).
        conf=$(umask 077 && mktemp "$(dirname "$1")/.wgetrc.XXXXXX") || {
            echo 000
            return
        }
        printf 'header = Authorization: Bearer %s\n' "$PADDOCK_AGENT_TOKEN" >"$conf"
        # --server-response prints the status line to stderr, which is all we keep of it.
        code=$(WGETRC="$conf" wget --server-response --timeout=10 --tries=1 --output-document="$1" "$url" 2>&1 |
            awk '/^  HTTP\// { code = $2 } END { print (code == "" ? "000" : code) }')
        rm -f "$conf"
        echo "$code"
    else
        say "neither curl nor wget is installed"
        echo none
    fi
}

# Downloads the agent with retries and backoff. A refused token is retried a few times only:
# it will not start working, and a machine waiting for nothing costs money.
download_agent() {
    mkdir -p "$(dirname "$agent")" || return 1
    part="$agent.part"
    started=$(date +%s)
    delay=1
    refused=0
    while :; do
        rm -f "$part"
        code=$(fetch_once "$part")
        if [ "$code" = 200 ] && [ -s "$part" ]; then
            chmod 0755 "$part" && mv -f "$part" "$agent"
            return
        fi
        rm -f "$part"
        case "$code" in
        none) return 1 ;;
        401 | 403)
            refused=$((refused + 1))
            if [ "$refused" -ge 3 ]; then
                say "the master refused this machine's token ($code)"
                return 1
            fi
            ;;
        esac
        now=$(date +%s)
        if [ $((now - started)) -ge "$download_for" ]; then
            say "could not download the agent from $PADDOCK_MASTER_URL for ${download_for}s (last status $code)"
            return 1
        fi
        say "download failed (status $code); retrying in ${delay}s"
        sleep "$delay"
        delay=$((delay * 2))
        if [ "$delay" -gt 30 ]; then
            delay=30
        fi
    done
}

if [ -z "$root" ] && ! command -v git >/dev/null 2>&1; then
    install_git || say "could not install git; checkouts will fail"
fi

if [ -x "$agent" ]; then
    say "using the agent baked into the image"
else
    say "downloading the agent from $PADDOCK_MASTER_URL"
    download_agent || finish 1
fi

umask 027
mkdir -p "$workdir" "$(dirname "$log")" || finish 1

# On a real machine the agent and its build steps run as the unprivileged user cloud-init
# created, when there is one. The log is opened here, by root, so that user cannot rewrite it.
run_as=""
if [ -z "$root" ] && [ "$(id -u)" = 0 ] && id paddock >/dev/null 2>&1; then
    if command -v runuser >/dev/null 2>&1; then
        run_as=paddock
        chown paddock: "$workdir" || finish 1
    else
        say "runuser is missing: the agent runs as root"
    fi
fi

say "starting the agent for machine $PADDOCK_MACHINE_ID"
if [ -n "$run_as" ]; then
    # runuser without --login passes the environment on, token included.
    (cd "$workdir" && exec runuser -u "$run_as" -- "$agent" agent \
        --master "$PADDOCK_MASTER_URL" --workdir "$workdir") >>"$log" 2>&1 </dev/null
else
    (cd "$workdir" && exec "$agent" agent --master "$PADDOCK_MASTER_URL" --workdir "$workdir") \
        >>"$log" 2>&1 </dev/null
fi
status=$?
say "the agent exited with status $status"
finish "$status"
