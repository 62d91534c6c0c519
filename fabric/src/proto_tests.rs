//! The protocol driven without sockets: two connections back to back on a
//! virtual clock, with a byte pipe that can fragment, stall and cut.

use std::io::IoSlice;
use std::time::{Duration, Instant};

use quiver_arena::{Arena, ArenaConfig, Buf, SizeClass};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::wire::{FrameHeader, FrameKind, HEADER_BYTES};

const ECHO: u16 = 9;

/// One arena for every test (mapping and populating one per test is slow).
fn arena() -> Arena {
    static ARENA: std::sync::OnceLock<Arena> = std::sync::OnceLock::new();
    ARENA
        .get_or_init(|| {
            Arena::new(&ArenaConfig {
                classes: vec![
                    SizeClass {
                        buf_bytes: 4 << 10,
                        count: 2048,
                    },
                    SizeClass {
                        buf_bytes: 64 << 10,
                        count: 512,
                    },
                    SizeClass {
                        buf_bytes: 1 << 20,
                        count: 64,
                    },
                ],
                huge_pages: false,
            })
            .unwrap()
        })
        .clone()
}

/// Small thresholds, so modest sizes exercise rendezvous and buffer turnover.
fn test_config() -> ConnConfig {
    ConnConfig {
        eager_bytes_max: 8 << 10,
        rx_chunk_bytes: 64 << 10,
        ..ConnConfig::default()
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Two connections and the pipe between them.
struct Pair {
    arena: Arena,
    a: Connection,
    b: Connection,
    now: Instant,
    /// Largest read the receiving side does at once (fragmentation knob).
    read_max: usize,
    rng: StdRng,
    /// Randomize read sizes in 1..=read_max.
    random_reads: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Side {
    A,
    B,
}

impl Pair {
    fn new(config: ConnConfig) -> Pair {
        let arena = arena();
        let a = Connection::new(arena.clone(), config);
        let b = Connection::new(arena.clone(), config);
        Pair {
            arena,
            a,
            b,
            now: Instant::now(),
            read_max: usize::MAX,
            rng: StdRng::seed_from_u64(1),
            random_reads: false,
        }
    }

    fn conn(&mut self, side: Side) -> &mut Connection {
        match side {
            Side::A => &mut self.a,
            Side::B => &mut self.b,
        }
    }

    /// Takes everything `from` wants to write, as the bytes a socket would carry.
    fn take_wire(&mut self, from: Side) -> Vec<u8> {
        let conn = self.conn(from);
        let mut wire = Vec::new();
        while conn.wants_transmit() {
            let mut iov = [IoSlice::new(&[]); 8];
            let n = conn.transmit_iovecs(&mut iov);
            let mut written = 0;
            for slice in &iov[..n] {
                wire.extend_from_slice(slice);
                written += slice.len();
            }
            conn.handle_transmitted(written);
        }
        wire
    }

    /// Feeds bytes into `to` the way a driver reads them.
    fn feed(&mut self, to: Side, wire: &[u8]) -> Result<(), ProtocolError> {
        let now = self.now;
        let mut offset = 0;
        while offset < wire.len() {
            let want = if self.random_reads {
                self.rng
                    .random_range(1..=self.read_max.min(wire.len() - offset))
            } else {
                self.read_max.min(wire.len() - offset)
            };
            let conn = self.conn(to);
            let space = conn.recv_space().expect("arena has room");
            let n = want.min(space.len());
            space[..n].copy_from_slice(&wire[offset..offset + n]);
            offset += n;
            conn.handle_recv(now, n)?;
        }
        Ok(())
    }

    /// Moves bytes both ways until both sides are quiet; returns protocol errors.
    fn drive(&mut self) -> Result<(), ProtocolError> {
        for _ in 0..100 {
            let ab = self.take_wire(Side::A);
            let ba = self.take_wire(Side::B);
            if ab.is_empty() && ba.is_empty() {
                return Ok(());
            }
            self.feed(Side::B, &ab)?;
            self.feed(Side::A, &ba)?;
        }
        panic!("pair did not settle in 100 rounds");
    }

    fn events(&mut self, side: Side) -> Vec<Event> {
        let conn = self.conn(side);
        std::iter::from_fn(|| conn.poll_event()).collect()
    }

    /// Runs a server on `side`: echoes RPCs, pulls every rendezvous.
    fn serve(&mut self, side: Side) -> Vec<AmMessage> {
        let mut seen = Vec::new();
        for event in self.events(side) {
            if let Event::Am(m) = event {
                let arena = self.arena.clone();
                let conn = self.conn(side);
                match m.data {
                    AmData::Rendezvous(desc) => {
                        let target = arena.alloc(desc.len()).unwrap();
                        conn.pull(desc, target).unwrap();
                    }
                    AmData::Eager(ref payload) | AmData::Pulled(ref payload) => {
                        if let Some(reply_to) = m.reply_to {
                            conn.reply(m.am_id, reply_to, &m.header, Payload::Buf(payload.clone()))
                                .unwrap();
                        }
                        seen.push(m);
                    }
                    AmData::Aborted => seen.push(m),
                }
            }
        }
        seen
    }

    fn established() -> Pair {
        let mut pair = Pair::new(test_config());
        pair.drive().unwrap();
        assert!(matches!(pair.events(Side::A)[..], [Event::Established]));
        assert!(matches!(pair.events(Side::B)[..], [Event::Established]));
        pair
    }

    fn buf(&self, bytes: &[u8]) -> Buf {
        let mut b = self.arena.alloc(bytes.len()).unwrap();
        b.copy_from_slice(bytes);
        b.freeze()
    }
}

fn payload_of(m: &AmMessage) -> &[u8] {
    match &m.data {
        AmData::Eager(b) | AmData::Pulled(b) => b,
        other => panic!("no payload in {other:?}"),
    }
}

#[test]
fn eager_messages_arrive_in_place_with_their_header() {
    let mut pair = Pair::established();
    let small = pattern(64, 1);
    let id = pair
        .a
        .am_send(5, b"header", Payload::Bytes(&small))
        .unwrap();
    let big = pair.buf(&pattern(8000, 2));
    let id2 = pair.a.am_send(6, b"", Payload::Buf(big)).unwrap();
    pair.drive().unwrap();
    let seen = pair.serve(Side::B);
    assert_eq!(seen.len(), 2);
    assert_eq!((seen[0].am_id, &*seen[0].header), (5, &b"header"[..]));
    assert_eq!(payload_of(&seen[0]), &small[..]);
    assert!(matches!(seen[1].data, AmData::Eager(_)));
    assert_eq!(payload_of(&seen[1]), &pattern(8000, 2)[..]);
    let done: Vec<_> = pair
        .events(Side::A)
        .into_iter()
        .filter_map(|e| match e {
            Event::SendDone { id, result } => Some((id, result)),
            _ => None,
        })
        .collect();
    assert_eq!(done, vec![(id, Ok(())), (id2, Ok(()))]);
    assert_eq!(pair.a.stats().eager_sent, 2);
}

#[test]
fn gathered_buffers_arrive_as_one_payload_eager_rendezvous_or_parked() {
    let config = ConnConfig {
        credits: 2,
        ..test_config()
    };
    let mut pair = Pair::new(config);
    pair.drive().unwrap();
    pair.events(Side::A);
    pair.events(Side::B);
    let pieces = |pair: &Pair, sizes: &[usize], seed: u8| -> (Vec<Buf>, Vec<u8>) {
        let parts: Vec<Vec<u8>> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| pattern(n, seed + i as u8))
            .collect();
        (parts.iter().map(|p| pair.buf(p)).collect(), parts.concat())
    };
    // Eager (under 8 KiB, some pieces empty), rendezvous (over), then two
    // more that find no credit and park.
    let sends = [
        (&[100, 0, 3000, 1][..], 1),
        (&[4000, 6000, 9000][..], 2),
        (&[10, 20][..], 3),
        (&[5000, 5000][..], 4),
    ];
    let mut want = std::collections::BTreeMap::new();
    for (sizes, seed) in sends {
        let (bufs, joined) = pieces(&pair, sizes, seed);
        pair.a.am_send(9, &[seed], Payload::Gather(bufs)).unwrap();
        want.insert(seed, joined);
    }
    assert!(pair.a.stats().parked >= 1);
    // (A rendezvous arrives once pulled: after later eager ones.)
    let mut got = std::collections::BTreeMap::new();
    for _ in 0..20 {
        pair.drive().unwrap();
        for m in pair.serve(Side::B) {
            got.insert(m.header[0], payload_of(&m).to_vec());
        }
        if got.len() == want.len() {
            break;
        }
    }
    assert_eq!(got.len(), want.len());
    for (seed, w) in &want {
        let g = &got[seed];
        assert!(
            g == w,
            "message {seed}: {} bytes, wanted {}",
            g.len(),
            w.len()
        );
    }
    assert_eq!(pair.a.stats().rendezvous_sent, 2);
}

#[test]
fn rendezvous_messages_are_pulled_into_the_handlers_buffer() {
    let mut pair = Pair::established();
    pair.random_reads = true;
    pair.read_max = 3000;
    let data = pattern(300_000, 3);
    let id = pair.a.am_send(7, b"rndv", Payload::Bytes(&data)).unwrap();
    pair.drive().unwrap();
    assert!(pair.serve(Side::B).is_empty(), "first the offer");
    pair.drive().unwrap();
    let seen = pair.serve(Side::B);
    assert_eq!(seen.len(), 1);
    assert!(matches!(seen[0].data, AmData::Pulled(_)));
    assert_eq!(&*seen[0].header, b"rndv");
    assert_eq!(payload_of(&seen[0]), &data[..]);
    let a_events = pair.events(Side::A);
    assert!(a_events
        .iter()
        .any(|e| matches!(e, Event::SendDone { id: i, result: Ok(()) } if *i == id)));
    assert_eq!(pair.a.stats().rendezvous_sent, 1);
}

#[test]
fn rendezvous_pulls_complete_in_the_order_the_receiver_chooses() {
    let mut pair = Pair::established();
    let sizes = [20_000, 30_000, 40_000];
    for (i, size) in sizes.iter().enumerate() {
        pair.a
            .am_send(1, &[i as u8], Payload::Bytes(&pattern(*size, i as u8)))
            .unwrap();
    }
    pair.drive().unwrap();
    let mut offers: Vec<_> = pair
        .events(Side::B)
        .into_iter()
        .filter_map(|e| match e {
            Event::Am(AmMessage {
                data: AmData::Rendezvous(d),
                header,
                ..
            }) => Some((header[0], d)),
            _ => None,
        })
        .collect();
    assert_eq!(offers.len(), 3);
    offers.reverse();
    for (_, desc) in offers {
        let target = pair.arena.alloc(desc.len()).unwrap();
        pair.b.pull(desc, target).unwrap();
    }
    pair.drive().unwrap();
    let order: Vec<_> = pair
        .serve(Side::B)
        .iter()
        .map(|m| (m.header[0], payload_of(m).len()))
        .collect();
    assert_eq!(order, vec![(2, 40_000), (1, 30_000), (0, 20_000)]);
}

#[test]
fn a_declined_rendezvous_fails_the_send() {
    let mut pair = Pair::established();
    let id = pair
        .a
        .am_send(1, b"", Payload::Bytes(&pattern(50_000, 0)))
        .unwrap();
    pair.drive().unwrap();
    for event in pair.events(Side::B) {
        if let Event::Am(AmMessage {
            data: AmData::Rendezvous(d),
            ..
        }) = event
        {
            pair.b.reject(d);
        }
    }
    pair.drive().unwrap();
    let events = pair.events(Side::A);
    assert!(
        matches!(events[..], [Event::SendDone { id: i, result: Err(SendError::Rejected) }] if i == id)
    );
}

#[test]
fn rpcs_match_responses_eager_and_rendezvous() {
    let mut pair = Pair::established();
    let now = pair.now;
    let small = pair
        .a
        .rpc_call(
            now,
            ECHO,
            b"s",
            Payload::Bytes(b"ping"),
            Duration::from_secs(1),
        )
        .unwrap();
    let big_data = pattern(200_000, 9);
    let big = pair
        .a
        .rpc_call(
            now,
            ECHO,
            b"b",
            Payload::Bytes(&big_data),
            Duration::from_secs(1),
        )
        .unwrap();
    for _ in 0..4 {
        pair.drive().unwrap();
        pair.serve(Side::B);
    }
    let mut replies = std::collections::HashMap::new();
    for event in pair.events(Side::A) {
        if let Event::RpcDone { id, result } = event {
            replies.insert(id, result.unwrap());
        }
    }
    assert_eq!(&*replies[&small].payload, b"ping");
    assert_eq!(&*replies[&small].header, b"s");
    assert_eq!(&*replies[&big].payload, &big_data[..]);
}

#[test]
fn remote_errors_reach_the_caller_typed() {
    let mut pair = Pair::established();
    let id = pair
        .a
        .rpc_call(pair.now, ECHO, b"", Payload::None, Duration::from_secs(1))
        .unwrap();
    pair.drive().unwrap();
    for event in pair.events(Side::B) {
        if let Event::Am(m) = event {
            pair.b
                .reply_error(m.am_id, m.reply_to.unwrap(), 404, "no such chunk")
                .unwrap();
        }
    }
    pair.drive().unwrap();
    let events = pair.events(Side::A);
    let expected = RpcError::Remote(RemoteError {
        code: 404,
        message: "no such chunk".into(),
    });
    assert!(
        matches!(&events[..], [Event::RpcDone { id: i, result: Err(e) }] if *i == id && *e == expected)
    );
}

#[test]
fn rpcs_time_out_on_the_virtual_clock_and_late_responses_are_dropped() {
    let mut pair = Pair::established();
    let t0 = pair.now;
    let id = pair
        .a
        .rpc_call(
            t0,
            ECHO,
            b"",
            Payload::Bytes(b"x"),
            Duration::from_millis(200),
        )
        .unwrap();
    pair.drive().unwrap();
    let requests = pair.events(Side::B);
    assert_eq!(pair.a.poll_timeout(), Some(t0 + Duration::from_millis(200)));
    pair.a.handle_timeout(t0 + Duration::from_millis(199));
    assert!(pair.events(Side::A).is_empty());
    pair.a.handle_timeout(t0 + Duration::from_millis(200));
    let events = pair.events(Side::A);
    assert!(
        matches!(events[..], [Event::RpcDone { id: i, result: Err(RpcError::Timeout) }] if i == id)
    );
    // The server answers anyway; the caller drops it and the credit still returns.
    for event in requests {
        if let Event::Am(m) = event {
            pair.b
                .reply(m.am_id, m.reply_to.unwrap(), b"", Payload::Bytes(b"late"))
                .unwrap();
        }
    }
    pair.drive().unwrap();
    assert!(pair.events(Side::A).is_empty());
    assert_eq!(pair.a.stats().late_responses, 1);
}

#[test]
fn a_slow_receiver_parks_the_sender_and_is_never_overrun() {
    let config = ConnConfig {
        credits: 4,
        ..test_config()
    };
    let mut pair = Pair::new(config);
    pair.drive().unwrap();
    pair.events(Side::A);
    pair.events(Side::B);
    let ids: Vec<_> = (0..20u8)
        .map(|i| pair.a.am_send(1, &[i], Payload::Bytes(&[i; 100])).unwrap())
        .collect();
    assert_eq!(pair.a.stats().parked, 16);
    // The receiver reads but does not handle: only the credited four arrive.
    pair.drive().unwrap();
    assert_eq!(pair.b.stats().frames_received, 1 + 4);
    let mut received = Vec::new();
    for _ in 0..20 {
        let seen = pair.serve(Side::B);
        received.extend(seen.iter().map(|m| m.header[0]));
        pair.drive().unwrap();
        if received.len() == 20 {
            break;
        }
    }
    assert_eq!(
        received,
        (0..20).collect::<Vec<_>>(),
        "in order, all of them"
    );
    let done = pair
        .events(Side::A)
        .iter()
        .filter(|e| matches!(e, Event::SendDone { result: Ok(()), .. }))
        .count();
    assert_eq!(done, ids.len());
}

#[test]
fn a_peer_that_ignores_credits_is_cut_off() {
    let config = ConnConfig {
        credits: 2,
        ..test_config()
    };
    let mut pair = Pair::new(config);
    pair.drive().unwrap();
    pair.events(Side::B);
    let mut wire = Vec::new();
    for _ in 0..3 {
        let mut h = FrameHeader::new(FrameKind::Eager);
        h.payload_len = 1;
        let mut bytes = [0u8; HEADER_BYTES];
        h.encode(&mut bytes);
        wire.extend_from_slice(&bytes);
        wire.push(0);
    }
    let err = pair.feed(Side::B, &wire).unwrap_err();
    assert_eq!(err, ProtocolError::CreditOverrun(FrameKind::Eager));
    let events = pair.events(Side::B);
    assert!(events
        .iter()
        .any(|e| matches!(e, Event::Closed(CloseReason::Protocol(_)))));
}

#[test]
fn a_disconnect_mid_message_fails_everything_outstanding() {
    let mut pair = Pair::established();
    let send = pair
        .a
        .am_send(1, b"", Payload::Bytes(&pattern(100_000, 0)))
        .unwrap();
    let rpc = pair
        .a
        .rpc_call(pair.now, ECHO, b"", Payload::None, Duration::from_secs(5))
        .unwrap();
    pair.drive().unwrap();
    // Pull the rendezvous; leave the RPC unanswered.
    for event in pair.events(Side::B) {
        if let Event::Am(AmMessage {
            data: AmData::Rendezvous(d),
            ..
        }) = event
        {
            let target = pair.arena.alloc(d.len()).unwrap();
            pair.b.pull(d, target).unwrap();
        }
    }
    // Half the data gets through, then the transport dies.
    let wire = pair.take_wire(Side::B);
    pair.feed(Side::A, &wire).unwrap();
    let data = pair.take_wire(Side::A);
    pair.feed(Side::B, &data[..data.len() / 2]).unwrap();
    pair.a
        .handle_disconnect(CloseReason::Transport("reset".into()));
    pair.b
        .handle_disconnect(CloseReason::Transport("reset".into()));
    let a_events = pair.events(Side::A);
    assert!(a_events.iter().any(
        |e| matches!(e, Event::RpcDone { id, result: Err(RpcError::Disconnected) } if *id == rpc)
    ));
    // The whole payload left A before the cut, so the send completed, once.
    let send_done = a_events
        .iter()
        .filter(|e| matches!(e, Event::SendDone { id, .. } if *id == send));
    assert_eq!(send_done.count(), 1);
    let b_events = pair.events(Side::B);
    assert!(b_events.iter().any(|e| matches!(
        e,
        Event::Am(AmMessage {
            data: AmData::Aborted,
            ..
        })
    )));
    assert!(b_events
        .iter()
        .any(|e| matches!(e, Event::Closed(CloseReason::Transport(_)))));
    assert_eq!(
        pair.a.am_send(1, b"", Payload::None),
        Err(SendError::Disconnected)
    );
}

#[test]
fn garbage_closes_the_connection_with_a_reason_and_tells_the_peer() {
    let mut rng = StdRng::seed_from_u64(42);
    for round in 0..200 {
        let mut pair = Pair::established();
        let mut garbage = vec![0u8; rng.random_range(1..2000)];
        rng.fill(&mut garbage[..]);
        if round % 2 == 0 {
            // Plausible magic and version, so validation goes past the first check.
            garbage[..2].copy_from_slice(&crate::wire::MAGIC.to_le_bytes());
            garbage[2] = crate::wire::VERSION;
        }
        match pair.feed(Side::B, &garbage) {
            Err(_) => {
                assert!(pair.b.is_closed());
                let wire = pair.take_wire(Side::B);
                pair.feed(Side::A, &wire).unwrap();
                let events = pair.events(Side::A);
                assert!(events
                    .iter()
                    .any(|e| matches!(e, Event::Closed(CloseReason::Peer(_)))));
            }
            // A prefix of a frame that never completes is not (yet) an error.
            Ok(()) => assert!(!pair.b.is_closed() || round % 2 == 0),
        }
    }
}

#[test]
fn frames_before_hello_and_second_hellos_are_refused() {
    let mut pair = Pair::new(test_config());
    let mut bytes = [0u8; HEADER_BYTES];
    FrameHeader::new(FrameKind::Credit).encode(&mut bytes);
    assert_eq!(
        pair.feed(Side::B, &bytes),
        Err(ProtocolError::BeforeHello(FrameKind::Credit))
    );

    let mut pair = Pair::new(test_config());
    let hello = pair.take_wire(Side::A);
    pair.feed(Side::B, &hello).unwrap();
    assert_eq!(
        pair.feed(Side::B, &hello),
        Err(ProtocolError::DuplicateHello)
    );
}

/// Random operation sequences: every send and RPC completes exactly once, and
/// every byte arrives intact, whatever the fragmentation.
#[test]
fn random_operation_sequences_keep_their_invariants() {
    for seed in 0..30 {
        let mut rng = StdRng::seed_from_u64(seed);
        let config = ConnConfig {
            credits: rng.random_range(2..8),
            ..test_config()
        };
        let mut pair = Pair::new(config);
        pair.random_reads = true;
        pair.read_max = rng.random_range(1..70_000);
        pair.rng = StdRng::seed_from_u64(seed + 1000);
        let mut sends = std::collections::HashMap::new();
        let mut rpcs = std::collections::HashMap::new();
        for step in 0..60 {
            let size = match rng.random_range(0..4) {
                0 => 0,
                1 => rng.random_range(1..600),
                2 => rng.random_range(600..9000),
                _ => rng.random_range(9000..300_000),
            };
            let data = pattern(size, step as u8);
            if rng.random_bool(0.5) {
                let id = pair
                    .a
                    .am_send(1, &[step as u8], Payload::Bytes(&data))
                    .unwrap();
                sends.insert(id, false);
            } else {
                let id = pair
                    .a
                    .rpc_call(
                        pair.now,
                        ECHO,
                        &[step as u8],
                        Payload::Bytes(&data),
                        Duration::from_secs(60),
                    )
                    .unwrap();
                rpcs.insert(id, data);
            }
            if rng.random_bool(0.3) {
                pair.drive().unwrap();
                for m in pair.serve(Side::B) {
                    let step = m.header[0];
                    assert_eq!(payload_of(&m), &pattern(payload_of(&m).len(), step)[..]);
                }
            }
            for event in pair.events(Side::A) {
                match event {
                    Event::SendDone { id, result } => {
                        result.unwrap();
                        assert_eq!(sends.insert(id, true), Some(false), "completed twice");
                    }
                    Event::RpcDone { id, result } => {
                        let expected = rpcs.remove(&id).expect("completed twice");
                        assert_eq!(&*result.unwrap().payload, &expected[..]);
                    }
                    Event::Established => {}
                    other => panic!("unexpected {other:?}"),
                }
            }
        }
        for _ in 0..20 {
            pair.drive().unwrap();
            pair.serve(Side::B);
            for event in pair.events(Side::A) {
                match event {
                    Event::SendDone { id, result } => {
                        result.unwrap();
                        assert_eq!(sends.insert(id, true), Some(false));
                    }
                    Event::RpcDone { id, result } => {
                        let expected = rpcs.remove(&id).expect("completed twice");
                        assert_eq!(&*result.unwrap().payload, &expected[..]);
                    }
                    Event::Established => {}
                    other => panic!("unexpected {other:?}"),
                }
            }
        }
        assert!(
            sends.values().all(|done| *done),
            "seed {seed}: a send never completed"
        );
        assert!(
            rpcs.is_empty(),
            "seed {seed}: {} RPCs never completed",
            rpcs.len()
        );
    }
}

/// A connected pair doing rendezvous by remote read (as over RDMA).
fn remote_read_pair() -> Pair {
    arena().set_rdma_keys(7, 9);
    let mut pair = Pair::new(ConnConfig {
        remote_read: true,
        ..test_config()
    });
    pair.drive().unwrap();
    pair.events(Side::A);
    pair.events(Side::B);
    pair
}

/// Serves `side`'s read requests by copying from the peer's memory, as an RDMA
/// READ would; returns the other events.
fn serve_reads(pair: &mut Pair, side: Side, ok: bool) -> Vec<Event> {
    let mut others = Vec::new();
    for event in pair.events(side) {
        match event {
            Event::ReadRequest {
                slot,
                remote_addr,
                rkey,
                len,
            } => {
                assert_eq!(rkey, 9, "the sender's remote key travels in the Rts");
                let conn = pair.conn(side);
                let target = conn.read_target(slot).expect("a live read target");
                assert_eq!(target.len(), len);
                // SAFETY: both connections live in this process; the sender keeps
                // the payload buffer until our Fin.
                let source = unsafe { std::slice::from_raw_parts(remote_addr as *const u8, len) };
                target.copy_from_slice(source);
                conn.handle_read_done(slot, ok);
            }
            other => others.push(other),
        }
    }
    // What the reads delivered.
    others.extend(pair.events(side));
    others
}

#[test]
fn remote_read_rendezvous_delivers_and_releases_the_sender_after_fin() {
    let mut pair = remote_read_pair();
    let data = pattern(100_000, 4);
    let id = pair.a.am_send(3, b"rr", Payload::Bytes(&data)).unwrap();
    pair.drive().unwrap();
    let offers = pair.events(Side::B);
    let [Event::Am(AmMessage {
        data: AmData::Rendezvous(desc),
        ..
    })] = &offers[..]
    else {
        panic!("expected one offer, got {offers:?}");
    };
    assert_eq!(desc.len(), 100_000);
    let Event::Am(AmMessage {
        data: AmData::Rendezvous(desc),
        ..
    }) = offers.into_iter().next().unwrap()
    else {
        unreachable!()
    };
    let target = pair.arena.alloc(desc.len()).unwrap();
    pair.b.pull(desc, target).unwrap();
    assert!(!pair.b.wants_transmit(), "remote read sends no Cts");
    // The sender still holds its buffer: no SendDone before Fin.
    assert!(pair.events(Side::A).is_empty());
    let delivered = serve_reads(&mut pair, Side::B, true);
    let [Event::Am(AmMessage {
        data: AmData::Pulled(payload),
        header,
        ..
    })] = &delivered[..]
    else {
        panic!("expected the pulled message, got {delivered:?}");
    };
    assert_eq!(&**header, b"rr");
    assert_eq!(&payload[..], &data[..]);
    pair.drive().unwrap();
    let a_events = pair.events(Side::A);
    assert!(matches!(a_events[..], [Event::SendDone { id: i, result: Ok(()) }] if i == id));
    assert_eq!(pair.a.stats().rendezvous_sent, 1);
}

#[test]
fn remote_read_rpc_responses_are_read_for_the_caller() {
    let mut pair = remote_read_pair();
    let id = pair
        .a
        .rpc_call(
            pair.now,
            ECHO,
            b"",
            Payload::Bytes(b"give"),
            Duration::from_secs(1),
        )
        .unwrap();
    pair.drive().unwrap();
    let big = pair.buf(&pattern(200_000, 5));
    for event in pair.events(Side::B) {
        if let Event::Am(m) = event {
            pair.b
                .reply(
                    m.am_id,
                    m.reply_to.unwrap(),
                    b"h",
                    Payload::Buf(big.clone()),
                )
                .unwrap();
        }
    }
    pair.drive().unwrap();
    let done = serve_reads(&mut pair, Side::A, true);
    let [Event::RpcDone {
        id: i,
        result: Ok(reply),
    }] = &done[..]
    else {
        panic!("{done:?}")
    };
    assert_eq!(*i, id);
    assert_eq!(&reply.payload[..], &big[..]);
    pair.drive().unwrap();
    // B's reply buffer was released by A's Fin (no event: replies have no SendDone).
    assert!(pair.events(Side::B).is_empty());
}

#[test]
fn a_failed_remote_read_aborts_the_message_and_still_frees_the_sender() {
    let mut pair = remote_read_pair();
    let id = pair
        .a
        .am_send(3, b"", Payload::Bytes(&pattern(50_000, 6)))
        .unwrap();
    pair.drive().unwrap();
    for event in pair.events(Side::B) {
        if let Event::Am(AmMessage {
            data: AmData::Rendezvous(desc),
            ..
        }) = event
        {
            let target = pair.arena.alloc(desc.len()).unwrap();
            pair.b.pull(desc, target).unwrap();
        }
    }
    let delivered = serve_reads(&mut pair, Side::B, false);
    assert!(matches!(
        delivered[..],
        [Event::Am(AmMessage {
            data: AmData::Aborted,
            ..
        })]
    ));
    pair.drive().unwrap();
    assert!(
        matches!(pair.events(Side::A)[..], [Event::SendDone { id: i, result: Ok(()) }] if i == id)
    );
}

#[test]
fn a_read_in_flight_at_a_disconnect_keeps_its_target_until_done() {
    let mut pair = remote_read_pair();
    pair.a
        .am_send(3, b"", Payload::Bytes(&pattern(50_000, 7)))
        .unwrap();
    pair.drive().unwrap();
    for event in pair.events(Side::B) {
        if let Event::Am(AmMessage {
            data: AmData::Rendezvous(desc),
            ..
        }) = event
        {
            let target = pair.arena.alloc(desc.len()).unwrap();
            pair.b.pull(desc, target).unwrap();
        }
    }
    let slot = match pair.b.poll_event() {
        Some(Event::ReadRequest { slot, .. }) => slot,
        other => panic!("expected a read request, got {other:?}"),
    };
    pair.b
        .handle_disconnect(CloseReason::Transport("cut".into()));
    let events = pair.events(Side::B);
    assert!(events.iter().any(|e| matches!(
        e,
        Event::Am(AmMessage {
            data: AmData::Aborted,
            ..
        })
    )));
    assert!(
        pair.b.read_target(slot).is_some(),
        "the NIC may still write into it"
    );
    pair.b.handle_read_done(slot, false);
    assert!(pair.b.read_target(slot).is_none());
}

#[test]
fn a_remote_read_rts_on_a_plain_connection_is_refused() {
    let mut pair = Pair::established();
    let mut h = FrameHeader::new(FrameKind::Rts);
    h.flags = crate::wire::flags::RTS_REMOTE_READ;
    h.payload_len = 100_000;
    let mut bytes = [0u8; HEADER_BYTES];
    h.encode(&mut bytes);
    let err = pair.feed(Side::B, &bytes).unwrap_err();
    assert_eq!(err, ProtocolError::RemoteReadUnsupported(FrameKind::Rts));
}

#[test]
fn a_send_that_finds_no_buffer_keeps_its_credit() {
    // Own arena: a tiny 4 KiB class, a 64 KiB class for receive buffers.
    let arena = small_arena(2, 16);
    let config = ConnConfig {
        eager_bytes_max: 8 << 10,
        rx_chunk_bytes: 64 << 10,
        credits: 4,
        ..ConnConfig::default()
    };
    let mut pair = established_on(&arena, config);
    assert_eq!(pair.a.send_credits, 4);
    // The 4 KiB class runs out (held elsewhere, e.g. queued to a slow peer).
    let held: Vec<_> = (0..2).map(|_| arena.alloc(4096).unwrap()).collect();
    for _ in 0..4 {
        let r = pair.a.am_send(ECHO, b"h", Payload::Bytes(&[7u8; 2000]));
        assert!(matches!(r, Err(SendError::NoMemory(_))), "{r:?}");
    }
    drop(held);
    pair.drive().unwrap();
    assert_eq!(pair.a.send_credits, 4, "no credit lost to the failed sends");
    // Memory is back, the peer is healthy: a tiny message should flow.
    pair.a.am_send(ECHO, b"h", Payload::Bytes(b"x")).unwrap();
    pair.drive().unwrap();
    let got = pair.serve(Side::B);
    assert_eq!(
        got.len(),
        1,
        "the message never left: credits {} parked {}",
        pair.a.send_credits,
        pair.a.parked.len()
    );
}

/// A peer that stops reading, and a caller that retries after each timeout
/// (as openraft does): the parked copies of timed-out requests are let go.
#[test]
fn a_timed_out_rpc_still_parked_lets_its_buffer_go() {
    let arena = small_arena(64, 64);
    let config = ConnConfig {
        eager_bytes_max: 8 << 10,
        rx_chunk_bytes: 64 << 10,
        credits: 2,
        ..ConnConfig::default()
    };
    let mut pair = established_on(&arena, config);
    let free64 = |a: &Arena| {
        let b = a.alloc(60 << 10).unwrap().freeze();
        b.class_usage().free + 1
    };
    let before = free64(&arena);
    // The peer stops handling frames (its credits never come back).
    let now = pair.now;
    for _ in 0..2 {
        pair.a
            .rpc_call(
                now,
                ECHO,
                b"h",
                Payload::Bytes(&[1u8; 20_000]),
                Duration::from_millis(100),
            )
            .unwrap();
    }
    let wire = pair.take_wire(Side::A);
    pair.feed(Side::B, &wire).unwrap(); // B never polls its events
                                        // Retries, as openraft makes them after each timeout.
    for i in 0..10 {
        let t = now + Duration::from_millis(200 * (i + 1));
        pair.a
            .rpc_call(
                t,
                ECHO,
                b"h",
                Payload::Bytes(&[1u8; 20_000]),
                Duration::from_millis(100),
            )
            .unwrap();
        pair.a.handle_timeout(t + Duration::from_millis(150));
    }
    let _ = pair.events(Side::A);
    // The first two went out as rendezvous offers (their payloads wait for
    // the peer's pull); the ten retries found no credit and parked.
    assert_eq!(
        before - free64(&arena),
        2,
        "parked {}, outstanding RPCs {}",
        pair.a.parked.len(),
        pair.a.rpcs.len()
    );
}

/// An established pair whose connections take their buffers from `arena`.
/// An arena of `small` 4 KiB and `large` 64 KiB buffers.
fn small_arena(small: usize, large: usize) -> Arena {
    Arena::new(&ArenaConfig {
        classes: vec![
            SizeClass {
                buf_bytes: 4 << 10,
                count: small,
            },
            SizeClass {
                buf_bytes: 64 << 10,
                count: large,
            },
        ],
        huge_pages: false,
    })
    .unwrap()
}

fn established_on(arena: &Arena, config: ConnConfig) -> Pair {
    let mut pair = Pair::new(config);
    pair.arena = arena.clone();
    pair.a = Connection::new(arena.clone(), config);
    pair.b = Connection::new(arena.clone(), config);
    pair.drive().unwrap();
    let _ = pair.events(Side::A);
    let _ = pair.events(Side::B);
    pair
}
