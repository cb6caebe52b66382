//! Leases on both backends: one holder at a time however many masters ask at once, a lease
//! that expires is taken over with the next epoch, a dead holder's or a released lease at
//! once; on PostgreSQL, a master whose lease was taken can write nothing more (fencing).
//! Expiry is waited for with a deadline, never a guessed sleep.

use std::time::{Duration, Instant};

use paddock::core::{MachineId, Ts};
use paddock::store::{Fence, StoreError, FARM};

mod common;

use common::db::TestDb;

on_both_backends!(
    one_master_at_a_time_holds_the_farm,
    an_expired_lease_is_taken_with_the_next_epoch_and_the_old_holder_cannot_renew,
    a_dead_holders_or_a_released_lease_is_taken_at_once,
    the_masters_roll_call,
);

fn never_stale(_: &str) -> bool {
    false
}

async fn one_master_at_a_time_holds_the_farm(db: &TestDb) {
    let stores = [db.open().await, db.open().await, db.open().await];
    let asks = stores.iter().enumerate().map(|(i, s)| {
        let holder = format!("master-{i}");
        async move { s.acquire_lease(FARM, &holder, 30.0, never_stale).await.expect("acquire") }
    });
    let got = futures_util::future::join_all(asks).await;
    let winners: Vec<usize> = got.iter().enumerate().filter(|(_, g)| g.is_some()).map(|(i, _)| i).collect();
    assert_eq!(winners.len(), 1, "exactly one holder: {got:?}");
    let w = winners[0];
    assert_eq!(got[w], Some(1), "the first epoch");
    // The holder asking again keeps its epoch; the others still get nothing.
    assert_eq!(stores[w].acquire_lease(FARM, &format!("master-{w}"), 30.0, never_stale).await.expect("again"), Some(1));
    let other = (w + 1) % 3;
    assert_eq!(
        stores[other].acquire_lease(FARM, &format!("master-{other}"), 30.0, never_stale).await.expect("no"),
        None
    );
    let leases = stores[0].leases().await.expect("leases");
    assert_eq!(leases.len(), 1);
    assert_eq!((leases[0].holder.as_str(), leases[0].epoch, leases[0].held), (format!("master-{w}").as_str(), 1, true));
}

/// Polls `f` until it gives `Some`, failing after 20 s.
async fn eventually<T>(what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn an_expired_lease_is_taken_with_the_next_epoch_and_the_old_holder_cannot_renew(db: &TestDb) {
    let (a, b) = (db.open().await, db.open().await);
    assert_eq!(a.acquire_lease(FARM, "a", 0.5, never_stale).await.expect("a"), Some(1));
    let fence_a = Fence { scope: FARM.into(), holder: "a".into(), epoch: 1 };
    assert!(a.renew_lease(&fence_a, 0.5).await.expect("renew"), "a renews while it holds it");
    assert_eq!(b.acquire_lease(FARM, "b", 30.0, never_stale).await.expect("b"), None, "held");
    let epoch = eventually("a's lease to expire and b to take it", async || {
        b.acquire_lease(FARM, "b", 30.0, never_stale).await.expect("b")
    })
    .await;
    assert_eq!(epoch, 2);
    assert!(!a.renew_lease(&fence_a, 30.0).await.expect("renew"), "a lost it");
    assert_eq!(a.acquire_lease(FARM, "a", 30.0, never_stale).await.expect("a"), None);
    let lease = &a.leases().await.expect("leases")[0];
    assert_eq!((lease.holder.as_str(), lease.epoch, lease.held), ("b", 2, true));
}

async fn a_dead_holders_or_a_released_lease_is_taken_at_once(db: &TestDb) {
    let (a, b) = (db.open().await, db.open().await);
    assert_eq!(a.acquire_lease(FARM, "a", 60.0, never_stale).await.expect("a"), Some(1));
    assert_eq!(b.acquire_lease(FARM, "b", 60.0, |h| h == "a").await.expect("b"), Some(2), "a is known dead");
    b.release_lease(&Fence { scope: FARM.into(), holder: "b".into(), epoch: 2 }).await.expect("release");
    assert_eq!(a.acquire_lease(FARM, "a", 60.0, never_stale).await.expect("a"), Some(3), "released: free at once");
    // Releasing a lease one no longer holds changes nothing.
    b.release_lease(&Fence { scope: FARM.into(), holder: "b".into(), epoch: 2 }).await.expect("release");
    assert_eq!(b.acquire_lease(FARM, "b", 60.0, never_stale).await.expect("b"), None);
}

async fn the_masters_roll_call(db: &TestDb) {
    let s = db.open().await;
    s.master_started("m1", "host-a", 11, "http://a:8010").await.expect("m1");
    s.master_started("m2", "host-b", 22, "http://b:8010").await.expect("m2");
    s.master_heartbeat("m2", Some("http://b:9000")).await.expect("beat");
    s.master_stopped("m1").await.expect("stopped");
    let masters = s.masters(60.0).await.expect("masters");
    assert_eq!(masters.len(), 2, "{masters:?}");
    let m1 = masters.iter().find(|m| m.id == "m1").expect("m1");
    let m2 = masters.iter().find(|m| m.id == "m2").expect("m2");
    assert!(m1.stopped_at.is_some() && m2.stopped_at.is_none());
    assert_eq!((m2.host.as_str(), m2.pid, m2.url.as_str()), ("host-b", 22, "http://b:9000"));
    assert!(m2.heartbeat_at >= m2.started_at && m2.heartbeat_at.ends_with('Z'), "{m2:?}");
    // Starting again (a restart under the same id) clears the stop.
    s.master_started("m1", "host-a", 11, "http://a:8010").await.expect("again");
    assert!(s.masters(60.0).await.expect("masters").iter().all(|m| m.stopped_at.is_none()));
    assert!(s.masters(-3600.0).await.expect("none").is_empty(), "none heard from in the future");
}

/// On PostgreSQL, every write of a master checks its lease: once another master took the
/// farm, the first one's writes fail and leave nothing, and the new holder's go through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_whose_lease_was_taken_writes_nothing_more() {
    let db = TestDb::postgres().await;
    let (a, b) = (db.open().await, db.open().await);
    assert_eq!(a.acquire_lease(FARM, "a", 0.5, never_stale).await.expect("a"), Some(1));
    a.set_fence(Some(Fence { scope: FARM.into(), holder: "a".into(), epoch: 1 }));
    a.insert_machine(MachineId(1), "p", "local", "t1", Ts(0)).await.expect("a writes while it holds the farm");
    let epoch =
        eventually("b to take the farm", async || b.acquire_lease(FARM, "b", 30.0, never_stale).await.expect("b"))
            .await;
    b.set_fence(Some(Fence { scope: FARM.into(), holder: "b".into(), epoch }));
    let refused = a.insert_machine(MachineId(2), "p", "local", "t2", Ts(0)).await;
    assert!(matches!(refused, Err(StoreError::Fenced(ref s)) if s == FARM), "{refused:?}");
    assert!(a.machine(MachineId(2)).await.expect("read").is_none(), "nothing written");
    b.insert_machine(MachineId(3), "p", "local", "t3", Ts(0)).await.expect("b writes");
    assert_eq!(b.list_machines(None, None).await.expect("list").len(), 2);
    drop((a, b));
    db.remove().await;
}
