//! The server side of the NBD protocol (doc/proto.md of
//! NetworkBlockDevice/nbd) as pure code: no sockets, no runtime. The IO
//! layer reads exactly the bytes [`Handshake::wanted`] asks for, hands them
//! to [`Handshake::receive`], and writes out what it produces; then it
//! decodes 28-byte [`RequestHeader`]s and answers with simple replies.
//!
//! Only fixed newstyle negotiation and simple replies are served: no TLS, no
//! structured replies, no metadata contexts.

use std::io;

use thiserror::Error;

/// "NBDMAGIC", the first word the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": second word of the greeting and the start of every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Starts every option reply.
pub const NBD_OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const NBD_REQUEST_MAGIC: u32 = 0x2560_9513;
pub const NBD_SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

// Handshake flags (server, 16 bits).
pub const NBD_FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const NBD_FLAG_NO_ZEROES: u16 = 1 << 1;

// Client flags (32 bits).
pub const NBD_FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const NBD_FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Transmission flags (16 bits).
pub const NBD_FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const NBD_FLAG_READ_ONLY: u16 = 1 << 1;
pub const NBD_FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const NBD_FLAG_SEND_FUA: u16 = 1 << 3;
pub const NBD_FLAG_ROTATIONAL: u16 = 1 << 4;
pub const NBD_FLAG_SEND_TRIM: u16 = 1 << 5;
pub const NBD_FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const NBD_FLAG_SEND_DF: u16 = 1 << 7;
pub const NBD_FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const NBD_FLAG_SEND_CACHE: u16 = 1 << 10;
pub const NBD_FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// Option types.
pub const NBD_OPT_EXPORT_NAME: u32 = 1;
pub const NBD_OPT_ABORT: u32 = 2;
pub const NBD_OPT_LIST: u32 = 3;
pub const NBD_OPT_STARTTLS: u32 = 5;
pub const NBD_OPT_INFO: u32 = 6;
pub const NBD_OPT_GO: u32 = 7;
pub const NBD_OPT_STRUCTURED_REPLY: u32 = 8;
pub const NBD_OPT_LIST_META_CONTEXT: u32 = 9;
pub const NBD_OPT_SET_META_CONTEXT: u32 = 10;

// Option reply types; errors have bit 31 set.
pub const NBD_REP_ACK: u32 = 1;
pub const NBD_REP_SERVER: u32 = 2;
pub const NBD_REP_INFO: u32 = 3;
pub const NBD_REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const NBD_REP_ERR_POLICY: u32 = (1 << 31) + 2;
pub const NBD_REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const NBD_REP_ERR_PLATFORM: u32 = (1 << 31) + 4;
pub const NBD_REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
pub const NBD_REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub const NBD_REP_ERR_SHUTDOWN: u32 = (1 << 31) + 7;
pub const NBD_REP_ERR_BLOCK_SIZE_REQD: u32 = (1 << 31) + 8;
pub const NBD_REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

// Information types of NBD_REP_INFO.
pub const NBD_INFO_EXPORT: u16 = 0;
pub const NBD_INFO_NAME: u16 = 1;
pub const NBD_INFO_DESCRIPTION: u16 = 2;
pub const NBD_INFO_BLOCK_SIZE: u16 = 3;

// Request types.
pub const NBD_CMD_READ: u16 = 0;
pub const NBD_CMD_WRITE: u16 = 1;
pub const NBD_CMD_DISC: u16 = 2;
pub const NBD_CMD_FLUSH: u16 = 3;
pub const NBD_CMD_TRIM: u16 = 4;
pub const NBD_CMD_CACHE: u16 = 5;
pub const NBD_CMD_WRITE_ZEROES: u16 = 6;
pub const NBD_CMD_BLOCK_STATUS: u16 = 7;

// Command flags.
pub const NBD_CMD_FLAG_FUA: u16 = 1 << 0;
pub const NBD_CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const NBD_CMD_FLAG_DF: u16 = 1 << 2;
pub const NBD_CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const NBD_CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

/// The greeting: NBDMAGIC, IHAVEOPT, handshake flags.
pub const GREETING_LEN: usize = 18;
pub const CLIENT_FLAGS_LEN: usize = 4;
/// IHAVEOPT, option, data length.
pub const OPTION_HEADER_LEN: usize = 16;
/// Magic, flags, type, cookie, offset, length.
pub const REQUEST_HEADER_LEN: usize = 28;
/// Magic, error, cookie.
pub const SIMPLE_REPLY_HEADER_LEN: usize = 16;

/// Option data beyond this closes the connection: no option we serve comes
/// near it (strings are at most 4096 bytes), and the server buffers it whole.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Options per connection before the client counts as abusive.
pub const MAX_OPTIONS: u32 = 256;
/// The advertised block sizes. The device takes any byte alignment (the
/// real one does read-modify-write below 4 KiB), so the minimum is 1 and
/// 4 KiB is where IO gets efficient; 32 MiB is the payload every client
/// must be able to live with.
pub const MIN_BLOCK_SIZE: u32 = 1;
pub const PREFERRED_BLOCK_SIZE: u32 = 4096;
pub const MAX_PAYLOAD: u32 = 32 << 20;

