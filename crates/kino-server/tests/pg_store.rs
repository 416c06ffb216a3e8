//! The Postgres job store against a real Postgres 15 (a throwaway cluster started here):
//! migrations, SKIP LOCKED leasing by many workers, completion only by the lease holder,
//! re-running after a lease expires, heartbeats, cancellation across nodes (NOTIFY), models
//! per worker, and the start-up errors.

mod rig;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kino_engine::wan::pipeline::GenerateRequest;
use kino_server::pg::{self, PgStore};
use kino_server::store::{Job, JobParams, JobStore, LeaseState, Status};
use kino_server::ServerError;

fn job(model: &str) -> Job {
    Job {
        id: kino_server::new_video_id(),
        seq: 0,
        status: Status::Queued,
        progress: 0,
        created_at: kino_server::now_unix(),
        completed_at: None,
        expires_at: None,
        model: model.into(),
        size: "64x64".into(),
        seconds: "1".into(),
        prompt: "a test".into(),
        remixed_from_video_id: None,
        error: None,
        params: JobParams {
            model_id: model.into(),
            request: GenerateRequest::default(),
            fps: 8,
            inputs: None,
            long: None,
            lora: Vec::new(),
            cache: None,
            preset: None,
        },
        owner: None,
        output_attempt: None,
    }
}

fn migrated() -> Option<rig::Postgres> {
    let pg = rig::Postgres::start()?;
    pg::migrate(&pg.url()).expect("migrate");
    Some(pg)
}

fn models(m: &[&str]) -> Vec<String> {
    m.iter().map(|s| s.to_string()).collect()
}

#[test]
fn migrate_is_needed_and_idempotent() {
    let _g = rig::serial();
    let Some(pg) = rig::Postgres::start() else {
        return;
    };
    let url = pg.url();
    let err = PgStore::connect(&url, Duration::from_secs(5))
        .err()
        .expect("no tables yet");
    let msg = err.to_string();
    assert!(
        msg.contains("kino migrate --database") && msg.contains("no Kino tables"),
        "{msg}"
    );
    let applied = pg::migrate(&url).unwrap();
    assert_eq!(applied.len(), pg::schema_version() as usize, "{applied:?}");
    assert!(pg::migrate(&url).unwrap().is_empty(), "second run: nothing");
    assert_eq!(
        pg.psql("SELECT max(version) FROM kino_migrations"),
        pg::schema_version().to_string()
    );
    PgStore::connect(&url, Duration::from_secs(5)).expect("connects once migrated");
    // A newer schema than this build: refuse.
    pg.psql("INSERT INTO kino_migrations (version, name) VALUES (999, 'future')");
    let msg = PgStore::connect(&url, Duration::from_secs(5))
        .err()
        .unwrap()
        .to_string();
    assert!(msg.contains("newer than this Kino"), "{msg}");
}

#[test]
fn startup_errors_are_one_clear_sentence() {
    let _g = rig::serial();
    let Some(pg) = migrated() else {
        return;
    };
    let lease = Duration::from_secs(5);
    let cases: Vec<(String, &str)> = vec![
        ("not a url".into(), "not a Postgres URL"),
        ("mysql://x@127.0.0.1/db".into(), "not a Postgres URL"),
        (
            format!(
                "postgres://postgres@127.0.0.1:{}/postgres",
                rig::free_port()
            ),
            "cannot reach the database server",
        ),
        (
            format!("postgres://postgres@127.0.0.1:{}/nosuchdb", pg.port),
            "does not exist",
        ),
        (
            format!("postgres://nobody:secret@127.0.0.1:{}/postgres", pg.port),
            "nobody",
        ),
    ];
    for (url, want) in cases {
        let t0 = Instant::now();
        let e = PgStore::connect(&url, lease).err().expect(&url);
        assert!(matches!(e, ServerError::Database { .. }), "{url}: {e:?}");
        let msg = e.to_string();
        assert!(msg.contains(want), "{url}: {msg}");
        assert!(!msg.contains("secret"), "the password is not shown: {msg}");
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "{url}: took {:?}",
            t0.elapsed()
        );
        eprintln!("{msg}");
    }
}

