//! The NBD server over a `MemoryDevice`, in process, against real clients
//! run as child processes (qemu-img, qemu-io, nbdinfo, fio) and against a
//! hand-rolled raw client that misbehaves on purpose.
//!
//! A missing client binary skips its test with a note, except with CI=true,
//! where it fails.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use quiver_client::nbd::proto::*;
use quiver_client::nbd::{serve, Bound, NbdListener};
use quiver_client::{BlockDevice, MemoryDevice};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const EXPORT: &str = "vol";
const MIB: usize = 1 << 20;
/// Child processes are killed after this.
const CHILD_TIMEOUT: Duration = Duration::from_secs(60);
/// Every raw socket operation gives up after this.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .try_init();
}

/// An NBD server on a task; stopped (and awaited) by `stop`.
struct Server {
    bound: Bound,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
    _dir: Option<tempfile::TempDir>,
}

enum Transport {
    Tcp,
    Unix,
}

impl Server {
    async fn start(device: Arc<MemoryDevice>, transport: Transport) -> Server {
        init_tracing();
        let (listener, dir) = match transport {
            Transport::Tcp => (NbdListener::bind_tcp("127.0.0.1:0").await.unwrap(), None),
            Transport::Unix => {
                let dir = tempfile::tempdir().unwrap();
                let listener = NbdListener::bind_unix(dir.path().join("nbd.sock")).unwrap();
                (listener, Some(dir))
            }
        };
        let bound = listener.bound().unwrap();
        let (shutdown, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(device, EXPORT.to_string(), listener, async {
            let _ = stopped.await;
        }));
        Server {
            bound,
            shutdown: Some(shutdown),
            task,
            _dir: dir,
        }
    }

    fn uri(&self) -> String {
        self.bound.uri(EXPORT)
    }

    async fn stop(mut self) {
        let _ = self.shutdown.take().unwrap().send(());
        tokio::time::timeout(IO_TIMEOUT, &mut self.task)
            .await
            .expect("the server stops in time")
            .unwrap();
    }
}

/// Whether all `binaries` are installed; if not, says so (or, under CI,
/// fails).
fn have(binaries: &[&str]) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for binary in binaries {
        if !std::env::split_paths(&path).any(|dir| dir.join(binary).is_file()) {
            let note = format!(
                "skipping: {binary} not installed (.ci/setup installs qemu-utils, libnbd-bin, fio)"
            );
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("{note}; CI=true requires it");
            }
            eprintln!("{note}");
            return false;
        }
    }
    true
}

struct Ran {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Ran {
    fn assert_success(&self, what: &str) -> &Ran {
        assert!(
            self.status.success(),
            "{what} failed ({}):\nstdout:\n{}\nstderr:\n{}",
            self.status,
            self.stdout,
            self.stderr
        );
        self
    }
}

/// Runs a client to completion off the runtime, killing it after
/// `CHILD_TIMEOUT`.
async fn run(program: &str, args: &[&str]) -> Ran {
    let program = program.to_string();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || run_blocking(&program, &args))
        .await
        .unwrap()
}