/// Bytes of zeroes after the NBD_OPT_EXPORT_NAME reply unless the client
/// negotiated NBD_FLAG_C_NO_ZEROES.
const EXPORT_NAME_PADDING: usize = 124;

/// A violation that ends the connection.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ProtocolError {
    #[error("client flags {0:#x} lack NBD_FLAG_C_FIXED_NEWSTYLE; only fixed newstyle is served")]
    NotFixedNewstyle(u32),
    #[error("client flags {0:#x} set bits the server did not offer")]
    UnknownClientFlags(u32),
    #[error("option header magic {0:#018x} is not IHAVEOPT")]
    BadOptionMagic(u64),
    #[error(
        "option {option} announces {length} bytes of data, more than the {MAX_OPTION_LEN} allowed"
    )]
    OptionTooLong { option: u32, length: u32 },
    #[error("more than {MAX_OPTIONS} options in one handshake")]
    TooManyOptions,
    #[error("NBD_OPT_EXPORT_NAME asked for the unknown export {0:?}")]
    UnknownExport(String),
    #[error("request magic {0:#010x} is not NBD_REQUEST_MAGIC")]
    BadRequestMagic(u32),
    #[error("the handshake got {got} bytes where it wanted {wanted}")]
    WrongInputLength { wanted: usize, got: usize },
    #[error("the handshake has already finished")]
    HandshakeFinished,
}

/// What the server exports, as the handshake describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Export {
    /// The export's name; the empty name also selects it (the default).
    pub name: String,
    /// Human-readable, for NBD_INFO_DESCRIPTION.
    pub description: String,
    pub size: u64,
    pub read_only: bool,
}

impl Export {
    pub fn transmission_flags(&self) -> u16 {
        // CAN_MULTI_CONN: the device's writes are durable once complete and
        // its flush covers every connection, so no per-connection cache.
        let common = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_CAN_MULTI_CONN;
        if self.read_only {
            common | NBD_FLAG_READ_ONLY
        } else {
            common | NBD_FLAG_SEND_FUA | NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES
        }
    }

    fn answers_to(&self, requested: &[u8]) -> bool {
        requested.is_empty() || requested == self.name.as_bytes()
    }
}

/// What the IO layer does after writing out what [`Handshake::receive`]
/// produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Read [`Handshake::wanted`] more bytes.
    Continue,
    /// The handshake is over: serve requests.
    Transmission,
    /// The client aborted (NBD_OPT_ABORT): close the connection.
    Abort,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    ClientFlags,
    OptionHeader,
    OptionData { option: u32, length: u32 },
    Finished,
}

/// The server's side of the fixed newstyle handshake for one export.
#[derive(Debug)]
pub struct Handshake {
    export: Export,
    state: State,
    no_zeroes: bool,
    options_seen: u32,
}

impl Handshake {
    pub fn new(export: Export) -> Handshake {
        Handshake {
            export,
            state: State::ClientFlags,
            no_zeroes: false,
            options_seen: 0,
        }
    }

