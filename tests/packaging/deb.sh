#!/usr/bin/env bash
# Builds the z4j-agentd .deb (cargo deb), installs it, checks what it put on
# the host, reinstalls it over a changed configuration, removes and purges
# it, and checks that nothing is left.
#
# Run as root on a Debian 12 machine where z4j-agentd is not installed (it
# refuses otherwise: the test purges the package). Installs what it needs
# with apt-get (adduser, dpkg-dev, binutils, jq) and cargo-deb with cargo if
# missing. Leaves the system user z4j-agentd behind, as a purge does.
#
#   tests/packaging/deb.sh
#
# Prints PASS/FAIL per check and "N passed, N failed" last; exits 1 on a failure.
# Checks pass quoted snippets to bash -c with their data as "$1" (SC2016 on purpose).
# shellcheck disable=SC2016
set -euo pipefail
cd "$(dirname "$0")/../.."

CARGO_DEB_VERSION=3.8.0
PKG=z4j-agentd
CONF=/etc/z4j-agentd
STATE=/var/lib/z4j-agentd

# shellcheck source=tests/packaging/checks.sh
. tests/packaging/checks.sh
stat_is() { [ "$(stat -c '%a %U:%G' "$1")" = "$2" ]; }
installed() { dpkg-query -W -f '${db:Status-Status}' "$PKG" 2>/dev/null | grep -qv '^not-installed$'; }
die() { echo "deb.sh: $*" >&2; exit 2; }

[ "$(id -u)" -eq 0 ] || die "run as root (it installs and purges the package)"
[ -r /etc/debian_version ] || die "needs a Debian system (dpkg, apt-get)"
if installed; then
    die "$PKG is installed on this machine; this test would purge it. Purge it first (dpkg --purge $PKG) or use a throwaway machine."
fi

# systemd: on a host where systemd runs, the maintainer scripts' real
# effect is checked (socket started, service not). Elsewhere (a container),
# the install, upgrade and remove paths are checked twice over: plainly
# (units enabled by symlinks, nothing started), and with systemd simulated:
# /run/systemd/system made for the duration of one dpkg call and
# deb-systemd-invoke and systemctl replaced, through PATH, by stubs that
# record their arguments, so the scripts' systemd branch runs and what it
# asks for is checked.
STUBS=$(mktemp -d)
SYSTEMD_LOG=$STUBS/calls
MADE_RUN_SYSTEMD=""
unstub_run_systemd() {
    case "$MADE_RUN_SYSTEMD" in
        system) rmdir /run/systemd/system ;;
        both) rmdir /run/systemd/system /run/systemd ;;
    esac
    MADE_RUN_SYSTEMD=""
}
cleanup() {
    unstub_run_systemd 2>/dev/null || true
    if installed; then
        echo "cleanup: purging $PKG"
        dpkg --purge "$PKG" >/dev/null 2>&1 || true
    fi
    rm -rf "$STUBS"
}
trap cleanup EXIT
for tool in deb-systemd-invoke systemctl; do
    printf '#!/bin/sh\necho "%s $*" >>%s\n' "$tool" "$SYSTEMD_LOG" >"$STUBS/$tool"
    chmod 0755 "$STUBS/$tool"
done
if [ -d /run/systemd/system ]; then SYSTEMD=real; else SYSTEMD=none; fi
# dpkg as if systemd ran, with the stubs first in PATH (only when it does not).
dpkg_stubbed() {
    : >"$SYSTEMD_LOG"
    if [ -d /run/systemd ]; then MADE_RUN_SYSTEMD=system; else MADE_RUN_SYSTEMD=both; fi
    mkdir -p /run/systemd/system
    local rc=0
    PATH="$STUBS:$PATH" dpkg "$@" || rc=$?
    unstub_run_systemd
    echo "systemd calls: $(tr '\n' ';' <"$SYSTEMD_LOG")"
    return $rc
}
# The deb-systemd-invoke calls the last stubbed dpkg made, on one line.
invoked() { grep '^deb-systemd-invoke' "$SYSTEMD_LOG" | tr '\n' ';' | sed 's/;$//'; }
echo "systemd: $SYSTEMD"

# ---------------------------------------------------------------- tools
need_apt=()
command -v adduser >/dev/null || need_apt+=(adduser)
command -v dpkg-shlibdeps >/dev/null || need_apt+=(dpkg-dev)
command -v strip >/dev/null || need_apt+=(binutils)
command -v jq >/dev/null || need_apt+=(jq)
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "==> apt-get install ${need_apt[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
if ! cargo deb --version >/dev/null 2>&1; then
    echo "==> cargo install cargo-deb $CARGO_DEB_VERSION"
    start=$SECONDS
    cargo install cargo-deb --version "$CARGO_DEB_VERSION" --locked
    echo "cargo install cargo-deb took $((SECONDS - start)) s"