fn run_blocking(program: &str, args: &[String]) -> Ran {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {program}: {e}"));
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = Vec::new();
            let _ = pipe.read_to_end(&mut text);
            String::from_utf8_lossy(&text).into_owned()
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + CHILD_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{program} {args:?} did not finish within {CHILD_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ran {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

/// Deterministic bytes that do not repeat at block sizes.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

async fn fill(device: &MemoryDevice, byte: u8) {
    let size = device.size() as usize;
    device.write_at(0, &vec![byte; size]).await.unwrap();
}

// ---------------------------------------------------------------- nbdinfo

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_describes_and_lists_the_export() {
    if !have(&["nbdinfo"]) {
        return;
    }
    for transport in [Transport::Tcp, Transport::Unix] {
        let device = Arc::new(MemoryDevice::new(8 * MIB));
        let server = Server::start(device, transport).await;
        let uri = server.uri();

        let info = run("nbdinfo", &[&uri]).await;
        info.assert_success("nbdinfo");
        for expected in [
            "export=\"vol\"",
            "export-size: 8388608",
            "description: Quiver volume",
            "can_multi_conn: true",
            "can_flush: true",
            "can_fua: true",
            "can_trim: true",
            "can_zero: true",
            "is_read_only: false",
            "block_size_minimum: 1",
            "block_size_preferred: 4096",
            "block_size_maximum: 33554432",
        ] {
            assert!(
                info.stdout.contains(expected),
                "{expected:?} missing in:\n{}",
                info.stdout
            );
        }
        let size = run("nbdinfo", &["--size", &uri]).await;
        assert_eq!(
            size.assert_success("nbdinfo --size").stdout.trim(),
            "8388608"
        );

        // The default (empty) name selects the export too.
        let default_uri = server.bound.uri("");
        let size = run("nbdinfo", &["--size", &default_uri]).await;
        assert_eq!(
            size.assert_success("nbdinfo --size of the default export")
                .stdout
                .trim(),
            "8388608"
        );

        let list = run("nbdinfo", &["--list", &default_uri]).await;
        list.assert_success("nbdinfo --list");
        assert!(list.stdout.contains("export=\"vol\""), "{}", list.stdout);

        let unknown = run("nbdinfo", &[&server.bound.uri("nope")]).await;
        assert!(
            !unknown.status.success(),
            "an unknown export must be refused"
        );
        server.stop().await;
    }
}

// ---------------------------------------------------------------- qemu-io

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_writes_then_verifies_patterns() {
    if !have(&["qemu-io"]) {
        return;
    }
    for transport in [Transport::Tcp, Transport::Unix] {
        let device = Arc::new(MemoryDevice::new(4 * MIB));
        fill(&device, 0x11).await;
        let server = Server::start(device.clone(), transport).await;
        // What the device should hold afterwards, built alongside.
        let mut expected = vec![0x11u8; 4 * MIB];
        let mut set =
            |offset: usize, len: usize, byte: u8| expected[offset..offset + len].fill(byte);
        let mut commands: Vec<String> = Vec::new();
        let mut write = |command: &str, offset: usize, len: usize, byte: u8| {
            set(offset, len, byte);
            commands.push(format!("{command} {offset} {len}"));
        };
        write("write -P 0xaa", 0, 64 << 10, 0xaa);
        write("write -P 0xbb", 512, 512, 0xbb);
        // Not even sector aligned: the export's minimum block size is 1.
        write("write -P 0xcc", 4097, 3000, 0xcc);
        write("write -f -P 0xdd", MIB, 256 << 10, 0xdd); // FUA
        write("write -z", MIB + (64 << 10), 128 << 10, 0); // WRITE_ZEROES
                                                           // Several writes in flight at once.
        for i in 0..8 {
            write(
                &format!("aio_write -P {}", 0x30 + i),
                2 * MIB + i * 8192,
                8192,
                0x30 + i as u8,
            );
        }
        commands.push("aio_flush".into());
        commands.push("flush".into());
        let mut reads = vec![
            "read -P 0xaa 0 512".to_string(),
            "read -P 0xbb 512 512".into(),
            "read -P 0xaa 1024 3073".into(),
            "read -P 0xcc 4097 3000".into(),
            "read -P 0xaa 7097 58439".into(),
            "read -P 0x11 65536 65536".into(),
            "read -P 0xdd 1048576 65536".into(),
            "read -P 0 1114112 131072".into(),
            "read -P 0xdd 1245184 65536".into(),
        ];
        for i in 0..8 {
            reads.push(format!("read -P {} {} 8192", 0x30 + i, 2 * MIB + i * 8192));
        }
        commands.extend(reads);

        let mut args = vec!["-f", "raw"];
        for command in &commands {
            args.extend(["-c", command]);
        }
        let uri = server.uri();
        args.push(&uri);
        let ran = run("qemu-io", &args).await;
        ran.assert_success("qemu-io");
        for complaint in ["fail", "error", "Error"] {
            assert!(
                !ran.stdout.contains(complaint) && !ran.stderr.contains(complaint),
                "qemu-io complained:\n{}\n{}",
                ran.stdout,
                ran.stderr
            );
        }
        assert_eq!(ran.stdout.matches("read ").count(), 17, "{}", ran.stdout);
        assert!(
            device.contents() == expected,
            "the device holds what qemu-io wrote"
        );

        // A wrong pattern is noticed: the verification above means something.
        let uri = server.uri();
        let ran = run("qemu-io", &["-f", "raw", "-c", "read -P 0x99 0 512", &uri]).await;
        assert!(
            ran.stdout.contains("Pattern verification failed"),
            "{}",
            ran.stdout
        );
        server.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_export_refuses_writes_but_serves_reads() {
    if !have(&["qemu-io", "nbdinfo"]) {
        return;
    }
    let device = Arc::new(MemoryDevice::read_only(MIB));
    let server = Server::start(device.clone(), Transport::Tcp).await;
    let uri = server.uri();

    let info = run("nbdinfo", &[&uri]).await;
    assert!(
        info.assert_success("nbdinfo")
            .stdout
            .contains("is_read_only: true"),
        "{}",
        info.stdout
    );

    let write = run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x42 0 4096", &uri],
    )
    .await;
    // qemu sees NBD_FLAG_READ_ONLY and refuses to open the image for
    // writing (the server's EPERM is checked with the raw client below).
    assert!(
        !write.status.success(),
        "a write to a read-only export must fail:\n{}{}",
        write.stdout,
        write.stderr
    );
    let read = run(
        "qemu-io",
        &["-r", "-f", "raw", "-c", "read -P 0 0 4096", &uri],
    )
    .await;
    read.assert_success("qemu-io -r");
    assert!(!read.stdout.contains("fail"), "{}", read.stdout);
    assert!(device.contents().iter().all(|&b| b == 0));
    server.stop().await;
}

// ---------------------------------------------------------------- qemu-img

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_convert_copies_an_image_in_and_out() {
    if !have(&["qemu-img"]) {
        return;
    }
    let device = Arc::new(MemoryDevice::new(8 * MIB));
    // Junk the image's zero stretch must overwrite.
    fill(&device, 0x5a).await;
    let server = Server::start(device.clone(), Transport::Tcp).await;
    let dir = tempfile::tempdir().unwrap();
    let mut image = noise(8 * MIB, 7);
    // A zero stretch makes qemu-img write zeroes instead of data.
    image[3 * MIB..4 * MIB].fill(0);
    let source = dir.path().join("source.raw");
    std::fs::write(&source, &image).unwrap();
    let uri = server.uri();

    run(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            path(&source),
            &uri,
        ],
    )
    .await
    .assert_success("qemu-img convert into the export");
    assert!(device.contents() == image, "the device holds the image");

    let copy = dir.path().join("copy.raw");
    run(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "raw", &uri, path(&copy)],
    )
    .await
    .assert_success("qemu-img convert out of the export");
    assert!(
        std::fs::read(&copy).unwrap() == image,
        "the copy equals the image"
    );

    run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", path(&source), &uri],
    )
    .await
    .assert_success("qemu-img compare");
    server.stop().await;
}

fn path(path: &Path) -> &str {
    path.to_str().unwrap()
}

// ---------------------------------------------------------------- fio

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fio_random_writes_verify() {
    if !have(&["fio"]) {
        return;
    }
    for transport in [Transport::Tcp, Transport::Unix] {
        let device = Arc::new(MemoryDevice::new(8 * MIB));
        let server = Server::start(device, transport).await;
        let uri = format!("--uri={}", server.uri());
        // Two jobs, each on its own connection and its own 4 MiB.
        let ran = run(
            "fio",
            &[
                "--name=nbd-verify",
                "--ioengine=nbd",
                &uri,
                "--rw=randwrite",
                "--bs=4k",
                "--iodepth=16",
                "--size=4m",
                "--numjobs=2",
                "--offset_increment=4m",
                "--verify=crc32c",
                "--do_verify=1",
                "--verify_fatal=1",
                // Otherwise fio leaves *-verify.state files in the cwd.
                "--verify_state_save=0",
                "--runtime=30",
                "--output-format=json",
            ],
        )
        .await;
        ran.assert_success("fio");
        let report: serde_json::Value =
            serde_json::from_str(&ran.stdout[ran.stdout.find('{').unwrap_or(0)..])
                .unwrap_or_else(|e| panic!("fio's JSON: {e}\n{}", ran.stdout));
        let jobs = report["jobs"].as_array().expect("fio reports jobs");
        assert_eq!(jobs.len(), 2);
        for job in jobs {
            assert_eq!(job["error"], 0, "{job}");
            assert_eq!(job["write"]["io_bytes"], 4 * MIB, "{job}");
            // The verification phase read everything back.
            assert_eq!(job["read"]["io_bytes"], 4 * MIB, "{job}");
        }
        server.stop().await;
    }
}

// ---------------------------------------------------------------- raw client

/// A client speaking the protocol by hand, to send what real clients never
/// would.
struct RawClient<S> {
    stream: S,
}

async fn within<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(IO_TIMEOUT, future)
        .await
        .unwrap_or_else(|_| panic!("{what}: no progress within {IO_TIMEOUT:?}"))
}

