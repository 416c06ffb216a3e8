//! An outside reader: `c2pa-python` (PyPI, 0.38.1; the C2PA project's C library) reads a
//! Kino-signed MP4 as valid with the trainedAlgorithmicMedia action, and as invalid once one
//! byte of its video data (inside `mdat`) is changed. The interpreter is $KINO_PYTHON (default
//! `python3`); without the package this test FAILS and says how to install it.

use std::process::Command;

use kino_media::{Fps, Frame, Mp4Options, Video};
use kino_provenance::{Provenance, Settings, Subject};

const PIP_LINE: &str = "pip install c2pa-python==0.38.1";

#[test]
fn c2pa_python_reads_kino_mp4_valid_then_invalid_after_one_byte() {
    let python = std::env::var("KINO_PYTHON").unwrap_or_else(|_| "python3".into());
    let probe = Command::new(&python)
        .args(["-c", "import c2pa; print(c2pa.sdk_version())"])
        .output();
    match probe {
        Ok(o) if o.status.success() => {
            eprintln!("c2pa-python: {}", String::from_utf8_lossy(&o.stdout).trim())
        }
        Ok(o) => panic!(
            "the Python package `c2pa-python` is not installed for `{python}`: run `{PIP_LINE}` \
             (or set KINO_PYTHON to an interpreter that has it)\n{}",
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => panic!("cannot run `{python}` ({e}); install Python 3 and `{PIP_LINE}`"),
    }

    let d = tempfile::tempdir().unwrap();
    let prov = Provenance::open(Settings {
        data_dir: Some(d.path().join("keys")),
        ..Default::default()
    })
    .unwrap();
    let frames = (0..9)
        .map(|t| Frame::from_fn(96, 64, |x, y| [(x * 2 + t) as u8, (y * 3) as u8, 128]).unwrap())
        .collect();
    let video = Video::new(frames, Fps::integer(8).unwrap()).unwrap();
    let good = d.path().join("kino.mp4");
    let opts = Mp4Options {
        metadata: Some(serde_json::json!({"model": "kino-shapes"})),
        ..Default::default()
    };
    let stamped = prov
        .write_mp4(&good, &video, &opts, &Subject::new(None, "c2pa-python"))
        .unwrap();
    assert!(stamped.signed);

    // One byte inside the mdat payload (the H.264 data), flipped.
    let mut bytes = std::fs::read(&good).unwrap();
    let boxes = kino_media::mp4_boxes(&good).unwrap();
    let mdat = boxes
        .iter()
        .find(|b| b.kind == "mdat")
        .expect("an mdat box");
    let at = (mdat.offset + mdat.size / 2) as usize;
    bytes[at] ^= 0x10;
    let bad = d.path().join("changed.mp4");
    std::fs::write(&bad, &bytes).unwrap();

    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/c2pa_python.py");
    let out = Command::new(&python)
        .arg(&script)
        .arg(&good)
        .arg("valid")
        .arg(&bad)
        .arg("invalid")
        .output()
        .expect("run the c2pa-python script");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}\n{stderr}");
    assert!(
        out.status.success(),
        "c2pa_python.py failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("OK"), "{stdout}");
}