fi

# ---------------------------------------------------------------- build
VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)
ARCH=$(dpkg --print-architecture)
DEB=target/debian/${PKG}_${VERSION}-1_${ARCH}.deb
rm -f "$DEB"
echo "==> cargo deb --locked --strip"
start=$SECONDS
cargo deb --locked --strip --output target/debian/
echo "cargo deb took $((SECONDS - start)) s"
[ -f "$DEB" ] || die "cargo deb did not produce $DEB"
echo "package: $DEB ($(stat -c %s "$DEB") bytes)"

# ------------------------------------------------------- package contents
info=$(dpkg-deb -I "$DEB")
contents=$(dpkg-deb -c "$DEB")
ctrl=$(mktemp -d)
dpkg-deb --ctrl-tarfile "$DEB" | tar -x -C "$ctrl"
check "control: Package $PKG, Version $VERSION-1" grep -q "^ Version: $VERSION-1$" <<<"$info"
check "control: Depends has libc6 and adduser" grep -Eq '^ Depends: .*libc6.*adduser|^ Depends: .*adduser.*libc6' <<<"$info"
check "control: Section net, Priority optional" grep -q '^ Section: net' <<<"$info"
check "control: conffiles is exactly /etc/z4j-agentd/agentd.env" \
    test "$(cat "$ctrl/conffiles")" = "$CONF/agentd.env"
for s in postinst prerm postrm; do
    check "control: $s is executable POSIX sh (sh -n)" sh -n "$ctrl/$s"
    check "control: $s is mode 0755" test "$(stat -c %a "$ctrl/$s")" = 755
done
check "data: no secret file is shipped" bash -c "! grep -Eq '/etc/z4j-agentd/(token|hmac_secret)' <<<\"\$1\"" _ "$contents"
check "data: /usr/bin/z4j-agentd 0755 root" grep -Eq '^-rwxr-xr-x (root/root|0/0) .* \./usr/bin/z4j-agentd$' <<<"$contents"
check "data: both units under /lib/systemd/system" \
    bash -c 'grep -q "lib/systemd/system/z4j-agentd.service$" <<<"$1" && grep -q "lib/systemd/system/z4j-agentd.socket$" <<<"$1"' _ "$contents"
check "data: docs under /usr/share/doc/z4j-agentd" grep -q 'usr/share/doc/z4j-agentd/packaging.md$' <<<"$contents"
rm -rf "$ctrl"

# ---------------------------------------------------------------- install
echo "==> dpkg -i $DEB"
dpkg -i "$DEB"
if [ "$SYSTEMD" = real ]; then
    check "install: socket active" systemctl is-active --quiet "$PKG.socket"
    check "install: service not started (no secrets yet)" bash -c "! systemctl is-active --quiet $PKG.service"
    check "install: /run/z4j-agentd/agent.sock is 0660 z4j-agentd:z4j-agentd" \
        stat_is /run/z4j-agentd/agent.sock "660 $PKG:$PKG"
else
    check "install without systemd: nothing started, no /run/z4j-agentd" test ! -e /run/z4j-agentd
fi
check "dpkg -s: install ok installed" bash -c "dpkg -s $PKG | grep -q '^Status: install ok installed'"
check "/usr/bin/z4j-agentd is 0755 root:root" stat_is /usr/bin/z4j-agentd "755 root:root"
check "z4j-agentd.service installed 0644" stat_is /lib/systemd/system/z4j-agentd.service "644 root:root"
check "z4j-agentd.socket installed 0644" stat_is /lib/systemd/system/z4j-agentd.socket "644 root:root"
check "installed units equal systemd/ in the repository" \
    bash -c 'cmp -s systemd/z4j-agentd.service /lib/systemd/system/z4j-agentd.service && cmp -s systemd/z4j-agentd.socket /lib/systemd/system/z4j-agentd.socket'
check "socket enabled (sockets.target.wants)" test -L /etc/systemd/system/sockets.target.wants/z4j-agentd.socket
check "service enabled (multi-user.target.wants)" test -L /etc/systemd/system/multi-user.target.wants/z4j-agentd.service
IFS=: read -r _ _ uid gid _ home shell < <(getent passwd "$PKG") || true
check "user z4j-agentd exists" test -n "${uid:-}"
check "group z4j-agentd exists and is the user's primary group" \
    test "$(getent group "$PKG" | cut -d: -f3)" = "${gid:-x}"
check "user is a system user (uid < 1000)" test "${uid:-1000}" -lt 1000
check "user's shell is /usr/sbin/nologin" test "${shell:-}" = /usr/sbin/nologin
check "user's home is the state directory $STATE (no /home/z4j-agentd)" \
    bash -c "[ '${home:-}' = $STATE ] && [ ! -e /home/$PKG ]"
