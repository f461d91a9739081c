//! Ports chosen for a process that is told where to listen before it starts (the local runner's
//! coordinator and `/metrics` addresses, tests that start servers as child processes).

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::sync::Mutex;

use rand::Rng;

/// Lowest port handed out: clear of the well-known and common service ports.
const FLOOR: u16 = 20_000;

/// Ports this process already handed out (a check-bind releases the port at once, so two calls
/// could otherwise return the same one).
static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

/// A TCP port that is free now, for another process to listen on.
///
/// `bind(":0")` returns a port from the kernel's ephemeral range, and once that listener is
/// dropped any process's outgoing connection or `:0` listener may take it before the child binds
/// it (a CI run saw a trainer's `/metrics` bind fail that way while sibling tests were opening
/// connections). This picks a random port between 20000 and the start of the ephemeral range
/// instead, where only another explicit choice can collide, and checks that it binds on every
/// address. Falls back to `bind(":0")` when the kernel's range leaves no room below it.
pub fn free_port() -> std::io::Result<u16> {
    let lo = ephemeral_range_start().unwrap_or(32_768);
    if lo > FLOOR + 1_000 {
        let mut handed = HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(port) = pick(FLOOR..lo, &mut handed) {
            return Ok(port);
        }
    }
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A random port of `range` that binds on every address and is not in `handed` (then added).
fn pick(range: std::ops::Range<u16>, handed: &mut BTreeSet<u16>) -> Option<u16> {
    let mut rng = rand::rng();
    for _ in 0..256 {
        let port = rng.random_range(range.clone());
        if !handed.contains(&port) && TcpListener::bind(("0.0.0.0", port)).is_ok() {
            handed.insert(port);
            return Some(port);
        }
    }
    None
}

/// The first port of Linux's `net.ipv4.ip_local_port_range`; None elsewhere.
fn ephemeral_range_start() -> Option<u16> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    text.split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_distinct_bindable_and_below_the_ephemeral_range() {
        let lo = ephemeral_range_start().unwrap_or(32_768);
        let ports: Vec<u16> = (0..200).map(|_| free_port().unwrap()).collect();
        let distinct: BTreeSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), ports.len(), "a port was handed out twice");
        for &p in &ports {
            if lo > FLOOR + 1_000 {
                assert!((FLOOR..lo).contains(&p), "port {p} outside {FLOOR}..{lo}");
            }
            TcpListener::bind(("127.0.0.1", p)).unwrap_or_else(|e| panic!("port {p} does not bind: {e}"));
        }
    }

    #[test]
    fn a_port_someone_listens_on_is_not_handed_out() {
        // Three ports in a row of the window, two held by listeners: only the third may come back.
        let (base, mut held) = (FLOOR..u16::MAX - 3)
            .step_by(97)
            .find_map(|b| {
                let l: Vec<TcpListener> = (b..b + 3).filter_map(|p| TcpListener::bind(("0.0.0.0", p)).ok()).collect();
                (l.len() == 3).then_some((b, l))
            })
            .expect("three free ports in a row");
        drop(held.remove(1));
        for _ in 0..20 {
            assert_eq!(pick(base..base + 3, &mut BTreeSet::new()), Some(base + 1));
        }
        // Once handed out, not again; with nothing else free, no port.
        let mut handed = BTreeSet::from([base + 1]);
        assert_eq!(pick(base..base + 3, &mut handed), None);
    }
}
