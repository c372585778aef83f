# %postun of the z4j-agentd RPM ($1: 0 on erase, 1 on upgrade).
# Reload systemd; on an upgrade restart the service if it was running, as
# %systemd_postun_with_restart does. On erase the configuration
# (/etc/z4j-agentd: the secrets, and agentd.env if changed, saved as
# .rpmsave), the spool /var/lib/z4j-agentd and the user stay: remove them
# by hand if the host is done with z4j-agentd (docs/packaging.md).
if [ -d /run/systemd/system ]; then
    /usr/bin/systemctl daemon-reload >/dev/null 2>&1 || :
    if [ "$1" -ge 1 ]; then
        /usr/bin/systemctl try-restart z4j-agentd.service >/dev/null 2>&1 || :
    fi
fi
exit 0
