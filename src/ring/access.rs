//! Who may attach: the producer's own uid, and with `--allow-group GROUP` the members of that
//! group (primary gid from `SO_PEERCRED`, supplementary groups from `/proc/<pid>/status`).

use std::io;

use thiserror::Error;

/// A `--allow-group` value that names no group.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum GroupError {
    /// Neither a numeric gid nor a name in `/etc/group`.
    #[error("unknown group {group:?} (not a number and not in /etc/group)")]
    Unknown {
        /// The value given.
        group: String,
    },
    /// `/etc/group` could not be read.
    #[error("cannot read /etc/group to resolve group {group:?}: {source}")]
    Io {
        /// The value given.
        group: String,
        /// The OS error.
        source: io::Error,
    },
}

/// Resolves a group name or numeric gid to a gid.
pub fn resolve_group(group: &str) -> Result<u32, GroupError> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(gid);
    }
    let text = std::fs::read_to_string("/etc/group").map_err(|source| GroupError::Io {
        group: group.to_owned(),
        source,
    })?;
    gid_in_group_file(&text, group).ok_or_else(|| GroupError::Unknown {
        group: group.to_owned(),
    })
}

/// The gid of `name` in `/etc/group` text (`name:x:gid:members`).
fn gid_in_group_file(text: &str, name: &str) -> Option<u32> {
    text.lines().find_map(|line| {
        let mut f = line.split(':');
        (f.next()? == name).then_some(())?;
        f.nth(1)?.trim().parse().ok()
    })
}

/// The supplementary groups of the `Groups:` line of `/proc/<pid>/status` text.
fn groups_in_status(status: &str) -> Vec<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .map(|g| {
            g.split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The peer's credentials as `SO_PEERCRED` reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Peer {
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) pid: u32,
}

/// Whether `peer` may attach to a producer running as `ours` that allows `group`.
///
/// Supplementary groups are read from `/proc/<pid>/status` while the peer is connected (its
/// pid cannot be reused while it lives); a pid that is not visible in our pid namespace (0)
/// counts only by its primary gid.
pub(crate) fn peer_allowed(peer: Peer, ours: u32, group: Option<u32>) -> bool {
    peer_allowed_with(peer, ours, group, |pid| {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .map(|s| groups_in_status(&s))
            .unwrap_or_default()
    })
}

fn peer_allowed_with(
    peer: Peer,
    ours: u32,
    group: Option<u32>,
    groups_of: impl FnOnce(u32) -> Vec<u32>,
) -> bool {
    if peer.uid == ours {
        return true;
    }
    let Some(g) = group else {
        return false;
    };
    peer.gid == g || (peer.pid != 0 && groups_of(peer.pid).contains(&g))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_resolve_by_number_and_name() {
        let text = "root:x:0:\nvideo:x:44:alice,bob\ntrain:x:1234:\n";
        assert_eq!(gid_in_group_file(text, "train"), Some(1234));
        assert_eq!(gid_in_group_file(text, "video"), Some(44));
        assert_eq!(gid_in_group_file(text, "vid"), None);
        assert_eq!(resolve_group("4242").unwrap(), 4242);
        assert!(matches!(
            resolve_group("no-such-group-ringfeed"),
            Err(GroupError::Unknown { .. })
        ));
    }

    #[test]
    fn supplementary_groups_parse() {
        let status = "Name:\tpython\nUid:\t1000\t1000\t1000\t1000\nGroups:\t4 24 1234 \nNgid:\t0\n";
        assert_eq!(groups_in_status(status), vec![4, 24, 1234]);
        assert!(groups_in_status("Name:\tx\n").is_empty());
    }

    #[test]
    fn peer_rules() {
        let p = |uid, gid, pid| Peer { uid, gid, pid };
        let none = |_| Vec::new();
        assert!(peer_allowed_with(p(5, 5, 9), 5, None, none));
        assert!(!peer_allowed_with(p(6, 6, 9), 5, None, |_| vec![7]));
        assert!(peer_allowed_with(p(6, 7, 9), 5, Some(7), none));
        assert!(peer_allowed_with(p(6, 6, 9), 5, Some(7), |_| vec![3, 7]));
        assert!(!peer_allowed_with(p(6, 6, 9), 5, Some(7), |_| vec![3]));
        assert!(!peer_allowed_with(p(6, 6, 0), 5, Some(7), |_| vec![7]));
    }
}
