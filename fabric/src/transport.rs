//! Choosing an endpoint's transport: the out-of-band exchange on a new TCP
//! connection that decides between verbs RDMA and TCP, as a sans-IO state
//! machine (the worker moves its bytes).
//!
//! Both sides send one [`OFFER_BYTES`] offer at once (no extra round trip):
//! version, and, when the side can do RDMA, its queue pair number, starting
//! PSN, GID, MTU and memory key. If both offered RDMA, each connects its queue
//! pair to the other's and sends one ready byte (`R`, or `F` when its queue
//! pair could not be connected); the endpoint runs over verbs only if both
//! sent `R`, so neither side sends on a queue pair the other has not readied.
//! Otherwise the connection's frame stream follows on the same TCP socket,
//! right after the offers (or the ready bytes). A side configured for verbs
//! only refuses a peer that cannot do RDMA, and says why.
//!
//! On a verbs endpoint the TCP socket stays open and silent: its end tells a
//! peer's death faster than RDMA retries do.

use std::fmt;

/// Bytes of an offer on the wire.
pub const OFFER_BYTES: usize = 64;
const OFFER_MAGIC: [u8; 4] = *b"QVTO";
const OFFER_VERSION: u16 = 1;
const FLAG_VERBS: u16 = 1;
const READY_OK: u8 = b'R';
const READY_FALLBACK: u8 = b'F';

/// Which transport endpoints use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TransportChoice {
    /// TCP only: no RDMA device is opened.
    Tcp,
    /// Verbs only: fail where no device answers, refuse peers without RDMA.
    Verbs,
    /// Verbs where a device is present and the peer agrees, TCP otherwise.
    #[default]
    Auto,
}

impl fmt::Display for TransportChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TransportChoice::Tcp => "tcp",
            TransportChoice::Verbs => "verbs",
            TransportChoice::Auto => "auto",
        })
    }
}

/// What one side needs of the other to connect an RC queue pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerbsOffer {
    pub qpn: u32,
    pub psn: u32,
    pub gid: [u8; 16],
    /// Active path MTU in bytes (256 to 4096); both sides use the smaller.
    pub mtu: u32,
    /// The remote key of the side's registered arena.
    pub rkey: u32,
}

/// One side's offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offer {
    pub verbs: Option<VerbsOffer>,
}

impl Offer {
    pub fn encode(&self) -> [u8; OFFER_BYTES] {
        let mut b = [0u8; OFFER_BYTES];
        b[0..4].copy_from_slice(&OFFER_MAGIC);
        b[4..6].copy_from_slice(&OFFER_VERSION.to_le_bytes());
        if let Some(v) = self.verbs {
            b[6..8].copy_from_slice(&FLAG_VERBS.to_le_bytes());
            b[8..12].copy_from_slice(&v.qpn.to_le_bytes());
            b[12..16].copy_from_slice(&v.psn.to_le_bytes());
            b[16..32].copy_from_slice(&v.gid);
            b[32..36].copy_from_slice(&v.mtu.to_le_bytes());
            b[36..40].copy_from_slice(&v.rkey.to_le_bytes());
        }
        b
    }

    pub fn decode(b: &[u8; OFFER_BYTES]) -> Result<Offer, NegotiationError> {
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        if b[0..4] != OFFER_MAGIC {
            return Err(NegotiationError::BadOffer(
                "not a Quiver fabric peer (bad magic)".into(),
            ));
        }
        let version = u16_at(4);
        if version != OFFER_VERSION {
            return Err(NegotiationError::BadOffer(format!(
                "transport offer version {version}, this side speaks {OFFER_VERSION}"
            )));
        }
        let flags = u16_at(6);
        if flags & !FLAG_VERBS != 0 || b[40..].iter().any(|&x| x != 0) {
            return Err(NegotiationError::BadOffer(
                "unknown flags or non-zero reserved bytes".into(),
            ));
        }
        if flags & FLAG_VERBS == 0 {
            if b[8..40].iter().any(|&x| x != 0) {
                return Err(NegotiationError::BadOffer(
                    "queue pair fields without the verbs flag".into(),
                ));
            }
            return Ok(Offer { verbs: None });
        }
        let mtu = u32_at(32);
        if !(256..=4096).contains(&mtu) || !mtu.is_power_of_two() {
            return Err(NegotiationError::BadOffer(format!("path MTU {mtu}")));
        }
        let qpn = u32_at(8);
        let psn = u32_at(12);
        if qpn == 0 || qpn >= 1 << 24 || psn >= 1 << 24 {
            return Err(NegotiationError::BadOffer(format!(
                "queue pair number {qpn} or PSN {psn} out of range"
            )));
        }
        let mut gid = [0u8; 16];
        gid.copy_from_slice(&b[16..32]);
        Ok(Offer {
            verbs: Some(VerbsOffer {
                qpn,
                psn,
                gid,
                mtu,
                rkey: u32_at(36),
            }),
        })
    }
}