impl RawClient<TcpStream> {
    async fn connect(server: &Server) -> RawClient<TcpStream> {
        let Bound::Tcp(addr) = &server.bound else {
            panic!("not a TCP server")
        };
        RawClient {
            stream: within("connect", TcpStream::connect(addr)).await.unwrap(),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> RawClient<S> {
    async fn send(&mut self, bytes: &[u8]) {
        within("send", self.stream.write_all(bytes)).await.unwrap();
    }

    async fn receive(&mut self, len: usize) -> Vec<u8> {
        let mut bytes = vec![0; len];
        within("receive", self.stream.read_exact(&mut bytes))
            .await
            .unwrap();
        bytes
    }

    async fn greeting(&mut self) {
        let greeting = self.receive(GREETING_LEN).await;
        assert_eq!(&greeting[..16], b"NBDMAGICIHAVEOPT");
    }

    async fn option(&mut self, option: u32, data: &[u8]) {
        let mut bytes = IHAVEOPT.to_be_bytes().to_vec();
        bytes.extend_from_slice(&option.to_be_bytes());
        bytes.extend_from_slice(&(data.len() as u32).to_be_bytes());
        bytes.extend_from_slice(data);
        self.send(&bytes).await;
    }

    /// (reply type, data) of the next option reply.
    async fn option_reply(&mut self) -> (u32, Vec<u8>) {
        let header = self.receive(20).await;
        assert_eq!(header[..8], NBD_OPTION_REPLY_MAGIC.to_be_bytes());
        let reply_type = u32::from_be_bytes(header[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(header[16..20].try_into().unwrap()) as usize;
        (reply_type, self.receive(len).await)
    }

    /// Handshake with NBD_OPT_GO; returns the size and transmission flags.
    async fn negotiate(&mut self, name: &str) -> (u64, u16) {
        self.greeting().await;
        self.send(&(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES).to_be_bytes())
            .await;
        let mut data = (name.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(name.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        self.option(NBD_OPT_GO, &data).await;
        let mut export = None;
        loop {
            match self.option_reply().await {
                (NBD_REP_INFO, info) if info[..2] == NBD_INFO_EXPORT.to_be_bytes() => {
                    let size = u64::from_be_bytes(info[2..10].try_into().unwrap());
                    export = Some((size, u16::from_be_bytes([info[10], info[11]])));
                }
                (NBD_REP_INFO, _) => {}
                (NBD_REP_ACK, _) => return export.expect("NBD_INFO_EXPORT before the ACK"),
                (other, data) => panic!("GO failed: {other:#x} {}", String::from_utf8_lossy(&data)),
            }
        }
    }

    async fn request(&mut self, command: u16, flags: u16, cookie: u64, offset: u64, length: u32) {
        let header = RequestHeader {
            flags,
            command,
            cookie,
            offset,
            length,
        };
        self.send(&header.encode()).await;
    }

    /// (cookie, errno) of the next simple reply (a successful read's data
    /// follows it).
    async fn reply(&mut self) -> (u64, u32) {
        let reply = self.receive(SIMPLE_REPLY_HEADER_LEN).await;
        assert_eq!(reply[..4], NBD_SIMPLE_REPLY_MAGIC.to_be_bytes());
        let errno = u32::from_be_bytes(reply[4..8].try_into().unwrap());
        (u64::from_be_bytes(reply[8..16].try_into().unwrap()), errno)
    }

    async fn read(&mut self, cookie: u64, offset: u64, length: u32) -> Vec<u8> {
        self.request(NBD_CMD_READ, 0, cookie, offset, length).await;
        assert_eq!(self.reply().await, (cookie, 0));
        self.receive(length as usize).await
    }

    /// Waits for the server to close the connection (whatever it sends first
    /// is ignored).
    async fn expect_closed(&mut self, why: &str) {
        let mut sink = [0u8; 4096];
        loop {
            match within(why, self.stream.read(&mut sink)).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_requests_in_flight_are_answered_by_cookie() {
    let device = Arc::new(MemoryDevice::new(MIB));
    let server = Server::start(device.clone(), Transport::Tcp).await;
    let mut client = RawClient::connect(&server).await;
    let (size, flags) = client.negotiate(EXPORT).await;
    assert_eq!(size, MIB as u64);
    assert_ne!(flags & NBD_FLAG_CAN_MULTI_CONN, 0);

    // 64 writes sent back to back before reading any reply.
    let data = noise(MIB, 3);
    let mut pipelined = Vec::new();
    for i in 0..64u64 {
        let chunk = &data[i as usize * 16384..(i as usize + 1) * 16384];
        let header = RequestHeader {
            flags: if i % 8 == 0 { NBD_CMD_FLAG_FUA } else { 0 },
            command: NBD_CMD_WRITE,
            cookie: 1000 + i,
            offset: i * 16384,
            length: 16384,
        };
        pipelined.extend_from_slice(&header.encode());
        pipelined.extend_from_slice(chunk);
    }
    client.send(&pipelined).await;
    let mut cookies = Vec::new();
    for _ in 0..64 {
        let (cookie, errno) = client.reply().await;
        assert_eq!(errno, 0);
        cookies.push(cookie);
    }
    cookies.sort();
    assert_eq!(cookies, (1000..1064).collect::<Vec<_>>());
    client.request(NBD_CMD_FLUSH, 0, 1, 0, 0).await;
    assert_eq!(client.reply().await, (1, 0));
    assert!(device.contents() == data);
    assert_eq!(client.read(2, 4095, 8193).await, &data[4095..4095 + 8193]);

    // Errors are replies, and the stream stays in step after each.
    client
        .request(NBD_CMD_READ, 0, 3, MIB as u64 - 10, 11)
        .await;
    assert_eq!(
        client.reply().await,
        (3, Errno::EINVAL.0),
        "read past the end"
    );
    client.request(NBD_CMD_WRITE, 0, 4, MIB as u64, 5).await;
    client.send(b"12345").await;
    assert_eq!(
        client.reply().await,
        (4, Errno::ENOSPC.0),
        "write past the end"
    );
    client.request(NBD_CMD_BLOCK_STATUS, 0, 5, 0, 4096).await;
    assert_eq!(
        client.reply().await,
        (5, Errno::EINVAL.0),
        "a command never offered"
    );
    client.request(77, 0, 6, 0, 4096).await;
    assert_eq!(
        client.reply().await,
        (6, Errno::EINVAL.0),
        "an unknown command"
    );
    client.request(NBD_CMD_READ, 0, 7, 0, MAX_PAYLOAD + 1).await;
    assert_eq!(
        client.reply().await,
        (7, Errno::EINVAL.0),
        "an oversized read"
    );
    // An oversized write: refused, its payload skipped.
    client
        .request(NBD_CMD_WRITE, 0, 8, 0, MAX_PAYLOAD + 1)
        .await;
    client.send(&vec![0xee; MAX_PAYLOAD as usize + 1]).await;
    assert_eq!(
        client.reply().await,
        (8, Errno::EINVAL.0),
        "an oversized write"
    );
    assert!(
        device.contents() == data,
        "nothing of the refused writes landed"
    );

    client.request(NBD_CMD_TRIM, 0, 9, 0, 4096).await;
    assert_eq!(client.reply().await, (9, 0));
    client
        .request(NBD_CMD_WRITE_ZEROES, NBD_CMD_FLAG_NO_HOLE, 10, 4096, 4096)
        .await;
    assert_eq!(client.reply().await, (10, 0));
    assert!(client.read(11, 0, 8192).await.iter().all(|&b| b == 0));
    client.request(NBD_CMD_READ, 0, 12, 8192, 0).await;
    assert_eq!(client.reply().await, (12, 0), "a zero-length read");

    // DISC: the server answers what is in flight, then closes.
    client.request(NBD_CMD_READ, 0, 13, 0, 4096).await;
    client.request(NBD_CMD_DISC, 0, 14, 0, 0).await;
    assert_eq!(client.reply().await, (13, 0));
    client.receive(4096).await;
    client.expect_closed("closing after NBD_CMD_DISC").await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_export_answers_writes_with_eperm() {
    let device = Arc::new(MemoryDevice::read_only(MIB));
    let server = Server::start(device, Transport::Tcp).await;
    let mut client = RawClient::connect(&server).await;
    let (_, flags) = client.negotiate("").await;
    assert_ne!(flags & NBD_FLAG_READ_ONLY, 0);
    client.request(NBD_CMD_WRITE, 0, 1, 0, 4).await;
    client.send(b"abcd").await;
    assert_eq!(client.reply().await, (1, Errno::EPERM.0));
    client.request(NBD_CMD_WRITE_ZEROES, 0, 2, 0, 4).await;
    assert_eq!(client.reply().await, (2, Errno::EPERM.0));
    client.request(NBD_CMD_TRIM, 0, 3, 0, 4).await;
    assert_eq!(client.reply().await, (3, Errno::EPERM.0));
    assert_eq!(client.read(4, 0, 4).await, [0; 4]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_name_option_with_and_without_zeroes() {
    let device = Arc::new(MemoryDevice::new(MIB));
    let server = Server::start(device, Transport::Tcp).await;
    for (client_flags, reply_len) in [
        (NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES, 10),
        (NBD_FLAG_C_FIXED_NEWSTYLE, 10 + 124),
    ] {
        let mut client = RawClient::connect(&server).await;
        client.greeting().await;
        client.send(&client_flags.to_be_bytes()).await;
        client.option(NBD_OPT_EXPORT_NAME, EXPORT.as_bytes()).await;
        let reply = client.receive(reply_len).await;
        assert_eq!(
            u64::from_be_bytes(reply[..8].try_into().unwrap()),
            MIB as u64
        );
        assert_eq!(client.read(1, 0, 512).await, [0; 512]);
    }
    let mut client = RawClient::connect(&server).await;
    client.greeting().await;
    client.send(&NBD_FLAG_C_FIXED_NEWSTYLE.to_be_bytes()).await;
    client.option(NBD_OPT_EXPORT_NAME, b"nope").await;
    client
        .expect_closed("NBD_OPT_EXPORT_NAME of an unknown export")
        .await;
    server.stop().await;
}

/// Each misbehaviour ends that connection only: a client connected all
/// along and a new one still get served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misbehaving_clients_are_dropped_alone() {
    let device = Arc::new(MemoryDevice::new(MIB));
    let server = Server::start(device.clone(), Transport::Tcp).await;
    let mut bystander = RawClient::connect(&server).await;
    bystander.negotiate(EXPORT).await;

    // Garbage instead of client flags.
    let mut client = RawClient::connect(&server).await;
    client.greeting().await;
    client.send(b"GET / HTTP/1.1\r\nHost: nbd\r\n\r\n").await;
    client.expect_closed("garbage client flags").await;

    // A client without fixed newstyle.
    let mut client = RawClient::connect(&server).await;
    client.greeting().await;
    client.send(&0u32.to_be_bytes()).await;
    client.expect_closed("non-fixed newstyle").await;

    // A wrong option magic.
    let mut client = RawClient::connect(&server).await;
    client.greeting().await;
    client.send(&NBD_FLAG_C_FIXED_NEWSTYLE.to_be_bytes()).await;
    client.send(b"IHAVEOP!\0\0\0\x07\0\0\0\0").await;
    client.expect_closed("wrong option magic").await;

    // An absurd option length.
    let mut client = RawClient::connect(&server).await;
    client.greeting().await;
    client.send(&NBD_FLAG_C_FIXED_NEWSTYLE.to_be_bytes()).await;
    let mut header = IHAVEOPT.to_be_bytes().to_vec();
    header.extend_from_slice(&NBD_OPT_GO.to_be_bytes());
    header.extend_from_slice(&u32::MAX.to_be_bytes());
    client.send(&header).await;
    client.expect_closed("a 4 GiB option").await;

    // Wrong request magic after a good handshake.
    let mut client = RawClient::connect(&server).await;
    client.negotiate(EXPORT).await;
    let mut request = RequestHeader {
        flags: 0,
        command: NBD_CMD_READ,
        cookie: 1,
        offset: 0,
        length: 512,
    }
    .encode();
    request[0] ^= 0xff;
    client.send(&request).await;
    client.expect_closed("wrong request magic").await;

    // A request header cut short.
    let mut client = RawClient::connect(&server).await;
    client.negotiate(EXPORT).await;
    client.send(&request[..10]).await;
    within("shutdown", client.stream.shutdown()).await.unwrap();
    client.expect_closed("a truncated request header").await;

    // A write whose payload never comes in full.
    let mut client = RawClient::connect(&server).await;
    client.negotiate(EXPORT).await;
    client.request(NBD_CMD_WRITE, 0, 1, 0, 4096).await;
    client.send(&[0xab; 100]).await;
    within("shutdown", client.stream.shutdown()).await.unwrap();
    client.expect_closed("a truncated write payload").await;

    // Connecting and leaving at various points of the handshake.
    drop(RawClient::connect(&server).await);
    let mut client = RawClient::connect(&server).await;
    client.greeting().await;
    drop(client);
    let mut client = RawClient::connect(&server).await;
    client.greeting().await;
    client.send(&NBD_FLAG_C_FIXED_NEWSTYLE.to_be_bytes()).await;
    client.send(&IHAVEOPT.to_be_bytes()).await;
    drop(client);
    // Aborting politely.
    let mut client = RawClient::connect(&server).await;
    client.greeting().await;
    client.send(&NBD_FLAG_C_FIXED_NEWSTYLE.to_be_bytes()).await;
    client.option(NBD_OPT_ABORT, b"").await;
    assert_eq!(client.option_reply().await, (NBD_REP_ACK, vec![]));
    client.expect_closed("after NBD_OPT_ABORT").await;

    assert!(
        device.contents().iter().all(|&b| b == 0),
        "nothing was written"
    );
    assert_eq!(bystander.read(1, 0, 512).await, [0; 512]);
    let mut newcomer = RawClient::connect(&server).await;
    newcomer.negotiate(EXPORT).await;
    assert_eq!(newcomer.read(1, 0, 512).await, [0; 512]);
    if have(&["nbdinfo"]) {
        run("nbdinfo", &["--size", &server.uri()])
            .await
            .assert_success("nbdinfo after the bad clients");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_connections_and_removes_the_socket() {
    let device = Arc::new(MemoryDevice::new(MIB));
    let server = Server::start(device, Transport::Unix).await;
    let Bound::Unix(socket) = server.bound.clone() else {
        panic!("not a unix server")
    };
    assert!(
        server.uri().starts_with("nbd+unix:///vol?socket=/"),
        "{}",
        server.uri()
    );
    let mut client = RawClient {
        stream: within("connect", UnixStream::connect(&socket))
            .await
            .unwrap(),
    };
    client.negotiate(EXPORT).await;
    assert_eq!(client.read(1, 0, 16).await, [0; 16]);
    // Another one still in the handshake.
    let mut waiting = RawClient {
        stream: within("connect", UnixStream::connect(&socket))
            .await
            .unwrap(),
    };
    waiting.greeting().await;

    server.stop().await;
    client.expect_closed("transmission at shutdown").await;
    waiting.expect_closed("handshake at shutdown").await;
    assert!(!socket.exists(), "the socket file is removed");
}

#[tokio::test]
async fn unix_listener_replaces_stale_sockets_only() {
    let dir = tempfile::tempdir().unwrap();
    let socket: PathBuf = dir.path().join("nbd.sock");
    // A socket left behind by a process that is gone.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    assert!(socket.exists());
    let listener = NbdListener::bind_unix(&socket).unwrap();
    assert_eq!(listener.bound().unwrap(), Bound::Unix(socket.clone()));
    // A live one is not taken over.
    let error = NbdListener::bind_unix(&socket)
        .err()
        .expect("the socket is in use");
    assert_eq!(error.kind(), std::io::ErrorKind::AddrInUse);
    drop(listener);
    assert!(!socket.exists());
    // Nor is a file that is not a socket.
    std::fs::write(&socket, b"precious").unwrap();
    assert!(NbdListener::bind_unix(&socket).is_err());
    assert_eq!(std::fs::read(&socket).unwrap(), b"precious");
}
