//! Feeds arbitrary bytes, in arbitrary read sizes, to a connection that has
//! completed its hello: whatever arrives, the connection must either accept it
//! or close with a protocol error, never panic or overrun a buffer.

#![no_main]

use std::sync::OnceLock;
use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use quiver_fabric::arena::{Arena, ArenaConfig, SizeClass};
use quiver_fabric::proto::{ConnConfig, Connection};
use quiver_fabric::wire::{decode_header, FrameHeader, FrameKind, Hello, RecvLimits, HEADER_BYTES, HELLO_BYTES};

fn arena() -> Arena {
    static ARENA: OnceLock<Arena> = OnceLock::new();
    ARENA
        .get_or_init(|| {
            Arena::new(&ArenaConfig {
                classes: vec![
                    SizeClass { buf_bytes: 4 << 10, count: 64 },
                    SizeClass { buf_bytes: 64 << 10, count: 64 },
                    SizeClass { buf_bytes: 1 << 20, count: 8 },
                ],
                huge_pages: false,
            })
            .expect("arena")
        })
        .clone()
}

fn hello() -> Vec<u8> {
    let mut h = FrameHeader::new(FrameKind::Hello);
    h.header_len = HELLO_BYTES as u32;
    let mut head = [0u8; HEADER_BYTES];
    h.encode(&mut head);
    let mut body = [0u8; HELLO_BYTES];
    Hello { credits: 8, eager_bytes_max: 8192, message_bytes_max: 1 << 20 }.encode(&mut body);
    [&head[..], &body[..]].concat()
}

fuzz_target!(|data: &[u8]| {
    if data.len() >= HEADER_BYTES {
        let limits = RecvLimits { eager_bytes_max: 8192, message_bytes_max: 1 << 20 };
        let _ = decode_header(data, &limits);
    }
    let Some((&split, rest)) = data.split_first() else { return };
    let read_max = usize::from(split).max(1) * 37;
    let mut conn = Connection::new(arena(), ConnConfig::default());
    let now = Instant::now();
    let mut wire = hello();
    wire.extend_from_slice(rest);
    let mut offset = 0;
    while offset < wire.len() {
        let Some(space) = conn.recv_space() else { return };
        let n = space.len().min(read_max).min(wire.len() - offset);
        space[..n].copy_from_slice(&wire[offset..offset + n]);
        offset += n;
        if conn.handle_recv(now, n).is_err() {
            assert!(conn.is_closed());
            return;
        }
        while conn.poll_event().is_some() {}
    }
});
