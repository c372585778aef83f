#!/usr/bin/env bash
# Builds the z4j-agentd RPM with cargo-generate-rpm and checks it with rpm
# (Debian's `rpm` package: it reads packages, nothing is installed): the
# files, their modes and owners, the %config(noreplace) file, the scriptlets
# and the dependencies. The scriptlets are also run through `sh -n`.
#
# Run as root on Debian 12 (installs `rpm` and `binutils` with apt-get and
# cargo-generate-rpm with cargo if missing):
#
#   tests/packaging/rpm.sh
#
# cargo-generate-rpm does not strip: the binary is copied to
# target/rpm-staging/release/ and stripped there (target/release keeps its
# debug info), and the RPM is made from that copy (--target-dir).
#
# Prints PASS/FAIL per check and "N passed, N failed" last; exits 1 on a failure.
# Checks pass quoted snippets to bash -c with their data as "$1" (SC2016 on purpose).
# shellcheck disable=SC2016
set -euo pipefail
cd "$(dirname "$0")/../.."

CARGO_GENERATE_RPM_VERSION=0.21.1
PKG=z4j-agentd

# shellcheck source=tests/packaging/checks.sh
. tests/packaging/checks.sh
die() { echo "rpm.sh: $*" >&2; exit 2; }

need_apt=()
command -v rpm >/dev/null || need_apt+=(rpm)
command -v strip >/dev/null || need_apt+=(binutils)
if [ ${#need_apt[@]} -gt 0 ]; then
    [ "$(id -u)" -eq 0 ] || die "needs ${need_apt[*]}: run as root or install them"
    echo "==> apt-get install ${need_apt[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
if ! cargo generate-rpm --version >/dev/null 2>&1; then
    echo "==> cargo install cargo-generate-rpm $CARGO_GENERATE_RPM_VERSION"
    start=$SECONDS
    cargo install cargo-generate-rpm --version "$CARGO_GENERATE_RPM_VERSION" --locked
    echo "cargo install cargo-generate-rpm took $((SECONDS - start)) s"
fi

VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)
echo "==> cargo build --release --locked"
start=$SECONDS
cargo build --release --locked --bin z4j-agentd
echo "cargo build took $((SECONDS - start)) s"
STAGE=target/rpm-staging
rm -rf "$STAGE"
mkdir -p "$STAGE/release"
cp target/release/z4j-agentd "$STAGE/release/z4j-agentd"
strip "$STAGE/release/z4j-agentd"
echo "==> cargo generate-rpm"
start=$SECONDS
mkdir -p target/generate-rpm
cargo generate-rpm --target-dir "$STAGE" -o target/generate-rpm/
echo "cargo generate-rpm took $((SECONDS - start)) s"
RPM=$(find target/generate-rpm -maxdepth 1 -name "$PKG-$VERSION-1.*.rpm" -newer "$STAGE/release/z4j-agentd" | head -n1)
if [ -z "$RPM" ] || [ ! -f "$RPM" ]; then die "cargo generate-rpm did not produce target/generate-rpm/$PKG-$VERSION-1.*.rpm"; fi
echo "package: $RPM ($(stat -c %s "$RPM") bytes)"

q() { rpm -qp --nosignature "$@" "$RPM" 2>/dev/null; }
files=$(q -l)
dump=$(q --dump)        # path size mtime digest mode owner group isconfig isdoc rdev symlink
configs=$(q --configfiles)
docs=$(q --docfiles)
scripts=$(q --scripts)
requires=$(q --requires)
echo "--- rpm -qpl"; echo "$files"
echo "--- rpm -qp --configfiles"; echo "$configs"
echo "--- rpm -qp --requires"; echo "$requires"

check "name-version-release is $PKG-$VERSION-1" test "$(q --qf '%{NAME}-%{VERSION}-%{RELEASE}')" = "$PKG-$VERSION-1"
check "license Apache-2.0" test "$(q --qf '%{LICENSE}')" = Apache-2.0
mode_owner() { awk -v p="$1" '$1 == p { printf "%s %s:%s", substr($5, length($5) - 3), $6, $7 }' <<<"$dump"; }
check "/usr/bin/z4j-agentd 0755 root:root" test "$(mode_owner /usr/bin/z4j-agentd)" = "0755 root:root"
check "/usr/bin/z4j-agentd is the stripped release binary" \
    test "$(awk '$1 == "/usr/bin/z4j-agentd" { print $2 }' <<<"$dump")" = "$(stat -c %s "$STAGE/release/z4j-agentd")"
for unit in z4j-agentd.service z4j-agentd.socket; do
    check "/usr/lib/systemd/system/$unit 0644" test "$(mode_owner "/usr/lib/systemd/system/$unit")" = "0644 root:root"
done
check "/etc/z4j-agentd/agentd.env 0644 root:root" test "$(mode_owner /etc/z4j-agentd/agentd.env)" = "0644 root:root"
check "config files: exactly /etc/z4j-agentd/agentd.env" test "$configs" = /etc/z4j-agentd/agentd.env
# RPMFILE_CONFIG (1) | RPMFILE_NOREPLACE (16) = 17
check "agentd.env is %config(noreplace)" \
    test "$(q --qf '[%{FILENAMES} %{FILEFLAGS}\n]' | awk '$1 == "/etc/z4j-agentd/agentd.env" { print $2 }')" = 17
check "no secret file in the package" bash -c '! grep -Eq "/etc/z4j-agentd/(token|hmac_secret)" <<<"$1"' _ "$files"
check "docs are %doc under /usr/share/doc/z4j-agentd" grep -q '^/usr/share/doc/z4j-agentd/packaging.md$' <<<"$docs"
check "example config under /usr/share/doc/z4j-agentd/examples" grep -q 'examples/agentd.toml.example$' <<<"$files"
check "requires useradd, groupadd and getent (for %pre)" \
    bash -c 'grep -q /usr/sbin/useradd <<<"$1" && grep -q /usr/sbin/groupadd <<<"$1" && grep -q /usr/bin/getent <<<"$1"' _ "$requires"
check "requires /bin/sh and glibc" bash -c 'grep -qx /bin/sh <<<"$1" && grep -q "libc.so.6" <<<"$1"' _ "$requires"

# The scriptlets as rpm stores them, one by one.
scriptlet() { q --qf "%{$1}"; }
for tag in PREIN POSTIN PREUN POSTUN; do
    body=$(scriptlet "$tag")
    check "scriptlet %$tag present and valid sh (sh -n)" bash -c '[ -n "$1" ] && [ "$1" != "(none)" ] && sh -n <<<"$1"' _ "$body"
done
check "%pre creates group and user with getent/groupadd/useradd" \
    bash -c 'grep -q "getent group z4j-agentd" <<<"$1" && grep -q "groupadd -r z4j-agentd" <<<"$1" && grep -q "useradd -r -g z4j-agentd -d /var/lib/z4j-agentd -M -s /usr/sbin/nologin" <<<"$1"' _ "$(scriptlet PREIN)"
check "%post creates the secrets 0640 root:z4j-agentd only when absent" \
    bash -c 'grep -q "\[ ! -e \"\$f\" \]" <<<"$1" && grep -q "chmod 0640" <<<"$1"' _ "$(scriptlet POSTIN)"
check "%post applies the systemd preset on first install only" \
    bash -c 'grep -q "\"\$1\" -eq 1" <<<"$1" && grep -q "preset z4j-agentd.socket z4j-agentd.service" <<<"$1"' _ "$(scriptlet POSTIN)"
check "%preun disables and stops the units on erase only, guarded" \
    bash -c 'grep -q "\"\$1\" -eq 0" <<<"$1" && grep -q "\[ -x /usr/bin/systemctl \]" <<<"$1" && grep -q "disable --now z4j-agentd.socket z4j-agentd.service" <<<"$1"' _ "$(scriptlet PREUN)"
check "%postun try-restarts the service on upgrade when systemd runs" \
    bash -c 'grep -q "\[ -d /run/systemd/system \]" <<<"$1" && grep -q "try-restart z4j-agentd.service" <<<"$1"' _ "$(scriptlet POSTUN)"
echo "--- rpm -qp --scripts"; echo "$scripts"

# Run the scriptlets as rpm stored them, for real, in a private mount
# namespace where /etc is a scratch copy of this host's /etc (without a
# z4j-agentd user) and /var/lib an empty directory: install ($1=1), then an
# upgrade ($1=2) over a filled-in secret, then erase ($1=0). Nothing of this
# host changes.
if unshare -m true 2>/dev/null; then
    scratch=$(mktemp -d)
    trap 'rm -rf "$scratch"' EXIT
    cp -a /etc "$scratch/etc"
    mkdir "$scratch/varlib"
    for tag in PREIN POSTIN PREUN POSTUN; do scriptlet "$tag" >"$scratch/$tag.sh"; done
    facts=$(unshare -m --propagation private bash -s "$scratch" <<'INNER' 2>"$scratch/stderr" || true
set -u
S=$1
mount --bind "$S/etc" /etc
mount --bind "$S/varlib" /var/lib
userdel z4j-agentd >/dev/null 2>&1 || true
groupdel z4j-agentd >/dev/null 2>&1 || true
st() { stat -c '%a %U:%G %s' "$1" 2>/dev/null || echo missing; }
sh -e "$S/PREIN.sh" 1; echo "pre1=$?"
sh -e "$S/POSTIN.sh" 1; echo "post1=$?"
echo "passwd=$(getent passwd z4j-agentd | cut -d: -f6,7)"
echo "group=$(getent group z4j-agentd | cut -d: -f1)"
echo "etcdir=$(stat -c '%a %U:%G' /etc/z4j-agentd)"
echo "token=$(st /etc/z4j-agentd/token)"
echo "hmac=$(st /etc/z4j-agentd/hmac_secret)"
echo "state=$(stat -c '%a %U:%G' /var/lib/z4j-agentd)"
echo "filled-in" >/etc/z4j-agentd/token
sh -e "$S/PREIN.sh" 2; echo "pre2=$?"
sh -e "$S/POSTIN.sh" 2; echo "post2=$?"
echo "token2=$(cat /etc/z4j-agentd/token) $(st /etc/z4j-agentd/token)"
echo "users=$(getent passwd | grep -c '^z4j-agentd:')"
sh -e "$S/PREUN.sh" 0; echo "preun0=$?"
sh -e "$S/POSTUN.sh" 0; echo "postun0=$?"
INNER
)
    echo "--- scriptlets run in a scratch namespace"; echo "$facts"
    fact() { sed -n "s/^$1=//p" <<<"$facts"; }
    check "%pre and %post (install) exit 0" test "$(fact pre1) $(fact post1)" = "0 0"
    check "%pre created user z4j-agentd: home /var/lib/z4j-agentd, shell /usr/sbin/nologin" \
        test "$(fact passwd)" = "/var/lib/z4j-agentd:/usr/sbin/nologin"
    check "%pre created group z4j-agentd" test "$(fact group)" = z4j-agentd
    check "%post: /etc/z4j-agentd 0750 root:z4j-agentd" test "$(fact etcdir)" = "750 root:z4j-agentd"
    check "%post: token empty 0640 root:z4j-agentd" test "$(fact token)" = "640 root:z4j-agentd 0"
    check "%post: hmac_secret empty 0640 root:z4j-agentd" test "$(fact hmac)" = "640 root:z4j-agentd 0"
    check "%post: /var/lib/z4j-agentd 0700 z4j-agentd" test "$(fact state)" = "700 z4j-agentd:z4j-agentd"
    check "%pre and %post (upgrade) exit 0, keep the secret and the one user" \
        test "$(fact pre2) $(fact post2) | $(fact token2) | $(fact users)" = "0 0 | filled-in 640 root:z4j-agentd 10 | 1"
    check "%preun and %postun (erase) exit 0" test "$(fact preun0) $(fact postun0)" = "0 0"
    if [ -s "$scratch/stderr" ]; then echo "--- stderr of the scriptlets"; cat "$scratch/stderr"; fi
else
    echo "SKIP running the scriptlets: no mount namespaces here (unshare -m)"
fi

summary
