# %preun of the z4j-agentd RPM ($1: 0 on erase, 1 on upgrade).
# On erase, as %systemd_preun does: disable and stop the socket and the
# service (the daemon drains to the brain for Z4J_SHUTDOWN_GRACE_SECONDS).
if [ "$1" -eq 0 ] && [ -x /usr/bin/systemctl ]; then
    /usr/bin/systemctl --no-reload disable --now z4j-agentd.socket z4j-agentd.service >/dev/null 2>&1 || :
fi
exit 0