#[test]
fn many_workers_lease_each_job_once_in_order_and_only_their_models() {
    let _g = rig::serial();
    let Some(pg) = migrated() else {
        return;
    };
    let store = Arc::new(PgStore::connect(&pg.url(), Duration::from_secs(30)).unwrap());
    let mut ids = Vec::new();
    for i in 0..60 {
        let j = job(if i % 3 == 0 { "b" } else { "a" });
        store.insert(&j).unwrap();
        ids.push((j.id, j.params.model_id));
    }
    let taken: Arc<Mutex<Vec<(String, String, String)>>> = Arc::default();
    let threads: Vec<_> = (0..8)
        .map(|w| {
            let store = store.clone();
            let taken = taken.clone();
            std::thread::spawn(move || {
                let name = format!("w{w}");
                // Workers 0..6 hold model a only; 6 and 7 hold a and b.
                let held = if w < 6 {
                    models(&["a"])
                } else {
                    models(&["a", "b"])
                };
                while let Some((j, lease, took_over)) = store.claim_next(&name, &held).unwrap() {
                    assert!(!took_over);
                    assert_eq!(lease.attempt, 1);
                    assert!(
                        held.contains(&j.params.model_id),
                        "{name} got {}",
                        j.params.model_id
                    );
                    assert_eq!(j.status, Status::InProgress);
                    assert!(store.complete(&j.id, &lease, 1).unwrap());
                    taken
                        .lock()
                        .unwrap()
                        .push((j.id, name.clone(), j.params.model_id));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let taken = taken.lock().unwrap();
    assert_eq!(taken.len(), ids.len(), "every job leased exactly once");
    let mut seen = HashMap::new();
    for (id, w, _) in taken.iter() {
        assert!(seen.insert(id.clone(), w.clone()).is_none(), "{id} twice");
    }
    for (id, m) in &ids {
        let w = &seen[id];
        if m == "b" {
            assert!(w == "w6" || w == "w7", "{id} (model b) went to {w}");
        }
    }
    assert_eq!(
        store.counts().unwrap(),
        vec![
            (Status::Queued, 0),
            (Status::InProgress, 0),
            (Status::Completed, 60),
            (Status::Failed, 0)
        ]
    );
    // A worker without the model gets nothing.
    store.insert(&job("c")).unwrap();
    assert!(store
        .claim_next("w0", &models(&["a", "b"]))
        .unwrap()
        .is_none());
    assert!(store.claim_next("w9", &models(&["c"])).unwrap().is_some());
}

#[test]
fn expired_lease_runs_again_and_only_the_new_holder_completes() {
    let _g = rig::serial();
    let Some(pg) = migrated() else {
        return;
    };
    let lease = Duration::from_secs(1);
    let store = PgStore::connect(&pg.url(), lease).unwrap();
    let j = job("a");
    store.insert(&j).unwrap();
    let held = models(&["a"]);
    let (_, first, took) = store.claim_next("dead", &held).unwrap().unwrap();
    assert!(!took);
    store.set_progress(&j.id, &first, 40).unwrap();
    // While the lease runs, nobody else gets it.
    assert!(store.claim_next("other", &held).unwrap().is_none());
    let t0 = Instant::now();
    let (again, second, took) = loop {
        if let Some(c) = store.claim_next("other", &held).unwrap() {
            break c;
        }
        assert!(t0.elapsed() < Duration::from_secs(5), "never re-leased");
        std::thread::sleep(Duration::from_millis(50));
    };
    eprintln!("re-leased after {:?} (lease 1 s)", t0.elapsed());
    assert!(took, "taken over from an expired lease");
    assert_eq!(again.id, j.id);
    assert_eq!(second.attempt, first.attempt + 1);
    assert_eq!(again.progress, 0, "a new run starts from 0");
    // The dead worker comes back: its lease is gone, it can change nothing.
    assert_eq!(store.heartbeat(&j.id, &first).unwrap(), LeaseState::Lost);
    store.set_progress(&j.id, &first, 90).unwrap();
    assert_eq!(store.get(&j.id).unwrap().unwrap().progress, 0);
    assert!(!store.complete(&j.id, &first, 1).unwrap(), "not the holder");
    assert!(!store.fail_leased(&j.id, &first, "x", "y", 1).unwrap());
    assert!(store.complete(&j.id, &second, 2).unwrap());
    assert!(
        !store.complete(&j.id, &second, 3).unwrap(),
        "completed once"
    );
    let done = store.get(&j.id).unwrap().unwrap();
    assert_eq!(done.status, Status::Completed);
    assert_eq!(
        done.output_attempt,
        Some(second.attempt),
        "the holder's outputs"
    );
    assert_eq!(done.completed_at, Some(2));
}

#[test]
fn heartbeats_keep_the_lease_and_carry_cancellation() {
    let _g = rig::serial();
    let Some(pg) = migrated() else {
        return;
    };
    let store = Arc::new(PgStore::connect(&pg.url(), Duration::from_secs(1)).unwrap());
    let j = job("a");
    store.insert(&j).unwrap();
    let held = models(&["a"]);
    let (_, lease, _) = store.claim_next("w1", &held).unwrap().unwrap();
    let events: Arc<Mutex<Vec<String>>> = Arc::default();
    let ev = events.clone();
    store.listen(Arc::new(move |p: &str| {
        ev.lock().unwrap().push(p.to_string())
    }));
    std::thread::sleep(Duration::from_millis(300));
    // 3 s of heartbeats every 300 ms: the 1 s lease never runs out.
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(3) {
        assert_eq!(
            store.heartbeat(&j.id, &lease).unwrap(),
            LeaseState::Held { cancel: false }
        );
        assert!(store.claim_next("w2", &held).unwrap().is_none());
        std::thread::sleep(Duration::from_millis(300));
    }
    // Another node asks to cancel: the heartbeat says so, and listeners hear it at once.
    store.request_cancel(&j.id).unwrap();
    assert_eq!(
        store.heartbeat(&j.id, &lease).unwrap(),
        LeaseState::Held { cancel: true }
    );
    let want = format!("cancel:{}", j.id);
    let t0 = Instant::now();
    while !events.lock().unwrap().contains(&want) {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "no NOTIFY: {:?}",
            events.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(store
        .fail_leased(&j.id, &lease, "cancelled", "cancelled", 1)
        .unwrap());
    assert_eq!(store.get(&j.id).unwrap().unwrap().status, Status::Failed);

    // A cancelled job whose worker died fails instead of running again.
    let k = job("a");
    store.insert(&k).unwrap();
    let (_, _dead, _) = store.claim_next("w1", &held).unwrap().unwrap();
    store.request_cancel(&k.id).unwrap();
    std::thread::sleep(Duration::from_millis(1200));
    assert!(store.claim_next("w2", &held).unwrap().is_none());
    let k = store.get(&k.id).unwrap().unwrap();
    assert_eq!(k.status, Status::Failed);
    assert_eq!(k.error.unwrap().0, "cancelled");
}

#[test]
fn a_job_that_keeps_killing_workers_fails_after_max_lost() {
    let _g = rig::serial();
    let Some(pg) = migrated() else {
        return;
    };
    let store = PgStore::connect(&pg.url(), Duration::from_secs(1)).unwrap();
    let j = job("a");
    store.insert(&j).unwrap();
    let held = models(&["a"]);
    let mut runs = 0;
    let t0 = Instant::now();
    loop {
        if store
            .claim_next(&format!("w{runs}"), &held)
            .unwrap()
            .is_some()
        {
            runs += 1;
        }
        let now = store.get(&j.id).unwrap().unwrap();
        if now.status == Status::Failed {
            let (code, msg) = now.error.unwrap();
            assert_eq!(code, "worker_lost");
            assert!(msg.contains("stopped"), "{msg}");
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "never gave up");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(runs as i64, pg::MAX_LOST, "ran MAX_LOST times");
}

#[test]
fn released_job_goes_straight_back_to_the_queue() {
    let _g = rig::serial();
    let Some(pg) = migrated() else {
        return;
    };
    let store = PgStore::connect(&pg.url(), Duration::from_secs(60)).unwrap();
    let j = job("a");
    store.insert(&j).unwrap();
    let held = models(&["a"]);
    let (_, lease, _) = store.claim_next("stopping", &held).unwrap().unwrap();
    store.release(&j.id, &lease).unwrap();
    let (again, l2, took) = store.claim_next("other", &held).unwrap().expect("at once");
    assert_eq!(again.id, j.id);
    assert!(!took, "released, not expired");
    assert!(l2.attempt > lease.attempt);
    store.register_worker("other", &held).unwrap();
    assert_eq!(
        store.workers_per_model().unwrap(),
        vec![("a".to_string(), 1)]
    );
    store.unregister_worker("other").unwrap();
    assert!(store.workers_per_model().unwrap().is_empty());
}
