//! Issue 7 acceptance 5: confmesh ↔ confmesh IKE in network namespaces (run as root; CI does).
//! Three daemons reach phase 2 with each other; a killed peer is declared dead by dead-peer
//! detection within three intervals; a restarted peer gets its SAs back at once (INITIAL-CONTACT),
//! also when it comes back before the others noticed it was gone.
//!
//! The daemon's DPD interval is not configurable: it is the engine's default
//! (`confmesh_ike::EndpointConfig::new`), which this test reads.

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use support::*;

/// AH lines of a daemon's key log as (src, dst, spi, key).
fn ah_lines(d: &Daemon) -> BTreeSet<(String, String, String, String)> {
    let text = std::fs::read_to_string(d.dir.join("keylog")).unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with("AH "))
        .filter_map(|l| {
            let get = |k: &str| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix(k))
                    .map(str::to_owned)
            };
            Some((get("src=")?, get("dst=")?, get("spi=")?, get("key=")?))
        })
        .collect()
}

/// Whether `a` and `b` share a complete SA pair: both directions, same SPIs and keys in both logs.
fn share_pair(
    a: &Daemon,
    b: &Daemon,
    exclude: &BTreeSet<(String, String, String, String)>,
) -> bool {
    let (la, lb) = (ah_lines(a), ah_lines(b));
    let (ma, mb) = (mgmt(a.i).to_string(), mgmt(b.i).to_string());
    let common: Vec<_> = la
        .intersection(&lb)
        .filter(|l| !exclude.contains(*l))
        .collect();
    common.iter().any(|l| l.0 == ma && l.1 == mb) && common.iter().any(|l| l.0 == mb && l.1 == ma)
}

fn ike_established(d: &Daemon, j: u8) -> bool {
    d.peer(j).is_some_and(|p| p["ike"] == "established")
}

/// Milliseconds since the epoch of an event-log line ("2026-01-02T03:04:05.678Z …").
fn line_ms(line: &str) -> Option<u64> {
    let ts = line.split_whitespace().next()?;
    let (date, time) = ts.strip_suffix('Z')?.split_once('T')?;
    let d: Vec<i64> = date
        .split('-')
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    let (hms, ms) = time.split_once('.')?;
    let t: Vec<u64> = hms
        .split(':')
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    let (y, m, day) = (d[0] - i64::from(d[1] <= 2), d[1], d[2]);
    // Days from civil (Howard Hinnant).
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = u64::try_from(era * 146_097 + doe - 719_468).ok()?;
    Some(((days * 86_400 + t[0] * 3600 + t[1] * 60 + t[2]) * 1000) + ms.parse::<u64>().ok()?)
}

fn dead_lines(d: &Daemon, j: u8) -> Vec<String> {
    let out = d.cli(&["log", "events"]);
    let want = format!("peer {} stopped answering dead-peer detection", mgmt(j));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&want))
        .map(str::to_owned)
        .collect()
}

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[test]
fn three_peers_phase_two_dead_peer_detection_and_restart() {
    if !require_root("three_peers_phase_two_dead_peer_detection_and_restart") {
        return;
    }
    let dpd = confmesh_ike::EndpointConfig::new(mgmt(1), mgmt(1)).dpd_interval;
    let topo = Topology::up("cmdp", 3);
    let mut d: Vec<Daemon> = (1..=3)
        .map(|i| Daemon::start(&topo, &PeerSpec::new(i, &[1, 2, 3])))
        .collect();
    let none = BTreeSet::new();
    let all_pairs = |d: &[Daemon], exclude: &BTreeSet<_>| {
        share_pair(&d[0], &d[1], exclude)
            && share_pair(&d[0], &d[2], exclude)
            && share_pair(&d[1], &d[2], exclude)
    };
    assert!(
        wait_until(Duration::from_secs(20), || all_pairs(&d, &none)),
        "phase 2 not reached between all three peers:\n{}\n{}",
        d[0].log(),
        d[2].log()
    );
    for (a, b) in [(0, 2), (0, 3), (1, 1), (1, 3), (2, 1), (2, 2)] {
        assert!(
            wait_until(Duration::from_secs(5), || ike_established(&d[a], b)),
            "{:?}",
            d[a].peer(b)
        );
    }

    // Peer 3 crashes: the others declare it dead within three DPD intervals.
    let killed_at = wall_ms();
    d[2].kill();
    let limit = dpd * 3;
    assert!(
        wait_until(limit + Duration::from_secs(3), || !dead_lines(&d[0], 3)
            .is_empty()
            && !dead_lines(&d[1], 3).is_empty()),
        "peer 3 not declared dead"
    );
    for s in [&d[0], &d[1]] {
        let at = line_ms(&dead_lines(s, 3)[0]).expect("event-log timestamp");
        let after = Duration::from_millis(at.saturating_sub(killed_at));
        eprintln!(
            "peer {} declared peer 3 dead {after:?} after the kill (DPD interval {dpd:?})",
            s.i
        );
        // The engine's verdict comes 2.5 intervals after the peer was last heard.
        assert!(
            after <= limit,
            "peer {}: dead after {after:?} > {limit:?}",
            s.i
        );
        assert!(!ike_established(s, 3), "{:?}", s.peer(3));
    }

    // Restart: SAs with both survivors at once.
    let before = ah_lines(&d[0])
        .union(&ah_lines(&d[1]))
        .cloned()
        .collect::<BTreeSet<_>>();
    let restarted = Instant::now();
    d[2].restart();
    assert!(
        wait_until(Duration::from_secs(10), || share_pair(
            &d[0], &d[2], &before
        ) && share_pair(
            &d[1], &d[2], &before
        )),
        "SAs did not re-form after the restart:\n{}",
        d[2].log()
    );
    let took = restarted.elapsed();
    eprintln!("SAs re-formed {took:?} after the restart");
    assert!(took < Duration::from_secs(5), "re-forming took {took:?}");

    // Crash and restart before DPD can notice: INITIAL-CONTACT replaces the stale SAs at once and
    // overlay traffic flows again without waiting for dead-peer detection.
    let before = ah_lines(&d[0])
        .union(&ah_lines(&d[1]))
        .cloned()
        .collect::<BTreeSet<_>>();
    let dead_before = dead_lines(&d[0], 3).len();
    d[2].kill();
    let restarted = Instant::now();
    d[2].restart();
    assert!(
        wait_until(Duration::from_secs(5), || share_pair(&d[0], &d[2], &before)
            && share_pair(&d[1], &d[2], &before)),
        "SAs did not re-form after a quick restart:\n{}",
        d[2].log()
    );
    eprintln!(
        "SAs re-formed {:?} after a quick restart",
        restarted.elapsed()
    );
    assert!(
        wait_until(Duration::from_secs(5), || topo
            .exec("p1", &["ping", "-c", "1", "-W", "1", "198.18.0.3"])
            .status
            .success()),
        "no overlay traffic to the restarted peer"
    );
    assert!(
        restarted.elapsed() < dpd * 2,
        "recovery waited for dead-peer detection: {:?}",
        restarted.elapsed()
    );
    assert_eq!(
        dead_lines(&d[0], 3).len(),
        dead_before,
        "the quick restart went through dead-peer detection"
    );
}
