# %post of the z4j-agentd RPM ($1: 1 on install, 2 on upgrade).
# /etc/z4j-agentd 0750 root:z4j-agentd; the per-host secrets token and
# hmac_secret, empty, 0640 root:z4j-agentd, only when absent (never
# overwritten); the spool directory /var/lib/z4j-agentd 0700, when absent.
# systemd, as %systemd_post does: on the first install apply the preset
# policy to the units (enables them where the policy says so); nothing is
# started here.
mkdir -p /etc/z4j-agentd
chown root:z4j-agentd /etc/z4j-agentd
chmod 0750 /etc/z4j-agentd
for f in /etc/z4j-agentd/token /etc/z4j-agentd/hmac_secret; do
    if [ ! -e "$f" ] && [ ! -L "$f" ]; then
        (umask 077 && : >"$f")
        chown root:z4j-agentd "$f"
        chmod 0640 "$f"
    fi
done
if [ ! -d /var/lib/z4j-agentd ]; then
    mkdir -p /var/lib/z4j-agentd
    chown z4j-agentd:z4j-agentd /var/lib/z4j-agentd
    chmod 0700 /var/lib/z4j-agentd
fi
if [ "$1" -eq 1 ] && [ -x /usr/bin/systemctl ]; then
    /usr/bin/systemctl --no-reload preset z4j-agentd.socket z4j-agentd.service >/dev/null 2>&1 || :
fi
exit 0
