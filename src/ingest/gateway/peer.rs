//! Who is at the other end of a loopback TCP connection: the socket's
//! owner from `/proc/net/tcp` (the kernel's record, not what the agent
//! says), and its group from `/proc/<pid>/status` when the pid the agent
//! declared belongs to that same user.

use std::net::{IpAddr, SocketAddr};

/// Unknown uid or gid, as `stats` shows it.
pub(super) const UNKNOWN_ID: u32 = u32::MAX;

/// The peer's uid and gid ([`UNKNOWN_ID`] where it cannot be told).
pub(super) fn credentials(peer: SocketAddr, local: SocketAddr, pid: Option<i32>) -> (u32, u32) {
    let table = match peer.ip() {
        IpAddr::V4(_) => "/proc/net/tcp",
        IpAddr::V6(_) => "/proc/net/tcp6",
    };
    let uid = std::fs::read_to_string(table)
        .ok()
        .and_then(|t| socket_uid(&t, peer, local))
        .unwrap_or(UNKNOWN_ID);
    let gid = pid
        .filter(|_| uid != UNKNOWN_ID)
        .and_then(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
        .and_then(|s| status_ids(&s))
        .filter(|(u, _)| *u == uid)
        .map_or(UNKNOWN_ID, |(_, g)| g);
    (uid, gid)
}

/// The kernel's hex form of an address in `/proc/net/tcp{,6}`.
fn hex_addr(a: SocketAddr) -> String {
    let ip = match a.ip() {
        IpAddr::V4(v4) => format!("{:08X}", u32::from_le_bytes(v4.octets())),
        IpAddr::V6(v6) => v6
            .octets()
            .chunks(4)
            .map(|c| format!("{:08X}", u32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
    };
    format!("{ip}:{:04X}", a.port())
}

/// The uid of the socket whose local end is `peer` and remote end `local`.
fn socket_uid(table: &str, peer: SocketAddr, local: SocketAddr) -> Option<u32> {
    let (want_local, want_remote) = (hex_addr(peer), hex_addr(local));
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        (f.len() > 7 && f[1] == want_local && f[2] == want_remote)
            .then(|| f[7].parse().ok())
            .flatten()
    })
}

/// The real uid and gid of a `/proc/<pid>/status`.
fn status_ids(status: &str) -> Option<(u32, u32)> {
    let first = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    Some((first("Uid:")?, first("Gid:")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_socket_owner_is_read_from_the_kernels_table() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:1E14 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1\n   1: 0100007F:C350 0100007F:1E14 01 00000000:00000000 00:00000000 00000000  1001        0 2\n";
        let peer: SocketAddr = "127.0.0.1:50000".parse().unwrap();
        let local: SocketAddr = "127.0.0.1:7700".parse().unwrap();
        assert_eq!(socket_uid(table, peer, local), Some(1001));
        assert_eq!(socket_uid(table, local, peer), None);
    }

    #[test]
    fn a_live_connection_is_owned_by_this_process_user() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (_s, peer) = l.accept().unwrap();
        assert_eq!(peer, c.local_addr().unwrap());
        let (uid, gid) = credentials(
            peer,
            l.local_addr().unwrap(),
            Some(std::process::id() as i32),
        );
        assert_eq!(uid, crate::host::current_uid());
        assert_ne!(gid, UNKNOWN_ID);
    }
}
