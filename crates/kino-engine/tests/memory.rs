//! `kino_engine::memory`: the allocator's phases switch only for a program that opted in, once
//! in and once out of the outermost load, also when a load fails. (Its own test binary: the
//! settings are process-wide.)

use kino_engine::memory::{loading, manage, switches};

#[test]
fn loading_switches_only_when_managed_and_only_at_the_outer_level() {
    // Not managed: nothing changes.
    let before = switches();
    assert_eq!(loading(|| 7), 7);
    assert_eq!(switches(), before);
    manage();
    let after_manage = switches();
    assert_eq!(after_manage, before + 1);
    manage();
    assert_eq!(
        switches(),
        after_manage,
        "a second manage() changes nothing"
    );
    // Nested loads switch once in and once out.
    let v = loading(|| loading(|| 3) + 1);
    assert_eq!(v, 4);
    assert_eq!(switches(), after_manage + 2);
    // A load that fails (panics) still ends its phase, and the next load starts one again.
    let r = std::panic::catch_unwind(|| loading(|| -> u8 { panic!("load failed") }));
    assert!(r.is_err());
    assert_eq!(switches(), after_manage + 4);
    loading(|| ());
    assert_eq!(switches(), after_manage + 6);
}