check "no skeleton files in the home" bash -c "[ -z \"\$(ls -A $STATE)\" ]"
check "password locked" bash -c "getent shadow $PKG | cut -d: -f2 | grep -Eq '^[!*]'"
check "$CONF is 0750 root:z4j-agentd" stat_is "$CONF" "750 root:$PKG"
check "$CONF/token is 0640 root:z4j-agentd, empty" bash -c "[ \"\$(stat -c '%a %U:%G %s' $CONF/token)\" = '640 root:$PKG 0' ]"
check "$CONF/hmac_secret is 0640 root:z4j-agentd, empty" bash -c "[ \"\$(stat -c '%a %U:%G %s' $CONF/hmac_secret)\" = '640 root:$PKG 0' ]"
check "$CONF/agentd.env is 0644 root:root" stat_is "$CONF/agentd.env" "644 root:root"
check "$STATE is 0700 z4j-agentd:z4j-agentd" stat_is "$STATE" "700 $PKG:$PKG"
check "dpkg lists the conffile in /var/lib/dpkg/info/$PKG.conffiles" \
    grep -qx "$CONF/agentd.env" "/var/lib/dpkg/info/$PKG.conffiles"
check "z4j-agentd --version prints $VERSION" bash -c "z4j-agentd --version | grep -qw '$VERSION'"

# ------------------------------------------ configure as an operator would
# A brain URL where nothing listens (the doctor's tcp probe fails, as
# expected), a token and an HMAC secret, in the installed files.
cat >>"$CONF/agentd.env" <<'EOF'
# added by tests/packaging/deb.sh
Z4J_BRAIN_URL=http://127.0.0.1:9
EOF
printf 'deb-test-token-%s\n' "$$" >"$CONF/token"
head -c 32 /dev/urandom | base64 | tr '+/' '-_' >"$CONF/hmac_secret"
env_sum=$(sha256sum "$CONF/agentd.env" | cut -d' ' -f1)
secret_sum=$(cat "$CONF/token" "$CONF/hmac_secret" | sha256sum | cut -d' ' -f1)
# With Z4J_TEST_LOG_DIR set (tests/run-all.sh): these credentials, in every
# form a log could show them, for tests/check_secrets.py, which searches the
# suite's logs (the doctor's output below among them) for them.
if [ -n "${Z4J_TEST_LOG_DIR:-}" ]; then
    mkdir -p "$Z4J_TEST_LOG_DIR/packaging"
    key=$(cat "$CONF/hmac_secret")
    std=$(printf '%s' "$key" | tr -- '-_' '+/')
    {
        printf 'deb.sh token\t%s\n' "$(cat "$CONF/token")"
        printf 'deb.sh HMAC secret\t%s\n' "$key"
        printf 'deb.sh HMAC secret (unpadded)\t%s\n' "${key%%=*}"
        printf 'deb.sh signing key (hex)\t%s\n' "$(printf '%s' "$std" | base64 -d | od -An -v -tx1 | tr -d ' \n')"
        printf 'deb.sh signing key (std base64)\t%s\n' "$std"
    } >>"$Z4J_TEST_LOG_DIR/packaging.secrets"
fi