    /// What the server sends first, before reading anything.
    pub fn greeting(&self) -> [u8; GREETING_LEN] {
        let mut greeting = [0; GREETING_LEN];
        greeting[..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
        greeting[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
        greeting[16..]
            .copy_from_slice(&(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES).to_be_bytes());
        greeting
    }

    /// How many bytes the next [`Handshake::receive`] takes (0 once finished).
    pub fn wanted(&self) -> usize {
        match self.state {
            State::ClientFlags => CLIENT_FLAGS_LEN,
            State::OptionHeader => OPTION_HEADER_LEN,
            State::OptionData { length, .. } => length as usize,
            State::Finished => 0,
        }
    }

    /// Takes exactly [`Handshake::wanted`] bytes and appends the answer, if
    /// any, to `out`. An error means: close the connection (after writing
    /// nothing more).
    pub fn receive(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<Step, ProtocolError> {
        if self.state == State::Finished {
            return Err(ProtocolError::HandshakeFinished);
        }
        if input.len() != self.wanted() {
            return Err(ProtocolError::WrongInputLength {
                wanted: self.wanted(),
                got: input.len(),
            });
        }
        let step = match self.state {
            State::ClientFlags => self.client_flags(be_u32(input)),
            State::OptionHeader => self.option_header(input, out),
            State::OptionData { option, .. } => self.option(option, input, out),
            State::Finished => Err(ProtocolError::HandshakeFinished),
        };
        if !matches!(step, Ok(Step::Continue)) {
            self.state = State::Finished;
        }
        step
    }

    /// Whether the client asked for no zero padding (exposed for logging).
    pub fn no_zeroes(&self) -> bool {
        self.no_zeroes
    }

    fn client_flags(&mut self, flags: u32) -> Result<Step, ProtocolError> {
        if flags & !(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES) != 0 {
            return Err(ProtocolError::UnknownClientFlags(flags));
        }
        if flags & NBD_FLAG_C_FIXED_NEWSTYLE == 0 {
            return Err(ProtocolError::NotFixedNewstyle(flags));
        }
        self.no_zeroes = flags & NBD_FLAG_C_NO_ZEROES != 0;
        self.state = State::OptionHeader;
        Ok(Step::Continue)
    }

    fn option_header(&mut self, header: &[u8], out: &mut Vec<u8>) -> Result<Step, ProtocolError> {
        let magic = be_u64(&header[..8]);
        if magic != IHAVEOPT {
            return Err(ProtocolError::BadOptionMagic(magic));
        }
        let option = be_u32(&header[8..12]);
        let length = be_u32(&header[12..16]);
        if length > MAX_OPTION_LEN {
            return Err(ProtocolError::OptionTooLong { option, length });
        }
        self.options_seen += 1;
        if self.options_seen > MAX_OPTIONS {
            return Err(ProtocolError::TooManyOptions);
        }
        if length == 0 {
            // Nothing more to read: answer now.
            return self.option(option, &[], out);
        }
        self.state = State::OptionData { option, length };
        Ok(Step::Continue)
    }

    fn option(
        &mut self,
        option: u32,
        data: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<Step, ProtocolError> {
        self.state = State::OptionHeader;
        match option {
            NBD_OPT_EXPORT_NAME => self.export_name(data, out),
            NBD_OPT_ABORT => {
                // Data, if any, is ignored as the spec asks.
                option_reply(out, option, NBD_REP_ACK, &[]);
                Ok(Step::Abort)
            }
            NBD_OPT_LIST => {
                if data.is_empty() {
                    let name = self.export.name.as_bytes();
                    let mut server = Vec::with_capacity(4 + name.len());
                    server.extend_from_slice(&(name.len() as u32).to_be_bytes());
                    server.extend_from_slice(name);
                    option_reply(out, option, NBD_REP_SERVER, &server);
                    option_reply(out, option, NBD_REP_ACK, &[]);
                } else {
                    option_reply(
                        out,
                        option,
                        NBD_REP_ERR_INVALID,
                        b"NBD_OPT_LIST takes no data",
                    );
                }
                Ok(Step::Continue)
            }
            NBD_OPT_INFO | NBD_OPT_GO => Ok(self.info_or_go(option, data, out)),
            NBD_OPT_STRUCTURED_REPLY => {
                option_reply(
                    out,
                    option,
                    NBD_REP_ERR_UNSUP,
                    b"this server sends simple replies only",
                );
                Ok(Step::Continue)
            }
            _ => {
                let message = format!("option {option} is not supported");
                option_reply(out, option, NBD_REP_ERR_UNSUP, message.as_bytes());
                Ok(Step::Continue)
            }
        }
    }

    fn export_name(&mut self, name: &[u8], out: &mut Vec<u8>) -> Result<Step, ProtocolError> {
        if !self.export.answers_to(name) {
            // There is no way to answer an error here: the spec says close.
            return Err(ProtocolError::UnknownExport(
                String::from_utf8_lossy(name).into_owned(),
            ));
        }
        out.extend_from_slice(&self.export.size.to_be_bytes());
        out.extend_from_slice(&self.export.transmission_flags().to_be_bytes());
        if !self.no_zeroes {
            out.extend_from_slice(&[0; EXPORT_NAME_PADDING]);
        }
        Ok(Step::Transmission)
    }

    fn info_or_go(&mut self, option: u32, data: &[u8], out: &mut Vec<u8>) -> Step {
        let Some((name, requests)) = parse_info_request(data) else {
            option_reply(
                out,
                option,
                NBD_REP_ERR_INVALID,
                b"malformed NBD_OPT_INFO/NBD_OPT_GO data",
            );
            return Step::Continue;
        };
        if !self.export.answers_to(name) {
            let message = format!("no export named {:?}", String::from_utf8_lossy(name));
            option_reply(out, option, NBD_REP_ERR_UNKNOWN, message.as_bytes());
            return Step::Continue;
        }
        let export = &self.export;
        let mut info = Vec::with_capacity(14);
        // NBD_INFO_EXPORT is mandatory; block sizes are cheap, so always sent.
        info.extend_from_slice(&NBD_INFO_EXPORT.to_be_bytes());
        info.extend_from_slice(&export.size.to_be_bytes());
        info.extend_from_slice(&export.transmission_flags().to_be_bytes());
        option_reply(out, option, NBD_REP_INFO, &info);
        info.clear();
        info.extend_from_slice(&NBD_INFO_BLOCK_SIZE.to_be_bytes());
        for size in [MIN_BLOCK_SIZE, PREFERRED_BLOCK_SIZE, MAX_PAYLOAD] {
            info.extend_from_slice(&size.to_be_bytes());
        }
        option_reply(out, option, NBD_REP_INFO, &info);
        for (kind, text) in [
            (NBD_INFO_NAME, &export.name),
            (NBD_INFO_DESCRIPTION, &export.description),
        ] {
            if requests.contains(&kind) {
                info.clear();
                info.extend_from_slice(&kind.to_be_bytes());
                info.extend_from_slice(text.as_bytes());
                option_reply(out, option, NBD_REP_INFO, &info);
            }
        }
        option_reply(out, option, NBD_REP_ACK, &[]);
        if option == NBD_OPT_GO {
            Step::Transmission
        } else {
            Step::Continue
        }
    }
}

/// Splits NBD_OPT_INFO/GO data into the export name and the information
/// requests; None if the lengths do not add up.
fn parse_info_request(data: &[u8]) -> Option<(&[u8], Vec<u16>)> {
    let name_len = be_u32(data.get(..4)?) as usize;
    let rest = data.get(4..)?;
    let name = rest.get(..name_len)?;
    let rest = rest.get(name_len..)?;
    let count = u16::from_be_bytes(rest.get(..2)?.try_into().ok()?) as usize;
    let list = rest.get(2..)?;
    if list.len() != count * 2 {
        return None;
    }
    let requests = list
        .chunks_exact(2)
        .map(|r| u16::from_be_bytes([r[0], r[1]]))
        .collect();
    Some((name, requests))
}

/// Appends an option reply: magic, option, reply type, length, data.
fn option_reply(out: &mut Vec<u8>, option: u32, reply_type: u32, data: &[u8]) {
    out.extend_from_slice(&NBD_OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// An NBD error value, as sent in a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub u32);

impl Errno {
    pub const EPERM: Errno = Errno(1);
    pub const EIO: Errno = Errno(5);
    pub const ENOMEM: Errno = Errno(12);
    pub const EINVAL: Errno = Errno(22);
    pub const ENOSPC: Errno = Errno(28);
    pub const EOVERFLOW: Errno = Errno(75);
    pub const ENOTSUP: Errno = Errno(95);
    pub const ESHUTDOWN: Errno = Errno(108);

    /// The NBD error for a device error. Out of memory becomes ENOSPC as the
    /// spec discourages ENOMEM; anything unrecognised is EIO.
    pub fn from_io(error: &io::Error) -> Errno {
        match error.kind() {
            io::ErrorKind::InvalidInput => Errno::EINVAL,
            io::ErrorKind::PermissionDenied => Errno::EPERM,
            io::ErrorKind::StorageFull
            | io::ErrorKind::QuotaExceeded
            | io::ErrorKind::FileTooLarge
            | io::ErrorKind::OutOfMemory => Errno::ENOSPC,
            _ => Errno::EIO,
        }
    }
}

/// A transmission request header as it came off the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub command: u16,
    /// Opaque to the server; echoed in the reply.
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

/// A request the server will carry out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read {
        offset: u64,
        length: u32,
    },
    /// `length` payload bytes follow the header.
    Write {
        offset: u64,
        length: u32,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        length: u32,
        fua: bool,
    },
    /// NBD_CMD_FLAG_NO_HOLE needs nothing special: zeroes are always written.
    WriteZeroes {
        offset: u64,
        length: u32,
        fua: bool,
    },
    /// No reply: finish what is in flight and close.
    Disconnect,
}

impl RequestHeader {
    pub fn decode(bytes: &[u8; REQUEST_HEADER_LEN]) -> Result<RequestHeader, ProtocolError> {
        let magic = be_u32(&bytes[..4]);
        if magic != NBD_REQUEST_MAGIC {
            return Err(ProtocolError::BadRequestMagic(magic));
        }
        Ok(RequestHeader {
            flags: u16::from_be_bytes([bytes[4], bytes[5]]),
            command: u16::from_be_bytes([bytes[6], bytes[7]]),
            cookie: be_u64(&bytes[8..16]),
            offset: be_u64(&bytes[16..24]),
            length: be_u32(&bytes[24..28]),
        })
    }

    /// The client's side; for tests and tools.
    pub fn encode(&self) -> [u8; REQUEST_HEADER_LEN] {
        let mut bytes = [0; REQUEST_HEADER_LEN];
        bytes[..4].copy_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
        bytes[4..6].copy_from_slice(&self.flags.to_be_bytes());
        bytes[6..8].copy_from_slice(&self.command.to_be_bytes());
        bytes[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        bytes[16..24].copy_from_slice(&self.offset.to_be_bytes());
        bytes[24..28].copy_from_slice(&self.length.to_be_bytes());
        bytes
    }

    /// Bytes that follow the header on the wire, whether or not the request
    /// is valid: the IO layer must consume them either way.
    pub fn payload_len(&self) -> u32 {
        if self.command == NBD_CMD_WRITE {
            self.length
        } else {
            0
        }
    }

    /// Checks the request against `export`; an error is answered with that
    /// errno (the connection stays up).
    pub fn interpret(&self, export: &Export) -> Result<Command, Errno> {
        let allowed_flags = match self.command {
            // The spec tells servers to accept FUA on every command.
            NBD_CMD_WRITE_ZEROES => NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE,
            // Nothing follows a disconnect, so nothing to complain about.
            NBD_CMD_DISC => u16::MAX,
            _ => NBD_CMD_FLAG_FUA,
        };
        if self.flags & !allowed_flags != 0 {
            return Err(Errno::EINVAL);
        }
        let fua = self.flags & NBD_CMD_FLAG_FUA != 0;
        let (offset, length) = (self.offset, self.length);
        let inside = offset
            .checked_add(u64::from(length))
            .is_some_and(|end| end <= export.size);
        let writable = if export.read_only {
            Err(Errno::EPERM)
        } else {
            Ok(())
        };
        // Past the end: EINVAL for reads and trims, ENOSPC for writes (the
        // spec's advice, and what qemu-nbd does).
        let in_range = |past_end: Errno| if inside { Ok(()) } else { Err(past_end) };
        match self.command {
            NBD_CMD_READ => {
                if length > MAX_PAYLOAD {
                    return Err(Errno::EINVAL);
                }
                in_range(Errno::EINVAL)?;
                Ok(Command::Read { offset, length })
            }
            NBD_CMD_WRITE => {
                writable?;
                if length > MAX_PAYLOAD {
                    return Err(Errno::EINVAL);
                }
                in_range(Errno::ENOSPC)?;
                Ok(Command::Write {
                    offset,
                    length,
                    fua,
                })
            }
            NBD_CMD_DISC => Ok(Command::Disconnect),
            NBD_CMD_FLUSH => Ok(Command::Flush),
            NBD_CMD_TRIM => {
                writable?;
                in_range(Errno::EINVAL)?;
                Ok(Command::Trim {
                    offset,
                    length,
                    fua,
                })
            }
            NBD_CMD_WRITE_ZEROES => {
                writable?;
                in_range(Errno::ENOSPC)?;
                Ok(Command::WriteZeroes {
                    offset,
                    length,
                    fua,
                })
            }
            _ => Err(Errno::EINVAL),
        }
    }
}

/// A simple reply header; a successful read's data follows it.
pub fn simple_reply(cookie: u64, error: Option<Errno>) -> [u8; SIMPLE_REPLY_HEADER_LEN] {
    let mut reply = [0; SIMPLE_REPLY_HEADER_LEN];
    reply[..4].copy_from_slice(&NBD_SIMPLE_REPLY_MAGIC.to_be_bytes());
    reply[4..8].copy_from_slice(&error.map_or(0, |e| e.0).to_be_bytes());
    reply[8..].copy_from_slice(&cookie.to_be_bytes());
    reply
}

/// Callers pass exactly 4 (or 8) bytes.
fn be_u32(bytes: &[u8]) -> u32 {
    let mut word = [0; 4];
    word.copy_from_slice(&bytes[..4]);
    u32::from_be_bytes(word)
}

fn be_u64(bytes: &[u8]) -> u64 {
    let mut word = [0; 8];
    word.copy_from_slice(&bytes[..8]);
    u64::from_be_bytes(word)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn export() -> Export {
        Export {
            name: "vol".into(),
            description: "a test volume".into(),
            size: 1 << 20,
            read_only: false,
        }
    }

    /// A handshake past the client flags.
    fn negotiating(client_flags: u32) -> Handshake {
        let mut handshake = Handshake::new(export());
        let mut out = Vec::new();
        assert_eq!(
            handshake.receive(&client_flags.to_be_bytes(), &mut out),
            Ok(Step::Continue)
        );
        assert!(out.is_empty());
        handshake
    }

    fn option_header(option: u32, length: u32) -> [u8; OPTION_HEADER_LEN] {
        let mut header = [0; OPTION_HEADER_LEN];
        header[..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        header[8..12].copy_from_slice(&option.to_be_bytes());
        header[12..].copy_from_slice(&length.to_be_bytes());
        header
    }

    /// Sends one option (header, then data if any) and returns the step and
    /// what the server answered.
    fn send_option(
        handshake: &mut Handshake,
        option: u32,
        data: &[u8],
    ) -> (Result<Step, ProtocolError>, Vec<u8>) {
        let mut out = Vec::new();
        let header = option_header(option, data.len() as u32);
        let step = handshake.receive(&header, &mut out);
        if data.is_empty() || step.is_err() {
            return (step, out);
        }
        assert_eq!(step, Ok(Step::Continue));
        assert_eq!(handshake.wanted(), data.len());
        (handshake.receive(data, &mut out), out)
    }

    /// (option, reply type, data) of each option reply in `bytes`.
    fn option_replies(mut bytes: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        let mut replies = Vec::new();
        while !bytes.is_empty() {
            assert_eq!(be_u64(&bytes[..8]), NBD_OPTION_REPLY_MAGIC);
            let length = be_u32(&bytes[16..20]) as usize;
            replies.push((
                be_u32(&bytes[8..12]),
                be_u32(&bytes[12..16]),
                bytes[20..20 + length].to_vec(),
            ));
            bytes = &bytes[20 + length..];
        }
        replies
    }

    fn info_request(name: &str, requests: &[u16]) -> Vec<u8> {
        let mut data = (name.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(name.as_bytes());
        data.extend_from_slice(&(requests.len() as u16).to_be_bytes());
        for request in requests {
            data.extend_from_slice(&request.to_be_bytes());
        }
        data
    }

    const FLAGS: u32 = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES;

    #[test]
    fn greeting_is_nbdmagic_ihaveopt_and_flags() {
        let handshake = Handshake::new(export());
        assert_eq!(&handshake.greeting()[..16], b"NBDMAGICIHAVEOPT");
        assert_eq!(&handshake.greeting()[16..], &[0, 3]);
        assert_eq!(handshake.wanted(), CLIENT_FLAGS_LEN);
    }

    #[test]
    fn client_flags_must_be_fixed_newstyle_and_known() {
        let mut out = Vec::new();
        assert_eq!(
            Handshake::new(export()).receive(&0u32.to_be_bytes(), &mut out),
            Err(ProtocolError::NotFixedNewstyle(0))
        );
        assert_eq!(
            Handshake::new(export()).receive(&5u32.to_be_bytes(), &mut out),
            Err(ProtocolError::UnknownClientFlags(5))
        );
        assert!(out.is_empty());
        assert!(negotiating(FLAGS).no_zeroes());
        assert!(!negotiating(NBD_FLAG_C_FIXED_NEWSTYLE).no_zeroes());
        assert_eq!(negotiating(FLAGS).wanted(), OPTION_HEADER_LEN);
    }

    #[test]
    fn receive_insists_on_the_wanted_length() {
        let mut out = Vec::new();
        assert_eq!(
            Handshake::new(export()).receive(&[0; 3], &mut out),
            Err(ProtocolError::WrongInputLength { wanted: 4, got: 3 })
        );
    }

    #[test]
    fn bad_option_magic_and_absurd_lengths_close() {
        let mut handshake = negotiating(FLAGS);
        let mut header = option_header(NBD_OPT_GO, 0);
        header[0] ^= 1;
        let mut out = Vec::new();
        assert!(matches!(
            handshake.receive(&header, &mut out),
            Err(ProtocolError::BadOptionMagic(_))
        ));
        let mut handshake = negotiating(FLAGS);
        assert_eq!(
            handshake.receive(&option_header(NBD_OPT_GO, MAX_OPTION_LEN + 1), &mut out),
            Err(ProtocolError::OptionTooLong {
                option: NBD_OPT_GO,
                length: MAX_OPTION_LEN + 1
            })
        );
        assert!(out.is_empty());
        assert_eq!(
            handshake.wanted(),
            0,
            "a failed handshake takes nothing more"
        );
        assert_eq!(
            handshake.receive(&[], &mut out),
            Err(ProtocolError::HandshakeFinished)
        );
    }

    #[test]
    fn export_name_enters_transmission() {
        let mut handshake = negotiating(FLAGS);
        let (step, out) = send_option(&mut handshake, NBD_OPT_EXPORT_NAME, b"vol");
        assert_eq!(step, Ok(Step::Transmission));
        assert_eq!(out.len(), 10, "no zeroes were negotiated");
        assert_eq!(be_u64(&out[..8]), 1 << 20);
        assert_eq!(
            u16::from_be_bytes([out[8], out[9]]),
            export().transmission_flags()
        );
        assert_eq!(handshake.wanted(), 0);

        // The empty name is the default export; without NO_ZEROES: padding.
        let mut handshake = negotiating(NBD_FLAG_C_FIXED_NEWSTYLE);
        let (step, out) = send_option(&mut handshake, NBD_OPT_EXPORT_NAME, b"");
        assert_eq!(step, Ok(Step::Transmission));
        assert_eq!(out.len(), 10 + 124);
        assert!(out[10..].iter().all(|&b| b == 0));
    }

    #[test]
    fn export_name_of_an_unknown_export_closes() {
        let mut handshake = negotiating(FLAGS);
        let (step, out) = send_option(&mut handshake, NBD_OPT_EXPORT_NAME, b"other");
        assert_eq!(step, Err(ProtocolError::UnknownExport("other".into())));
        assert!(out.is_empty());
    }

    #[test]
    fn list_names_the_one_export() {
        let mut handshake = negotiating(FLAGS);
        let (step, out) = send_option(&mut handshake, NBD_OPT_LIST, b"");
        assert_eq!(step, Ok(Step::Continue));
        let mut server = 3u32.to_be_bytes().to_vec();
        server.extend_from_slice(b"vol");
        assert_eq!(
            option_replies(&out),
            vec![
                (NBD_OPT_LIST, NBD_REP_SERVER, server),
                (NBD_OPT_LIST, NBD_REP_ACK, vec![])
            ]
        );
        let (step, out) = send_option(&mut handshake, NBD_OPT_LIST, b"junk");
        assert_eq!(step, Ok(Step::Continue));
        assert_eq!(option_replies(&out)[0].1, NBD_REP_ERR_INVALID);
    }

    #[test]
    fn info_describes_and_go_enters_transmission() {
        let mut handshake = negotiating(FLAGS);
        let (step, out) = send_option(&mut handshake, NBD_OPT_INFO, &info_request("vol", &[]));
        assert_eq!(step, Ok(Step::Continue), "INFO does not end the handshake");
        let replies = option_replies(&out);
        let types: Vec<u32> = replies.iter().map(|r| r.1).collect();
        assert_eq!(types, [NBD_REP_INFO, NBD_REP_INFO, NBD_REP_ACK]);
        let mut export_info = NBD_INFO_EXPORT.to_be_bytes().to_vec();
        export_info.extend_from_slice(&(1u64 << 20).to_be_bytes());
        export_info.extend_from_slice(&export().transmission_flags().to_be_bytes());
        assert_eq!(replies[0].2, export_info);
        let mut block_size = NBD_INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        for size in [1u32, 4096, 32 << 20] {
            block_size.extend_from_slice(&size.to_be_bytes());
        }
        assert_eq!(replies[1].2, block_size);

        let request = info_request("", &[NBD_INFO_NAME, NBD_INFO_DESCRIPTION, 999]);
        let (step, out) = send_option(&mut handshake, NBD_OPT_GO, &request);
        assert_eq!(step, Ok(Step::Transmission));
        let replies = option_replies(&out);
        assert!(replies.iter().all(|r| r.0 == NBD_OPT_GO));
        assert_eq!(replies.len(), 5);
        assert_eq!(replies[2].2, [&[0, 1][..], b"vol"].concat());
        assert_eq!(replies[3].2, [&[0, 2][..], b"a test volume"].concat());
        assert_eq!(replies[4].1, NBD_REP_ACK);
    }

    #[test]
    fn go_to_an_unknown_export_or_malformed_go_is_an_error_reply() {
        let mut handshake = negotiating(FLAGS);
        let (step, out) = send_option(&mut handshake, NBD_OPT_GO, &info_request("nope", &[]));
        assert_eq!(step, Ok(Step::Continue));
        let replies = option_replies(&out);
        assert_eq!(replies.len(), 1);
        assert_eq!(replies[0].1, NBD_REP_ERR_UNKNOWN);

        for malformed in [
            vec![0, 0, 0],
            // A name length past the data.
            vec![0, 0, 0, 9, b'v', 0, 0],
            // One request announced, none sent.
            info_request("vol", &[])[..7]
                .iter()
                .copied()
                .chain([0, 1])
                .collect(),
            // Trailing garbage.
            [info_request("vol", &[]), vec![7]].concat(),
        ] {
            let (step, out) = send_option(&mut handshake, NBD_OPT_GO, &malformed);
            assert_eq!(step, Ok(Step::Continue), "{malformed:?}");
            assert_eq!(
                option_replies(&out)[0].1,
                NBD_REP_ERR_INVALID,
                "{malformed:?}"
            );
        }
        // Still negotiating: a good GO works.
        let (step, _) = send_option(&mut handshake, NBD_OPT_GO, &info_request("vol", &[]));
        assert_eq!(step, Ok(Step::Transmission));
    }

    #[test]
    fn unsupported_options_are_refused_politely() {
        let mut handshake = negotiating(FLAGS);
        for option in [
            NBD_OPT_STRUCTURED_REPLY,
            NBD_OPT_STARTTLS,
            NBD_OPT_SET_META_CONTEXT,
            4242,
        ] {
            let (step, out) = send_option(&mut handshake, option, b"");
            assert_eq!(step, Ok(Step::Continue));
            let replies = option_replies(&out);
            assert_eq!((replies[0].0, replies[0].1), (option, NBD_REP_ERR_UNSUP));
        }
        let (step, out) = send_option(&mut handshake, 4243, b"some data");
        assert_eq!(step, Ok(Step::Continue));
        assert_eq!(option_replies(&out)[0].1, NBD_REP_ERR_UNSUP);
    }

    #[test]
    fn abort_is_acknowledged() {
        let mut handshake = negotiating(FLAGS);
        let (step, out) = send_option(&mut handshake, NBD_OPT_ABORT, b"");
        assert_eq!(step, Ok(Step::Abort));
        assert_eq!(
            option_replies(&out),
            vec![(NBD_OPT_ABORT, NBD_REP_ACK, vec![])]
        );
    }

    #[test]
    fn endless_options_close() {
        let mut handshake = negotiating(FLAGS);
        for _ in 0..MAX_OPTIONS {
            assert_eq!(send_option(&mut handshake, 4242, b"").0, Ok(Step::Continue));
        }
        assert_eq!(
            send_option(&mut handshake, 4242, b"").0,
            Err(ProtocolError::TooManyOptions)
        );
    }

    #[test]
    fn transmission_flags_follow_read_only() {
        let writable = export().transmission_flags();
        for flag in [
            NBD_FLAG_HAS_FLAGS,
            NBD_FLAG_SEND_FLUSH,
            NBD_FLAG_SEND_FUA,
            NBD_FLAG_SEND_TRIM,
            NBD_FLAG_SEND_WRITE_ZEROES,
            NBD_FLAG_CAN_MULTI_CONN,
        ] {
            assert_ne!(writable & flag, 0, "{flag:#x}");
        }
        assert_eq!(writable & NBD_FLAG_READ_ONLY, 0);
        let read_only = Export {
            read_only: true,
            ..export()
        }
        .transmission_flags();
        assert_ne!(read_only & NBD_FLAG_READ_ONLY, 0);
        assert_eq!(
            read_only & (NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES),
            0
        );
    }

    fn request(command: u16, flags: u16, offset: u64, length: u32) -> RequestHeader {
        RequestHeader {
            flags,
            command,
            cookie: 0x0102_0304_0506_0708,
            offset,
            length,
        }
    }

    #[test]
    fn request_headers_round_trip_and_check_magic() {
        let header = request(NBD_CMD_WRITE, NBD_CMD_FLAG_FUA, 4096, 512);
        let bytes = header.encode();
        assert_eq!(&bytes[..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(RequestHeader::decode(&bytes), Ok(header));
        assert_eq!(header.payload_len(), 512);
        assert_eq!(request(NBD_CMD_READ, 0, 0, 512).payload_len(), 0);
        let mut bad = bytes;
        bad[3] = 0;
        assert_eq!(
            RequestHeader::decode(&bad),
            Err(ProtocolError::BadRequestMagic(0x2560_9500))
        );
    }

    #[test]
    fn requests_are_checked_against_the_export() {
        let size = 1 << 20;
        let export = export();
        let ok = |command, flags, offset, length| {
            request(command, flags, offset, length).interpret(&export)
        };
        assert_eq!(
            ok(NBD_CMD_READ, 0, 0, 4096),
            Ok(Command::Read {
                offset: 0,
                length: 4096
            })
        );
        assert_eq!(
            ok(NBD_CMD_READ, 0, size - 1, 1),
            Ok(Command::Read {
                offset: size - 1,
                length: 1
            })
        );
        assert_eq!(ok(NBD_CMD_READ, 0, size - 1, 2), Err(Errno::EINVAL));
        assert_eq!(
            ok(NBD_CMD_READ, 0, u64::MAX, 2),
            Err(Errno::EINVAL),
            "no overflow"
        );
        assert_eq!(ok(NBD_CMD_READ, 0, 0, MAX_PAYLOAD + 1), Err(Errno::EINVAL));
        assert_eq!(
            ok(NBD_CMD_WRITE, NBD_CMD_FLAG_FUA, 512, 512),
            Ok(Command::Write {
                offset: 512,
                length: 512,
                fua: true
            })
        );
        assert_eq!(ok(NBD_CMD_WRITE, 0, size, 1), Err(Errno::ENOSPC));
        assert_eq!(ok(NBD_CMD_WRITE, 0, 0, MAX_PAYLOAD + 1), Err(Errno::EINVAL));
        assert_eq!(ok(NBD_CMD_FLUSH, 0, 0, 0), Ok(Command::Flush));
        assert_eq!(
            ok(NBD_CMD_TRIM, 0, 0, 8192),
            Ok(Command::Trim {
                offset: 0,
                length: 8192,
                fua: false
            })
        );
        assert_eq!(ok(NBD_CMD_TRIM, 0, size, 1), Err(Errno::EINVAL));
        assert_eq!(
            ok(
                NBD_CMD_WRITE_ZEROES,
                NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FUA,
                0,
                8192
            ),
            Ok(Command::WriteZeroes {
                offset: 0,
                length: 8192,
                fua: true
            })
        );
        assert_eq!(ok(NBD_CMD_WRITE_ZEROES, 0, size, 1), Err(Errno::ENOSPC));
        assert_eq!(
            ok(NBD_CMD_WRITE_ZEROES, NBD_CMD_FLAG_FAST_ZERO, 0, 1),
            Err(Errno::EINVAL)
        );
        assert_eq!(
            ok(NBD_CMD_WRITE, NBD_CMD_FLAG_NO_HOLE, 0, 1),
            Err(Errno::EINVAL)
        );
        assert_eq!(ok(NBD_CMD_READ, NBD_CMD_FLAG_DF, 0, 1), Err(Errno::EINVAL));
        assert_eq!(ok(NBD_CMD_DISC, 0, 0, 0), Ok(Command::Disconnect));
        for unknown in [NBD_CMD_CACHE, NBD_CMD_BLOCK_STATUS, 99] {
            assert_eq!(ok(unknown, 0, 0, 1), Err(Errno::EINVAL));
        }
    }

    #[test]
    fn read_only_exports_refuse_writes_with_eperm() {
        let export = Export {
            read_only: true,
            ..export()
        };
        for command in [NBD_CMD_WRITE, NBD_CMD_TRIM, NBD_CMD_WRITE_ZEROES] {
            assert_eq!(
                request(command, 0, 0, 512).interpret(&export),
                Err(Errno::EPERM)
            );
        }
        assert!(request(NBD_CMD_READ, 0, 0, 512).interpret(&export).is_ok());
        assert_eq!(
            request(NBD_CMD_FLUSH, 0, 0, 0).interpret(&export),
            Ok(Command::Flush)
        );
    }

    #[test]
    fn io_errors_map_to_nbd_errnos() {
        let errno = |kind| Errno::from_io(&io::Error::from(kind));
        assert_eq!(errno(io::ErrorKind::InvalidInput), Errno::EINVAL);
        assert_eq!(errno(io::ErrorKind::PermissionDenied), Errno::EPERM);
        assert_eq!(errno(io::ErrorKind::StorageFull), Errno::ENOSPC);
        assert_eq!(errno(io::ErrorKind::OutOfMemory), Errno::ENOSPC);
        assert_eq!(errno(io::ErrorKind::TimedOut), Errno::EIO);
        assert_eq!(Errno::from_io(&io::Error::other("boom")), Errno::EIO);
    }

    #[test]
    fn simple_replies_carry_magic_error_and_cookie() {
        let reply = simple_reply(7, Some(Errno::EPERM));
        assert_eq!(
            reply,
            [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 7]
        );
        assert_eq!(&simple_reply(7, None)[4..8], &[0, 0, 0, 0]);
    }
}
