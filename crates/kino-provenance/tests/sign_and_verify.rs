//! Signing real files with the local CA and reading them back with the `c2pa` crate's reader;
//! the watermark through a real H.264 encode and decode.

use std::path::Path;

use kino_media::{Fps, Frame, Mp4Options, Video};
use kino_provenance::{C2paState, Provenance, Settings, Subject};

/// A textured moving clip (the watermark hides in texture).
fn clip(w: u32, h: u32, n: usize) -> Video {
    let frames = (0..n)
        .map(|t| {
            Frame::from_fn(w, h, |x, y| {
                let v = ((x * 7 + y * 13 + t as u32 * 5) % 97 + (x ^ y) % 31) as u8;
                [v.wrapping_add(40), v / 2 + 60, 200 - v]
            })
            .unwrap()
        })
        .collect();
    Video::new(frames, Fps::integer(8).unwrap()).unwrap()
}

fn open(dir: &Path) -> Provenance {
    let settings = Settings {
        data_dir: Some(dir.to_path_buf()),
        ..Default::default()
    };
    Provenance::open(settings).unwrap()
}

fn mp4(prov: &Provenance, path: &Path) -> kino_provenance::Stamped {
    let video = clip(256, 256, 17);
    let opts = Mp4Options {
        metadata: Some(serde_json::json!({"model": "kino-shapes", "prompt": "a secret prompt"})),
        ..Default::default()
    };
    let subject = Subject::new(None, "video_0123");
    prov.write_mp4(path, &video, &opts, &subject).unwrap()
}

/// Offset of the first byte inside the `mdat` payload.
fn mdat_payload(bytes: &[u8]) -> usize {
    let mut at = 0usize;
    while at + 8 <= bytes.len() {
        let size = u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        if &bytes[at + 4..at + 8] == b"mdat" {
            return at + 8;
        }
        assert!(size >= 8, "bad box size at {at}");
        at += size;
    }
    panic!("no mdat box");
}

#[test]
fn local_ca_signs_mp4_that_reads_trusted_valid_and_invalid() {
    let d = tempfile::tempdir().unwrap();
    let prov = open(d.path());
    assert!(
        prov.notices
            .iter()
            .any(|n| n.contains("made a local C2PA signing key")),
        "{:?}",
        prov.notices
    );
    let root = d.path().join("provenance/root-ca.pem");
    assert!(root.is_file());
    // Opened again: the same identity, no new notice.
    let again = open(d.path());
    assert!(!again.notices.iter().any(|n| n.contains("made a local")));

    let out = d.path().join("clip.mp4");
    let stamped = mp4(&prov, &out);
    assert!(stamped.signed);
    let wm_id = stamped.watermark_id.clone().expect("a watermark id");

    let bytes = std::fs::read(&out).unwrap();
    // ffmpeg-level sanity: Kino's own demuxer still reads it, metadata records what was applied.
    let meta = kino_media::read_metadata(&out).unwrap().unwrap();
    assert_eq!(meta["provenance"]["c2pa"]["signed"], true);
    assert_eq!(meta["provenance"]["watermark"]["id"], wm_id.as_str());
    let anchors = prov.trust_anchors().unwrap();
    let v = kino_provenance::verify_bytes(&bytes, &anchors, &prov.watermark_key);
    assert_eq!(v.c2pa.state, C2paState::Trusted, "{:?}", v.c2pa);
    assert!(v.c2pa.ai_generated(), "{:?}", v.c2pa.actions);
    let k = v.c2pa.kino.as_ref().unwrap();
    assert_eq!(k.model.as_deref(), Some("kino-shapes"));
    assert_eq!(
        k.prompt, None,
        "the prompt is only in the manifest when turned on"
    );
    assert_eq!(k.watermark_id.as_deref(), Some(wm_id.as_str()));
    assert!(v.watermark.detected, "{:?}", v.watermark);
    assert_eq!(v.watermark.id.as_deref(), Some(wm_id.as_str()));

    // Without the local root: intact but untrusted.
    let v = kino_provenance::verify_bytes(&bytes, &[], &prov.watermark_key);
    assert_eq!(v.c2pa.state, C2paState::Valid, "{:?}", v.c2pa);

    // One byte of video data changed: invalid, and the reason says the hash does not match.
    let mut bad = bytes.clone();
    let at = mdat_payload(&bad) + 40;
    bad[at] ^= 0x01;
    let v = kino_provenance::verify_bytes(&bad, &anchors, &prov.watermark_key);
    assert_eq!(v.c2pa.state, C2paState::Invalid, "{:?}", v.c2pa);
    assert!(
        v.c2pa.reasons.iter().any(|r| r.contains("mismatch")),
        "{:?}",
        v.c2pa.reasons
    );

    // Another machine's key finds no watermark.
    let other = kino_watermark::Key::generate();
    let v = kino_provenance::verify_bytes(&bytes, &anchors, &other);
    assert!(!v.watermark.detected);
}