# The doctor as the service's user with the service's environment (README).
doctor=$(runuser -u "$PKG" -- env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME="$STATE" sh -c '
    set -a; . /etc/z4j-agentd/agentd.env
    STATE_DIRECTORY=/var/lib/z4j-agentd RUNTIME_DIRECTORY=/run/z4j-agentd
    Z4J_TOKEN_FILE=/etc/z4j-agentd/token Z4J_HMAC_SECRET_FILE=/etc/z4j-agentd/hmac_secret
    exec z4j-agentd doctor --json --no-websocket' 2>&1) || true
if [ -n "${Z4J_TEST_LOG_DIR:-}" ]; then
    printf '%s\n' "$doctor" >"$Z4J_TEST_LOG_DIR/packaging/doctor.log"
fi
probe() { jq -r --arg n "$1" '.probes[] | select(.name == $n) | .status' <<<"$doctor" 2>/dev/null; }
check "doctor as z4j-agentd: config probe ok" test "$(probe config)" = ok
check "doctor as z4j-agentd: buffer_path probe ok" test "$(probe buffer_path)" = ok
check "doctor as z4j-agentd: spool is $STATE/buffer.sqlite (no fallback)" \
    test "$(jq -r '.config.buffer_path' <<<"$doctor" 2>/dev/null)" = "$STATE/buffer.sqlite"
check "doctor as z4j-agentd: tcp to the unreachable test brain fails (ok=false)" \
    test "$(jq -r '.ok' <<<"$doctor" 2>/dev/null)" = false
if [ "$(probe config)" != ok ] || [ "$(probe buffer_path)" != ok ]; then
    echo "doctor output:"; echo "$doctor"
fi
check "$STATE still 0700 z4j-agentd after the doctor" stat_is "$STATE" "700 $PKG:$PKG"

# ---------------------------------------------------------------- reinstall
echo "==> dpkg -i $DEB (again, over the changed configuration)"
if [ "$SYSTEMD" = real ]; then
    dpkg -i "$DEB"
    check "upgrade: socket still active" systemctl is-active --quiet "$PKG.socket"
else
    dpkg_stubbed -i "$DEB"
    check "upgrade (systemd simulated): daemon-reload" grep -qx 'systemctl --system daemon-reload' "$SYSTEMD_LOG"
    check "upgrade (systemd simulated): restarts the service if it runs, leaves the socket" \
        test "$(invoked)" = "deb-systemd-invoke try-restart $PKG.service"
fi
check "reinstall keeps the changed conffile agentd.env" \
    test "$(sha256sum "$CONF/agentd.env" | cut -d' ' -f1)" = "$env_sum"
check "reinstall keeps the secrets' contents" \
    test "$(cat "$CONF/token" "$CONF/hmac_secret" | sha256sum | cut -d' ' -f1)" = "$secret_sum"
check "reinstall keeps token 0640 root:z4j-agentd" stat_is "$CONF/token" "640 root:$PKG"
check "reinstall keeps hmac_secret 0640 root:z4j-agentd" stat_is "$CONF/hmac_secret" "640 root:$PKG"
check "reinstall keeps $CONF 0750 root:z4j-agentd" stat_is "$CONF" "750 root:$PKG"
check "no .dpkg-dist/.dpkg-new left in $CONF" bash -c "! ls $CONF | grep -q dpkg"
check "postinst configure is idempotent (run again by hand)" \
    sh -e "/var/lib/dpkg/info/$PKG.postinst" configure "$VERSION-1"

# ------------------------------------------------------------ remove, purge
echo "==> dpkg -r $PKG"
if [ "$SYSTEMD" = real ]; then
    dpkg -r "$PKG"
    check "remove: socket stopped" bash -c "! systemctl is-active --quiet $PKG.socket"
    check "remove: service stopped" bash -c "! systemctl is-active --quiet $PKG.service"
else
    dpkg_stubbed -r "$PKG"
    check "remove (systemd simulated): stops the socket and the service" \
        test "$(invoked)" = "deb-systemd-invoke stop $PKG.socket $PKG.service"
fi
check "after remove: binary gone" test ! -e /usr/bin/z4j-agentd
check "after remove: units gone" bash -c '! ls /lib/systemd/system/z4j-agentd.* 2>/dev/null | grep -q .'
check "after remove: configuration and secrets kept" \
    bash -c "[ -f $CONF/agentd.env ] && [ -s $CONF/token ] && [ -s $CONF/hmac_secret ]"
check "after remove: dpkg -s says config-files" bash -c "dpkg -s $PKG | grep -q '^Status: deinstall ok config-files'"

echo "==> dpkg --purge $PKG"
dpkg --purge "$PKG"
check "after purge: nothing under /run/z4j-agentd" test ! -e /run/z4j-agentd
check "after purge: nothing under $CONF" test ! -e "$CONF"
check "after purge: nothing under $STATE" test ! -e "$STATE"
check "after purge: /usr/bin/z4j-agentd gone" test ! -e /usr/bin/z4j-agentd
check "after purge: /lib/systemd/system/z4j-agentd.* gone" \
    bash -c '! ls /lib/systemd/system/z4j-agentd.* 2>/dev/null | grep -q .'
check "after purge: no enablement symlinks or masks left" \
    bash -c '! find /etc/systemd/system -name "z4j-agentd.*" 2>/dev/null | grep -q .'
check "after purge: no deb-systemd-helper state left" \
    bash -c '! find /var/lib/systemd -name "*z4j-agentd*" 2>/dev/null | grep -q .'
check "after purge: dpkg -s reports not installed" bash -c "! dpkg -s $PKG >/dev/null 2>&1"
check "after purge: the system user stays (Debian convention)" getent passwd "$PKG"

if [ "$SYSTEMD" = none ]; then
    echo "==> dpkg -i $DEB (first install, systemd simulated), then purge"
    dpkg_stubbed -i "$DEB"
    check "first install (systemd simulated): daemon-reload" grep -qx 'systemctl --system daemon-reload' "$SYSTEMD_LOG"
    check "first install (systemd simulated): starts the socket, not the service" \
        test "$(invoked)" = "deb-systemd-invoke start $PKG.socket"
    dpkg --purge "$PKG"
    check "purge again: nothing left in $CONF, $STATE" bash -c "[ ! -e $CONF ] && [ ! -e $STATE ]"
fi

summary
