# %pre of the z4j-agentd RPM ($1: 1 on install, 2 on upgrade).
# The system group and user z4j-agentd: home /var/lib/z4j-agentd (not
# created here), no login shell. Existing ones are left as they are.
getent group z4j-agentd >/dev/null || groupadd -r z4j-agentd
getent passwd z4j-agentd >/dev/null || \
    useradd -r -g z4j-agentd -d /var/lib/z4j-agentd -M -s /usr/sbin/nologin \
        -c "z4j-agentd task-event daemon" z4j-agentd
exit 0
