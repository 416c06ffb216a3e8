//! `kino_engine::memory`: the allocator's phases switch only for a program that opted in, once
//! in and once out of the outermost lean phase, also when its closure fails. (Its own test binary: the
//! settings are process-wide.)

use kino_engine::memory::{lean, manage, switches};

#[test]
fn lean_switches_only_when_managed_and_only_at_the_outer_level() {
    // Not managed: nothing changes.
    let before = switches();
    assert_eq!(lean(|| 7), 7);
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
    // Nested lean phases switch once in and once out.
    let v = lean(|| lean(|| 3) + 1);
    assert_eq!(v, 4);
    assert_eq!(switches(), after_manage + 2);
    // A phase whose closure fails (panics) still ends, and the next starts one again.
    let r = std::panic::catch_unwind(|| lean(|| -> u8 { panic!("load failed") }));
    assert!(r.is_err());
    assert_eq!(switches(), after_manage + 4);
    lean(|| ());
    assert_eq!(switches(), after_manage + 6);
}