/// A peer that broke the exchange; its connection is closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NegotiationError {
    #[error("bad transport offer: {0}")]
    BadOffer(String),
    #[error("bad ready byte {0:#04x} in the transport exchange")]
    BadReady(u8),
}

/// How the exchange ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Run over verbs, connected to this peer queue pair.
    Verbs(VerbsOffer),
    /// Run over TCP, for this reason.
    Tcp(String),
    /// Close the endpoint: this side requires verbs and cannot have it.
    Refused(String),
}

/// What the driver must do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Move bytes ([`Negotiation::to_send`], [`Negotiation::recv_space`]).
    Wait,
    /// Connect the local queue pair to this peer and report with
    /// [`Negotiation::qp_connected`].
    ConnectQp(VerbsOffer),
    Done(Outcome),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    Offers,
    Connecting(VerbsOffer),
    Ready { peer: VerbsOffer, local_ok: bool },
    Done(Outcome),
}

/// One endpoint's exchange.
#[derive(Debug)]
pub struct Negotiation {
    choice: TransportChoice,
    /// Why this side offers no verbs, when it does not.
    no_verbs_reason: String,
    local: Offer,
    out: [u8; OFFER_BYTES + 1],
    out_len: usize,
    out_sent: usize,
    input: [u8; OFFER_BYTES],
    got: usize,
    phase: Phase,
}

impl Negotiation {
    /// Starts the exchange; `local` is this side's offer, or why it has none.
    pub fn new(choice: TransportChoice, local: Result<VerbsOffer, String>) -> Negotiation {
        let (verbs, no_verbs_reason) = match local {
            Ok(v) => (Some(v), String::new()),
            Err(reason) => (None, reason),
        };
        let local = Offer { verbs };
        let mut out = [0u8; OFFER_BYTES + 1];
        out[..OFFER_BYTES].copy_from_slice(&local.encode());
        Negotiation {
            choice,
            no_verbs_reason,
            local,
            out,
            out_len: OFFER_BYTES,
            out_sent: 0,
            input: [0; OFFER_BYTES],
            got: 0,
            phase: Phase::Offers,
        }
    }

    /// Bytes to write to the socket.
    pub fn to_send(&self) -> &[u8] {
        &self.out[self.out_sent..self.out_len]
    }

    pub fn handle_sent(&mut self, n: usize) {
        assert!(n <= self.out_len - self.out_sent, "sent more than offered");
        self.out_sent += n;
    }

    /// Where the next bytes from the socket go: exactly as many as the exchange
    /// still needs, so no byte of the stream after it is consumed (empty: read
    /// nothing now).
    pub fn recv_space(&mut self) -> &mut [u8] {
        let need = match self.phase {
            Phase::Offers => OFFER_BYTES,
            Phase::Ready { .. } => 1,
            Phase::Connecting(_) | Phase::Done(_) => 0,
        };
        &mut self.input[self.got.min(need)..need]
    }

