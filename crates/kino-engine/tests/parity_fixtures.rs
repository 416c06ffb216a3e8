//! Every fixture under fixtures/data, through the same code path as `kino parity`, within the
//! DESIGN.md tolerances (1e-4 for components, 1e-3 for the pipeline).

use kino_engine::parity::{check_fixtures, Component};
use kino_engine::testing::fixtures_dir;

#[test]
fn every_fixture_matches_the_reference() {
    let results = check_fixtures(&fixtures_dir()).expect("fixtures run");
    for r in &results {
        println!(
            "{:<24} {:<14} {:<18} {:.3e} (≤ {:.0e})",
            r.case, r.component, r.output, r.rel_error, r.tolerance
        );
    }
    let failures: Vec<_> = results.iter().filter(|r| !r.passed()).collect();
    assert!(failures.is_empty(), "outside tolerance: {failures:?}");
    // Every parity component is covered by at least one fixture, and the components of both Wan
    // variants and every conditioning (issue 16) are there; video-to-video at two strengths.
    for c in Component::ALL {
        assert!(
            results.iter().any(|r| r.component == c.name()),
            "no fixture exercises `{}`",
            c.name()
        );
    }
    for case in [
        "transformer-wan21",
        "transformer-wan22",
        "vae-wan21",
        "vae-wan22",
        "pipeline-wan21",
        "pipeline-wan22",
        "pipeline-ti2v",
        "pipeline-i2v-wan21",
        "pipeline-flf2v",
        "pipeline-v2v",
        "pipeline-a14b-t2v",
        "pipeline-a14b-i2v",
        "transformer-skyreels",
        "pipeline-df",
        "transformer-vace",
        "pipeline-vace",
        "pipeline-vace-2x",
    ] {
        assert!(
            results.iter().any(|r| r.case == case),
            "fixture case {case} missing"
        );
    }
    let v2v = results
        .iter()
        .filter(|r| r.case == "pipeline-v2v" && r.component == "pipeline-v2v")
        .count();
    assert_eq!(v2v, 2, "video-to-video at two strengths");
    // Diffusion forcing: text (sync, async), continuing a video, and image-to-video (one
    // window, with a last image, two windows sync and async).
    let df = results
        .iter()
        .filter(|r| r.case == "pipeline-df" && r.component == "pipeline-df")
        .count();
    assert_eq!(df, 7, "diffusion-forcing runs");
    // VACE: the transformer (plain, per-layer scale, short control) and the pipeline with a
    // video and mask, a soft mask without guidance, references, both, a per-layer scale and two
    // experts.
    let vace = |case: &str, component: &str| {
        results
            .iter()
            .filter(|r| r.case == case && r.component == component)
            .count()
    };
    assert_eq!(
        vace("transformer-vace", "transformer"),
        3,
        "VACE transformer runs"
    );
    assert_eq!(
        vace("pipeline-vace", "pipeline-vace"),
        6,
        "VACE pipeline runs"
    );
    // ... and on the shipped kino-shapes' shape (2× VAE, patch 1×4×4, 4 mask channels).
    assert_eq!(
        vace("pipeline-vace-2x", "pipeline-vace"),
        2,
        "VACE pipeline runs on a 2× VAE"
    );
    // Step caches (issue 18): each cache at settings where it skips forwards, Kino skipping
    // exactly as many as the reference (checked by `passed`), and the uncached baseline.
    let cached: Vec<_> = results
        .iter()
        .filter(|r| r.case == "pipeline-cache" && r.component == "pipeline" && r.cache.is_some())
        .collect();
    for r in &cached {
        println!(
            "{:<24} {:<70} skipped {:?} (reference {:?})",
            r.case,
            r.cache.as_deref().unwrap_or(""),
            r.skipped,
            r.expected_skipped
        );
        let (skipped, forwards) = r.skipped.expect("a cached run reports its counts");
        assert!(skipped > 0 && skipped < forwards, "{r:?}");
    }
    for kind in ["first-block:", "mag:", "taylorseer:"] {
        assert!(
            cached
                .iter()
                .any(|r| r.cache.as_deref().is_some_and(|c| c.starts_with(kind))),
            "no cached run with {kind}"
        );
    }
    assert_eq!(cached.len(), 6, "pipeline-cache runs with a cache");
}
