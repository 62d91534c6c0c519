//! The echo service: what `quiver fabric serve` runs and what the fabric's own
//! tests and benchmark call. An RPC whose user header starts with [`ECHO`] gets
//! its payload back (zero-copy: the reply sends the very receive buffer); one
//! starting with [`ACK`] gets an 8-byte acknowledgement.

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
        let result = match m.header.first() {
            Some(&ACK) => ctx.reply(m.am_id, reply_to, &[], Payload::Bytes(&[0u8; ACK_BYTES])),
            _ => ctx.reply(m.am_id, reply_to, &m.header, Payload::Buf(payload)),
        };
        if let Err(e) = result {
            tracing::debug!(error = %e, "echo: reply failed");
        }
    })
}