    pub fn handle_recv(&mut self, n: usize) -> Result<(), NegotiationError> {
        self.got += n;
        match self.phase.clone() {
            Phase::Offers if self.got == OFFER_BYTES => {
                self.got = 0;
                let peer = Offer::decode(&self.input)?;
                self.phase = match (self.local.verbs, peer.verbs) {
                    (Some(_), Some(p)) => Phase::Connecting(p),
                    (local, remote) => {
                        let why = if local.is_none() {
                            self.no_verbs_reason.clone()
                        } else {
                            "the peer offers no RDMA".to_string()
                        };
                        debug_assert!(local.is_none() || remote.is_none());
                        if self.choice == TransportChoice::Verbs {
                            Phase::Done(Outcome::Refused(format!(
                                "transport verbs required, but {why}"
                            )))
                        } else {
                            Phase::Done(Outcome::Tcp(why))
                        }
                    }
                };
            }
            Phase::Ready { peer, local_ok } if self.got == 1 => {
                self.got = 0;
                let peer_ok = match self.input[0] {
                    READY_OK => true,
                    READY_FALLBACK => false,
                    other => return Err(NegotiationError::BadReady(other)),
                };
                self.phase = Phase::Done(match (local_ok, peer_ok) {
                    (true, true) => Outcome::Verbs(peer),
                    (false, _) => self.fallback("this side could not connect its queue pair"),
                    (true, false) => self.fallback("the peer could not connect its queue pair"),
                });
            }
            _ => {}
        }
        Ok(())
    }

    fn fallback(&self, why: &str) -> Outcome {
        if self.choice == TransportChoice::Verbs {
            Outcome::Refused(format!("transport verbs required, but {why}"))
        } else {
            Outcome::Tcp(why.to_string())
        }
    }

    /// Reports whether the local queue pair connected to the peer's.
    pub fn qp_connected(&mut self, ok: bool) {
        let Phase::Connecting(peer) = self.phase else {
            panic!("qp_connected outside the connecting phase");
        };
        self.out[self.out_len] = if ok { READY_OK } else { READY_FALLBACK };
        self.out_len += 1;
        self.phase = Phase::Ready { peer, local_ok: ok };
    }

