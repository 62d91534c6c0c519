//! The echo service: what `quiver fabric serve` runs and what the fabric's own
//! tests and benchmark call. An RPC whose user header starts with [`ECHO`] gets
//! its payload back (zero-copy: the reply sends the very receive buffer); one
//! starting with [`ACK`] gets an 8-byte acknowledgement.

use quiver_arena::Buf;

use crate::proto::{AmData, Payload};
use crate::worker::AmHandler;

/// The AM id the echo service answers on.
pub const ECHO_AM_ID: u16 = 1;
/// Header byte: answer with the payload.
pub const ECHO: u8 = 0;
/// Header byte: answer with [`ACK_BYTES`] bytes.
pub const ACK: u8 = 1;
/// Bytes of an acknowledgement.
pub const ACK_BYTES: usize = 8;

static ACK_PAYLOAD: [u8; ACK_BYTES] = [0; ACK_BYTES];

/// The echo service's answer to a request with `header` and `payload`: the
/// response header and payload. The one place the service's rule lives, for
/// every driver (the worker's handler, a verbs link's loop).
pub fn response(header: &Buf, payload: Buf) -> (&[u8], Payload<'static>) {
    match header.first() {
        Some(&ACK) => (&[], Payload::Bytes(&ACK_PAYLOAD)),
        _ => (header, Payload::Buf(payload)),
    }
}

/// The handler; install it with `worker.set_am_handler(ECHO_AM_ID, echo_handler())`.
pub fn echo_handler() -> AmHandler {
    Box::new(|ctx, m| {
        let payload = match m.data {
            AmData::Eager(p) | AmData::Pulled(p) => p,
            AmData::Rendezvous(desc) => {
                if let Err(e) = ctx.pull_into_arena(desc) {
                    tracing::warn!(error = %e, "echo: cannot take a rendezvous message");
                }
                return;
            }
            AmData::Aborted => return,
        };
        let Some(reply_to) = m.reply_to else { return };
        let (header, body) = response(&m.header, payload);
        if let Err(e) = ctx.reply(m.am_id, reply_to, header, body) {
            tracing::debug!(error = %e, "echo: reply failed");
        }
    })
}
