//! Runs tests/openai_sdk.py (the official `openai` Python package, pinned) against a started
//! server. The interpreter is $KINO_PYTHON (default `python3`); without the package this test
//! FAILS and says how to install it.

mod common;

use std::process::Command;

const PIP_LINE: &str = "pip install openai==3.57.0";

#[test]
fn official_openai_python_sdk() {
    let python = std::env::var("KINO_PYTHON").unwrap_or_else(|_| "python3".into());
    let probe = Command::new(&python)
        .args(["-c", "import openai; print(openai.__version__)"])
        .output();
    match probe {
        Ok(o) if o.status.success() => {
            eprintln!("openai {}", String::from_utf8_lossy(&o.stdout).trim());
        }
        Ok(o) => panic!(
            "the Python package `openai` is not installed for `{python}`: run `{PIP_LINE}` (e.g. `{python} -m pip install openai==3.57.0`) (or set KINO_PYTHON to an interpreter that has it)\n{}",
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => panic!(
            "cannot run `{python}` ({e}); install Python 3 and `{PIP_LINE}`, or set KINO_PYTHON"
        ),
    }

    let dir = tempfile::tempdir().unwrap();
    // `tiny` answers to sora-2; `tiny-ti2v` (Wan2.2 TI2V form) takes a first image.
    let mut config = common::config_two(dir.path());
    config.poll_after_ms = 100;
    // A free port for the script's webhook receiver.
    let hook_port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap();
    let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    config.webhook = Some(kino_server::webhooks::WebhookConfig {
        url: format!("http://127.0.0.1:{hook_port}/webhooks"),
        secret: secret.into(),
        retry_base: std::time::Duration::from_millis(200),
    });
    let srv = kino_server::ServerHandle::start(config).unwrap();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openai_sdk.py");
    let out = Command::new(&python)
        .arg(&script)
        .env("KINO_BASE_URL", format!("http://{}/v1", srv.addr()))
        .env("OPENAI_API_KEY", "kino-test")
        .env("KINO_WEBHOOK_PORT", hook_port.to_string())
        .env("KINO_WEBHOOK_SECRET", secret)
        .env_remove("OPENAI_BASE_URL")
        .output()
        .expect("run the SDK script");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}\n{stderr}");
    assert!(
        out.status.success(),
        "openai_sdk.py failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(stdout.contains("OK"), "{stdout}");
}