    /// The next step. `Done` comes only once every local byte was sent, so the
    /// stream that follows on TCP starts after them.
    pub fn poll(&self) -> Step {
        match &self.phase {
            Phase::Connecting(peer) => Step::ConnectQp(*peer),
            Phase::Done(outcome) if self.to_send().is_empty() => Step::Done(outcome.clone()),
            _ => Step::Wait,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(qpn: u32) -> VerbsOffer {
        VerbsOffer {
            qpn,
            psn: 0x1234,
            gid: [7; 16],
            mtu: 1024,
            rkey: 99,
        }
    }

    /// Moves `from`'s bytes to `to`, byte by byte, as far as `to` takes them.
    fn pump(from: &mut Negotiation, to: &mut Negotiation, qp_ok: bool) {
        if let Step::ConnectQp(_) = from.poll() {
            from.qp_connected(qp_ok);
        }
        let bytes = from.to_send().to_vec();
        let mut sent = 0;
        while sent < bytes.len() {
            let space = to.recv_space();
            if space.is_empty() {
                break;
            }
            space[0] = bytes[sent];
            to.handle_recv(1).unwrap();
            sent += 1;
        }
        from.handle_sent(sent);
    }

    /// Runs two sides against each other until both are done.
    fn exchange(a: &mut Negotiation, b: &mut Negotiation, qp_ok: (bool, bool)) -> (Step, Step) {
        for _ in 0..1000 {
            pump(a, b, qp_ok.0);
            pump(b, a, qp_ok.1);
            if let (Step::Done(_), Step::Done(_)) = (a.poll(), b.poll()) {
                return (a.poll(), b.poll());
            }
        }
        panic!("exchange did not finish");
    }

    #[test]
    fn offers_round_trip_and_garbage_is_refused() {
        for o in [
            Offer { verbs: None },
            Offer {
                verbs: Some(offer(5)),
            },
        ] {
            assert_eq!(Offer::decode(&o.encode()).unwrap(), o);
        }
        let good = Offer {
            verbs: Some(offer(5)),
        }
        .encode();
        for (at, value) in [(0, b'X'), (4, 9), (6, 2), (33, 0x70), (50, 1), (11, 0xff)] {
            let mut bad = good;
            bad[at] = value;
            assert!(Offer::decode(&bad).is_err(), "byte {at} = {value}");
        }
        let mut no_verbs = Offer { verbs: None }.encode();
        no_verbs[9] = 1;
        assert!(Offer::decode(&no_verbs).is_err());
    }

    #[test]
    fn both_sides_with_verbs_connect_over_verbs() {
        let mut a = Negotiation::new(TransportChoice::Auto, Ok(offer(10)));
        let mut b = Negotiation::new(TransportChoice::Verbs, Ok(offer(20)));
        let (sa, sb) = exchange(&mut a, &mut b, (true, true));
        assert_eq!(sa, Step::Done(Outcome::Verbs(offer(20))));
        assert_eq!(sb, Step::Done(Outcome::Verbs(offer(10))));
    }

    #[test]
    fn one_side_without_verbs_falls_back_or_refuses() {
        let mut a = Negotiation::new(TransportChoice::Auto, Ok(offer(10)));
        let mut b = Negotiation::new(TransportChoice::Auto, Err("no RDMA device".into()));
        let (sa, sb) = exchange(&mut a, &mut b, (true, true));
        assert_eq!(
            sa,
            Step::Done(Outcome::Tcp("the peer offers no RDMA".into()))
        );
        assert_eq!(sb, Step::Done(Outcome::Tcp("no RDMA device".into())));
        // No ready bytes on the TCP path: the stream follows the offers directly.
        assert!(a.to_send().is_empty() && a.out_len == OFFER_BYTES);

        let mut a = Negotiation::new(TransportChoice::Verbs, Ok(offer(10)));
        let mut b = Negotiation::new(TransportChoice::Tcp, Err("transport tcp".into()));
        let (sa, _) = exchange(&mut a, &mut b, (true, true));
        assert!(
            matches!(sa, Step::Done(Outcome::Refused(why)) if why.contains("peer offers no RDMA"))
        );
    }

    #[test]
    fn a_queue_pair_that_fails_to_connect_sends_both_to_tcp() {
        let mut a = Negotiation::new(TransportChoice::Auto, Ok(offer(10)));
        let mut b = Negotiation::new(TransportChoice::Auto, Ok(offer(20)));
        let (sa, sb) = exchange(&mut a, &mut b, (true, false));
        assert!(matches!(sa, Step::Done(Outcome::Tcp(why)) if why.contains("peer could not")));
        assert!(matches!(sb, Step::Done(Outcome::Tcp(why)) if why.contains("this side could not")));
    }

    #[test]
    fn the_exchange_never_reads_past_its_own_bytes() {
        let mut a = Negotiation::new(TransportChoice::Auto, Err("none".into()));
        assert_eq!(a.recv_space().len(), OFFER_BYTES);
        let peer = Offer { verbs: None }.encode();
        a.recv_space()[..10].copy_from_slice(&peer[..10]);
        a.handle_recv(10).unwrap();
        assert_eq!(a.recv_space().len(), OFFER_BYTES - 10);
        let rest = &peer[10..];
        a.recv_space().copy_from_slice(rest);
        a.handle_recv(rest.len()).unwrap();
        assert!(a.recv_space().is_empty());
        assert_eq!(a.poll(), Step::Wait, "its own offer is not sent yet");
        a.handle_sent(OFFER_BYTES);
        assert!(matches!(a.poll(), Step::Done(Outcome::Tcp(_))));
        let mut b = Negotiation::new(TransportChoice::Auto, Ok(offer(1)));
        b.recv_space().copy_from_slice(
            &Offer {
                verbs: Some(offer(2)),
            }
            .encode(),
        );
        b.handle_recv(OFFER_BYTES).unwrap();
        b.qp_connected(true);
        b.recv_space()[0] = b'?';
        assert_eq!(b.handle_recv(1), Err(NegotiationError::BadReady(b'?')));
    }
}
