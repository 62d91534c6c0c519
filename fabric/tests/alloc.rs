//! The data path allocates nothing per message once warm: RPCs over loopback
//! (eager, and rendezvous both ways) counted with a counting global allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use quiver_fabric::arena::{Arena, ArenaConfig, SizeClass};
use quiver_fabric::echo::{echo_handler, ECHO, ECHO_AM_ID};
use quiver_fabric::{Payload, Worker, WorkerConfig};

struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: defers to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded unchanged.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn arena() -> Arena {
    Arena::new(&ArenaConfig {
        classes: vec![
            SizeClass {
                buf_bytes: 4 << 10,
                count: 256,
            },
            SizeClass {
                buf_bytes: 256 << 10,
                count: 64,
            },
            SizeClass {
                buf_bytes: 1 << 20,
                count: 16,
            },
        ],
        huge_pages: false,
    })
    .unwrap()
}

#[test]
fn warm_rpcs_allocate_nothing() {
    let (tx, rx) = mpsc::channel();
    let stop = Arc::new(AtomicBool::new(false));
    let stop_thread = Arc::clone(&stop);
    let server = std::thread::spawn(move || {
        let mut worker = Worker::new(arena(), WorkerConfig::default()).unwrap();
        worker.set_am_handler(ECHO_AM_ID, echo_handler());
        let addr = worker.listen("127.0.0.1:0".parse().unwrap()).unwrap();
        tx.send((addr, worker.waker())).unwrap();
        worker.run(|| stop_thread.load(Ordering::Acquire));
    });
    let (addr, waker) = rx.recv().unwrap();
    let mut worker = Worker::new(arena(), WorkerConfig::default()).unwrap();
    let ep = worker.connect_wait(addr, Duration::from_secs(5)).unwrap();
    let timeout = Duration::from_secs(10);
    for size in [64usize, 32 << 10, 300 << 10] {
        let mut payload = worker.arena().alloc(size).unwrap();
        payload.fill(7);
        let payload = payload.freeze();
        let round = |n: usize, worker: &mut Worker| {
            for _ in 0..n {
                let reply = worker
                    .rpc_call_wait(
                        ep,
                        ECHO_AM_ID,
                        &[ECHO],
                        Payload::Buf(payload.clone()),
                        timeout,
                    )
                    .unwrap();
                assert_eq!(reply.payload.len(), size);
            }
        };
        round(200, &mut worker); // warm: queues and tables reach their sizes
        let before = ALLOCATIONS.load(Ordering::Relaxed);
        round(500, &mut worker);
        let allocations = ALLOCATIONS.load(Ordering::Relaxed) - before;
        eprintln!("{size}-byte echo: {allocations} allocations in 500 round trips (both ends)");
        assert!(
            allocations <= 5,
            "{size}-byte echo allocated {allocations} times in 500 round trips"
        );
    }
    stop.store(true, Ordering::Release);
    waker.wake();
    server.join().unwrap();
}
