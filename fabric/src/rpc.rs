//! Typed RPC on top of active messages.
//!
//! A [`Method`] names an AM id and the rkyv types of its request and response
//! headers; payloads stay raw arena buffers (the bulk bytes never pass through
//! a serializer). Headers are archived into a stack buffer (no allocation) and
//! validated on receipt: a header that does not validate is a typed
//! [`RpcError::BadMessage`] at the caller, and a [`BAD_REQUEST`] remote error
//! when a server gets it.
//!
//! ```ignore
//! struct Read;
//! impl Method for Read { const AM_ID: u16 = 10; type Request = ReadReq; type Response = ReadResp; }
//! worker.set_am_handler(Read::AM_ID, serve::<Read>(|ctx, req, payload| { ... }));
//! let id = call::<Read>(&mut worker, ep, &ReadReq { .. }, Payload::None, timeout)?;
//! let reply = worker.wait_rpc(ep, id)?;
//! let resp: &ArchivedReadResp = response::<Read>(&reply)?;
//! ```

use std::mem::MaybeUninit;
use std::time::Duration;

use quiver_arena::Buf;
use rkyv::api::low::{LowSerializer, LowValidator};
use rkyv::bytecheck::CheckBytes;
use rkyv::rancor::Error as RkyvError;
use rkyv::ser::allocator::SubAllocator;
use rkyv::ser::writer::Buffer;
use rkyv::{Archive, Portable, Serialize};

use crate::proto::{AmData, Payload, RpcError, RpcId, RpcReply};
use crate::wire::AM_HEADER_BYTES_MAX;
use crate::worker::{AmContext, AmHandler, EndpointId, Worker};

/// Remote error code: the request header did not validate.
pub const BAD_REQUEST: u32 = 0xffff_0002;
/// Remote error code: no buffer to receive a rendezvous request into.
pub const NO_MEMORY: u32 = 0xffff_0003;
/// Scratch for serializers that need it (nested types); headers are small.
const SCRATCH_BYTES: usize = 1024;

/// A type that travels as an RPC header.
pub trait WireType:
    Archive + for<'a> Serialize<LowSerializer<Buffer<'a>, SubAllocator<'a>, RkyvError>>
{
    /// Validates `bytes` as an archived `Self`.
    fn decode(bytes: &[u8]) -> Result<&Self::Archived, RkyvError>;
}

impl<T> WireType for T
where
    T: Archive + for<'a> Serialize<LowSerializer<Buffer<'a>, SubAllocator<'a>, RkyvError>>,
    T::Archived: Portable + for<'a> CheckBytes<LowValidator<'a, RkyvError>>,
{
    fn decode(bytes: &[u8]) -> Result<&T::Archived, RkyvError> {
        rkyv::api::low::access::<T::Archived, RkyvError>(bytes)
    }
}

/// One remote procedure: its AM id and header types.
pub trait Method {
    const AM_ID: u16;
    type Request: WireType;
    type Response: WireType;
}

/// Archives `value` into `out`; returns the bytes used.
pub fn encode<T: WireType>(value: &T, out: &mut [u8]) -> Result<usize, RkyvError> {
    let mut scratch = [MaybeUninit::<u8>::uninit(); SCRATCH_BYTES];
    let written = rkyv::api::low::to_bytes_in_with_alloc::<_, _, RkyvError>(
        value,
        Buffer::from(out),
        SubAllocator::new(&mut scratch),
    )?;
    Ok(written.len())
}

/// Calls `M` on `ep`; wait with [`Worker::wait_rpc`] or take the [`crate::Completion`].
pub fn call<M: Method>(
    worker: &mut Worker,
    ep: EndpointId,
    request: &M::Request,
    payload: Payload<'_>,
    timeout: Duration,
) -> Result<RpcId, RpcError> {
    let mut header = [0u8; AM_HEADER_BYTES_MAX];
    let n = encode(request, &mut header).map_err(|e| {
        RpcError::BadMessage(format!(
            "request header does not archive into {AM_HEADER_BYTES_MAX} bytes: {e}"
        ))
    })?;
    Ok(worker.rpc_call(ep, M::AM_ID, &header[..n], payload, timeout)?)
}

/// The validated response header of a reply to `M`.
pub fn response<M: Method>(
    reply: &RpcReply,
) -> Result<&<M::Response as Archive>::Archived, RpcError> {
    M::Response::decode(&reply.header)
        .map_err(|e| RpcError::BadMessage(format!("response header: {e}")))
}

/// The reply a typed handler gives.
pub enum Reply<R> {
    /// A response header and payload.
    Ok(R, Option<Buf>),
    /// A remote error: code and message.
    Err(u32, String),
}

/// An AM handler for `M`: validates the request header, pulls a rendezvous
/// payload into an arena buffer, calls `f` with the archived request and the
/// payload, and sends its reply.
pub fn serve<M, F>(mut f: F) -> AmHandler
where
    M: Method + 'static,
    F: FnMut(
            &mut AmContext<'_>,
            &<M::Request as Archive>::Archived,
            Option<Buf>,
        ) -> Reply<M::Response>
        + Send
        + 'static,
{
    Box::new(move |ctx, m| {
        let Some(reply_to) = m.reply_to else {
            tracing::debug!(
                am_id = M::AM_ID,
                "typed RPC method got a one-way message; dropped"
            );
            return;
        };
        let payload = match m.data {
            AmData::Eager(p) | AmData::Pulled(p) => p,
            AmData::Rendezvous(desc) => {
                if let Err(e) = ctx.pull_into_arena(desc) {
                    let _ = ctx.reply_error(M::AM_ID, reply_to, NO_MEMORY, &e.to_string());
                }
                return;
            }
            AmData::Aborted => return,
        };
        let request = match M::Request::decode(&m.header) {
            Ok(r) => r,
            Err(e) => {
                let _ = ctx.reply_error(
                    M::AM_ID,
                    reply_to,
                    BAD_REQUEST,
                    &format!("request header: {e}"),
                );
                return;
            }
        };
        let payload = (!payload.is_empty()).then_some(payload);
        let sent = match f(ctx, request, payload) {
            Reply::Ok(response, body) => {
                let mut header = [0u8; AM_HEADER_BYTES_MAX];
                match encode(&response, &mut header) {
                    Ok(n) => {
                        let body = body.map_or(Payload::None, Payload::Buf);
                        ctx.reply(M::AM_ID, reply_to, &header[..n], body)
                    }
                    Err(e) => ctx.reply_error(
                        M::AM_ID,
                        reply_to,
                        BAD_REQUEST,
                        &format!("response header: {e}"),
                    ),
                }
            }
            Reply::Err(code, message) => ctx.reply_error(M::AM_ID, reply_to, code, &message),
        };
        if let Err(e) = sent {
            tracing::debug!(error = %e, "reply failed");
        }
    })
}
