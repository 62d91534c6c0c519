//! The C ABI from C: a small program compiled with the system C compiler
//! against `include/quiver.h`, linked to `libquiver_client.so`, doing IO on
//! a volume of a real cluster (control + three chunkservers).

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::{eventually, start_servers, Control, Tuning};
use quiver_control::{proto, ControlClient};

const TOKEN: &str = "c-abi-token";

/// The committed header is the one cbindgen generates from the source.
#[test]
fn the_committed_header_is_current() {
    let generated = std::fs::read_to_string(concat!(env!("OUT_DIR"), "/quiver.h")).unwrap();
    let committed =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/include/quiver.h")).unwrap();
    assert!(
        generated == committed,
        "client/include/quiver.h is stale: copy {}/quiver.h over it",
        env!("OUT_DIR")
    );
}

/// Where cargo put libquiver_client.so: beside the test binary's directory.
fn library_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    for dir in [deps.parent().unwrap(), deps] {
        if dir.join("libquiver_client.so").exists() {
            return dir.to_owned();
        }
    }
    panic!("libquiver_client.so not found near {}", exe.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_c_program_does_io_through_the_c_abi() {
    let root = tempfile::tempdir().unwrap();
    let program = root.path().join("smoke");
    let lib = library_dir();
    let compiled = Command::new("cc")
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-O1"])
        .arg("-I")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/include"))
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/c/smoke.c"))
        .arg("-o")
        .arg(&program)
        .arg(format!("-L{}", lib.display()))
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .args(["-lquiver_client", "-lpthread"])
        .output()
        .expect("running cc");
    assert!(
        compiled.status.success(),
        "cc failed: {}",
        String::from_utf8_lossy(&compiled.stderr)
    );

    let control = Control::start(root.path(), "control-1", TOKEN, |c| {
        c.pools[0].copysets = 3;
    });
    let tuning = Tuning {
        control: vec![control.addr.to_string()],
        token: Some(TOKEN.into()),
        ..Tuning::default()
    };
    let _servers = start_servers(root.path(), 3, &tuning);
    let ctl = ControlClient::new(&[control.addr.to_string()], TOKEN).unwrap();
    eventually("a healthy cluster", Duration::from_secs(60), || async {
        let s = ctl
            .call(
                "status",
                |mut c| async move { c.status(proto::Empty {}).await },
            )
            .await
            .ok()?;
        (s.health == "HEALTH_OK" && s.copysets_healthy == 3).then_some(())
    })
    .await;
    let request = proto::CreateVolumeRequest {
        name: "cvol".into(),
        size: 1 << 30,
        owner: "c".into(),
        pool: String::new(),
    };
    ctl.call("create", |mut c| {
        let r = request.clone();
        async move { c.create_volume(r).await }
    })
    .await
    .unwrap();

    let run = tokio::task::spawn_blocking(move || {
        Command::new(&program)
            .args([&control.addr.to_string(), TOKEN, "cvol"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success() && stdout.trim() == "ok",
        "the C program failed ({}): {stdout}{}",
        run.status,
        String::from_utf8_lossy(&run.stderr)
    );
}
