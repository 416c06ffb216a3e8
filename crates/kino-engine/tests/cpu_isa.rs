//! `KINO_CPU_ISA` caps the CPU kernels' dispatch: this test runs itself in child processes with
//! the variable set and checks the ISA and GEMM kernel each child chose (the choice is made once
//! per process, so each value needs its own process).

use std::process::Command;

use kino_engine::kernels::{self, Isa};

const CHILD: &str = "KINO_TEST_EXPECT_ISA";

#[test]
fn kino_cpu_isa_is_honoured() {
    if let Ok(expect) = std::env::var(CHILD) {
        // In the child: the variable was read at the first call.
        let isa = kernels::isa();
        assert_eq!(
            isa.name(),
            expect,
            "KINO_CPU_ISA={:?}",
            std::env::var("KINO_CPU_ISA")
        );
        assert!(isa.supported());
        let kernel = kernels::packed_gemm().map(|k| k.name);
        match isa {
            Isa::Portable => assert_eq!(kernel, None),
            _ => assert_eq!(kernel, Some(isa.name())),
        }
        return;
    }
    let best = Isa::best();
    let mut cases: Vec<(&str, Isa, bool)> = Isa::ALL
        .into_iter()
        .map(|i| {
            if i.supported() {
                (i.name(), i, false)
            } else {
                (i.name(), best, true) // refused with a warning: the best the CPU has runs
            }
        })
        .collect();
    cases.push(("no-such-isa", best, true));
    for (value, expect, warns) in cases {
        let out = Command::new(std::env::current_exe().expect("test binary"))
            .args([
                "--exact",
                "kino_cpu_isa_is_honoured",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("KINO_CPU_ISA", value)
            .env(CHILD, expect.name())
            .output()
            .expect("running the test binary");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "KINO_CPU_ISA={value}: expected {expect}\n{stdout}\n{stderr}"
        );
        assert!(stdout.contains("1 passed"), "child ran no test: {stdout}");
        assert_eq!(
            stderr.contains("warning: KINO_CPU_ISA="),
            warns,
            "KINO_CPU_ISA={value}: {stderr}"
        );
        println!(
            "KINO_CPU_ISA={value} → {expect}{}",
            if warns { " (warned)" } else { "" }
        );
    }
}