#[test]
fn switches_are_recorded_and_images_are_signed() {
    let d = tempfile::tempdir().unwrap();
    let settings = Settings {
        data_dir: Some(d.path().to_path_buf()),
        sign: false,
        watermark: false,
        ..Default::default()
    };
    let prov = Provenance::open(settings).unwrap();
    assert!(prov.notices.iter().any(|n| n.contains("signing is off")));
    assert!(prov.notices.iter().any(|n| n.contains("watermark is off")));
    let out = d.path().join("plain.mp4");
    let s = mp4(&prov, &out);
    assert!(!s.signed);
    assert_eq!(s.watermark_id, None);
    let meta = kino_media::read_metadata(&out).unwrap().unwrap();
    assert_eq!(meta["provenance"]["c2pa"]["signed"], false);
    assert_eq!(meta["provenance"]["watermark"]["embedded"], false);
    let v = kino_provenance::verify_file(&out, &[], &prov.watermark_key).unwrap();
    assert_eq!(v.c2pa.state, C2paState::Absent);
    assert!(!v.watermark.detected);

    // A signing provenance: PNG frames and a GIF are signed, a JPEG thumbnail names its MP4.
    let prov = open(d.path());
    let anchors = prov.trust_anchors().unwrap();
    let video = clip(64, 64, 3);
    let subject = Subject::new(None, "frames");
    let meta = serde_json::json!({"model": "m"});
    let frames = d.path().join("frames");
    prov.write_png_frames(&frames, &video, Some(&meta), &subject)
        .unwrap();
    let first = std::fs::read_dir(&frames)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "png"))
        .unwrap();
    let v = kino_provenance::verify_file(&first, &anchors, &prov.watermark_key).unwrap();
    assert_eq!(v.c2pa.state, C2paState::Trusted, "{:?}", v.c2pa);
    let params: serde_json::Value =
        serde_json::from_slice(&std::fs::read(frames.join("params.json")).unwrap()).unwrap();
    assert_eq!(params["provenance"]["c2pa"]["signed"], true);

    let gif = d.path().join("a.gif");
    prov.write_gif(&gif, &video, &Default::default(), Some(&meta), &subject)
        .unwrap();
    let v = kino_provenance::verify_file(&gif, &anchors, &prov.watermark_key).unwrap();
    assert_eq!(v.c2pa.state, C2paState::Trusted, "{:?}", v.c2pa);

    let mp4_path = d.path().join("v.mp4");
    mp4(&prov, &mp4_path);
    let thumb = d.path().join("thumb.jpg");
    kino_media::write_thumbnail(&thumb, &video, &Default::default()).unwrap();
    assert!(prov
        .sign_derived(&thumb, &mp4_path, Some(&meta), &subject)
        .unwrap());
    let v = kino_provenance::verify_file(&thumb, &anchors, &prov.watermark_key).unwrap();
    assert_eq!(v.c2pa.state, C2paState::Trusted, "{:?}", v.c2pa);
    let from = v.c2pa.kino.unwrap().derived_from.unwrap();
    assert_eq!(from.file, "v.mp4");
    assert_eq!(
        from.sha256,
        kino_provenance::sha256_file(&mp4_path).unwrap()
    );
}

#[test]
fn operator_keys_sign_and_a_bad_key_is_explained() {
    let d = tempfile::tempdir().unwrap();
    // Make a chain with the local CA code, then use it as "the operator's" files.
    let (id, _) = kino_provenance::SigningIdentity::local(&d.path().join("a")).unwrap();
    let key = d.path().join("k.pem");
    let cert = d.path().join("c.pem");
    std::fs::write(&key, &id.key_pem).unwrap();
    std::fs::write(&cert, &id.chain_pem).unwrap();
    let settings = Settings {
        data_dir: Some(d.path().join("b")),
        signing_key: Some(key.clone()),
        signing_cert: Some(cert.clone()),
        ..Default::default()
    };
    let prov = Provenance::open(settings).unwrap();
    assert!(!d.path().join("b/provenance/root-ca.pem").exists());
    let out = d.path().join("o.mp4");
    assert!(mp4(&prov, &out).signed);
    // Its root is not this machine's: valid, untrusted; trusted once given as an anchor.
    let root = std::fs::read_to_string(d.path().join("a/provenance/root-ca.pem")).unwrap();
    let bytes = std::fs::read(&out).unwrap();
    assert_eq!(
        kino_provenance::verify_bytes(&bytes, &[], &prov.watermark_key)
            .c2pa
            .state,
        C2paState::Valid
    );
    assert_eq!(
        kino_provenance::verify_bytes(&bytes, &[root], &prov.watermark_key)
            .c2pa
            .state,
        C2paState::Trusted
    );

    std::fs::write(&cert, b"not a certificate").unwrap();
    let e = kino_provenance::SigningIdentity::from_files(&key, &cert).unwrap_err();
    assert!(e.to_string().contains("no PEM certificate"), "{e}");
}

#[test]
fn processes_starting_together_make_one_local_identity() {
    // Eight openers at once on a fresh data dir (as tests or workers starting together on a new
    // machine): one CA and one watermark key, the same for all.
    let dir = std::env::temp_dir().join(format!("kino-prov-race-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let got: Vec<(String, [u8; 32])> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                s.spawn(|| {
                    let (id, _) = kino_provenance::SigningIdentity::local(&dir).unwrap();
                    let (key, _) = kino_provenance::keys::local_watermark_key(&dir).unwrap();
                    (String::from_utf8(id.chain_pem.clone()).unwrap(), key)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(
        got.iter().all(|g| g == &got[0]),
        "all openers share one identity"
    );
    let root = kino_provenance::keys::local_root(&dir).unwrap();
    assert!(
        got[0].0.contains(root.trim()),
        "the chain ends with the local root"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
