//! `quiver playground` as the README runs it (with its own ports and
//! directory): it comes up, serves `demo` over NBD to real clients, answers
//! `quiver status` from beside its directory, stops cleanly on Ctrl-C, and
//! a second run finds the data where the first left it.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::free_ports;

fn have(tool: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{tool} is missing and CI=true requires it (.ci/setup installs qemu-utils, libnbd-bin)"
        );
        eprintln!("skipping: {tool} not installed (.ci/setup installs qemu-utils, libnbd-bin)");
    }
    found
}

struct Playground {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Playground {
    fn start(cwd: &Path, control: u16, nbd: u16) -> Playground {
        let mut child = Command::new(env!("CARGO_BIN_EXE_quiver"))
            .args(["playground", "--bench-seconds", "1", "--size", "1G"])
            .args(["--control", &format!("127.0.0.1:{control}")])
            .args(["--nbd", &format!("127.0.0.1:{nbd}")])
            .current_dir(cwd)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let (tx, lines) = mpsc::channel();
        let out = BufReader::new(child.stdout.take().unwrap());
        std::thread::spawn(move || {
            for line in out.lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Playground {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for a line starting with `prefix`.
    fn wait_for(&mut self, prefix: &str, within: Duration) -> String {
        let deadline = std::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.starts_with(prefix) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no {prefix:?} within {within:?}; output:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Ctrl-C, then a clean exit.
    fn stop(mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        self.wait_for("playground: stopped", Duration::from_secs(60));
        let status = self.child.wait().unwrap();
        assert!(status.success(), "the playground exited with {status}");
    }
}

impl Drop for Playground {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_playground_serves_nbd_clients_and_keeps_its_data() {
    if !have("qemu-img") || !have("nbdinfo") {
        return;
    }
    let cwd = tempfile::tempdir().unwrap();
    // The control's port and the three chunkservers' after it.
    let (control, nbd) = (free_ports(4), free_ports(1));
    let mut pg = Playground::start(cwd.path(), control, nbd);
    let ready = pg.wait_for("ready: ", Duration::from_secs(180));
    let uri = ready.trim_start_matches("ready: ").to_owned();
    assert_eq!(uri, format!("nbd://127.0.0.1:{nbd}/demo"));
    assert!(
        pg.seen
            .iter()
            .any(|l| l.contains("reads verified, none wrong")),
        "{:?}",
        pg.seen
    );
    assert!(pg.seen.iter().any(|l| l.contains("transport: ")));

    let info = run(Command::new("nbdinfo").arg("--list").arg(&uri));
    assert!(
        info.contains("demo") && info.contains("1073741824"),
        "{info}"
    );

    // 64 MiB of random bytes in through qemu-img, and out again.
    let image = cwd.path().join("random.img");
    let back = cwd.path().join("back.img");
    let mut data = vec![0u8; 64 << 20];
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    for word in data.chunks_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        word.copy_from_slice(&state.to_le_bytes());
    }
    std::fs::write(&image, &data).unwrap();
    run(Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&image)
        .arg(&uri));
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(&uri)
        .arg(&back));
    let out = std::fs::read(&back).unwrap();
    assert!(out[..64 << 20] == data[..], "the bytes came back different");

    // The CLI beside the playground's directory finds its token.
    let status = run(Command::new(env!("CARGO_BIN_EXE_quiver"))
        .args(["status", "--control", &format!("127.0.0.1:{control}")])
        .current_dir(cwd.path()));
    assert!(status.contains("HEALTH_OK"), "{status}");
    let list = run(Command::new(env!("CARGO_BIN_EXE_quiver"))
        .args(["volume", "list"])
        .env("QUIVER_CONTROL", format!("127.0.0.1:{control}"))
        .current_dir(cwd.path()));
    assert!(list.contains("demo"), "{list}");
    pg.stop();

    // A second run reuses everything.
    let mut pg = Playground::start(cwd.path(), control, nbd);
    pg.wait_for("playground: reusing the cluster", Duration::from_secs(30));
    pg.wait_for("ready: ", Duration::from_secs(180));
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(&uri)
        .arg(&back));
    let out = std::fs::read(&back).unwrap();
    assert!(
        out[..64 << 20] == data[..],
        "the data did not survive a restart"
    );
    pg.stop();
}
