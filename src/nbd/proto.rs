//! The NBD wire format (NetworkBlockDevice/nbd `doc/proto.md`): constants,
//! and pure encoders/decoders for the fixed newstyle handshake, options,
//! option replies, requests, simple replies and structured reply chunks.
//!
//! No I/O here: decoders take the bytes the server has read, encoders
//! return the bytes it must send. Every integer is big-endian. Decoders
//! reject what the spec forbids (bad magic, unknown client flags, strings
//! that are not UTF-8 or longer than 4096 bytes, lengths that overrun the
//! option) with a [`ProtoError`] instead of guessing.

/// `NBDMAGIC`, the first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the newstyle greeting, and the magic of every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Transmission flags.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_FUA: u16 = 1 << 3;
pub const FLAG_ROTATIONAL: u16 = 1 << 4;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const FLAG_SEND_DF: u16 = 1 << 7;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

// Option reply types; errors have bit 31 set.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
pub const REP_ERR_POLICY: u32 = 0x8000_0002;
pub const REP_ERR_INVALID: u32 = 0x8000_0003;
pub const REP_ERR_PLATFORM: u32 = 0x8000_0004;
pub const REP_ERR_TLS_REQD: u32 = 0x8000_0005;
pub const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
pub const REP_ERR_SHUTDOWN: u32 = 0x8000_0007;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = 0x8000_0008;
pub const REP_ERR_TOO_BIG: u32 = 0x8000_0009;

// NBD_REP_INFO types.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// Structured replies.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = 0x8001;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = 0x8002;

// `base:allocation` status flags.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

/// The one metadata context asiffs offers.
pub const BASE_ALLOCATION: &str = "base:allocation";

// Error values (the spec's fixed subset of errno).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// Longest string the spec allows (export names, queries, messages).
pub const MAX_STRING: usize = 4096;

/// Sizes of the fixed-length messages.
pub const OPTION_HEADER_LEN: usize = 16;
pub const REQUEST_LEN: usize = 28;

/// What a decoder refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("bad magic {0:#x}")]
    BadMagic(u64),
    #[error("unknown client flags {0:#x}")]
    UnknownClientFlags(u32),
    #[error("option data ends early")]
    Truncated,
    #[error("option data has {0} bytes left over")]
    TrailingBytes(usize),
    #[error("string is not UTF-8 or is longer than 4096 bytes")]
    BadString,
}

/// The server's first 18 bytes: `NBDMAGIC`, `IHAVEOPT`, handshake flags.
pub fn greeting(handshake_flags: u16) -> [u8; 18] {
    let mut b = [0u8; 18];
    b[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..18].copy_from_slice(&handshake_flags.to_be_bytes());
    b
}

/// The client flags, checked against what the server offered (the spec
/// makes the server drop a client that sets anything else).
pub fn decode_client_flags(b: [u8; 4], offered: u16) -> Result<u32, ProtoError> {
    let flags = u32::from_be_bytes(b);
    let mut known = FLAG_C_FIXED_NEWSTYLE;
    if offered & FLAG_NO_ZEROES != 0 {
        known |= FLAG_C_NO_ZEROES;
    }
    if flags & !known != 0 {
        return Err(ProtoError::UnknownClientFlags(flags));
    }
    Ok(flags)
}

/// An option header: `IHAVEOPT`, option, length of the data that follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub len: u32,
}

impl OptionHeader {
    pub fn decode(b: &[u8; OPTION_HEADER_LEN]) -> Result<Self, ProtoError> {
        let magic = u64::from_be_bytes(b[0..8].try_into().expect("8 bytes"));
        if magic != IHAVEOPT {
            return Err(ProtoError::BadMagic(magic));
        }
        Ok(OptionHeader {
            option: be32(&b[8..12]),
            len: be32(&b[12..16]),
        })
    }

    pub fn encode(&self) -> [u8; OPTION_HEADER_LEN] {
        let mut b = [0u8; OPTION_HEADER_LEN];
        b[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        b[8..12].copy_from_slice(&self.option.to_be_bytes());
        b[12..16].copy_from_slice(&self.len.to_be_bytes());
        b
    }
}

/// One option reply: magic, option, reply type, length, data.
pub fn option_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(20 + data.len());
    v.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&reply.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

/// Data of `NBD_REP_SERVER`: the export name, length-prefixed.
pub fn rep_server(name: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + name.len());
    v.extend_from_slice(&(name.len() as u32).to_be_bytes());
    v.extend_from_slice(name.as_bytes());
    v
}

/// Data of `NBD_REP_INFO` / `NBD_INFO_EXPORT`.
pub fn info_export(size: u64, transmission_flags: u16) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[0..2].copy_from_slice(&INFO_EXPORT.to_be_bytes());
    b[2..10].copy_from_slice(&size.to_be_bytes());
    b[10..12].copy_from_slice(&transmission_flags.to_be_bytes());
    b
}

/// Data of `NBD_REP_INFO` / `NBD_INFO_NAME`.
pub fn info_name(name: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(2 + name.len());
    v.extend_from_slice(&INFO_NAME.to_be_bytes());
    v.extend_from_slice(name.as_bytes());
    v
}

/// Data of `NBD_REP_INFO` / `NBD_INFO_BLOCK_SIZE`.
pub fn info_block_size(minimum: u32, preferred: u32, maximum: u32) -> [u8; 14] {
    let mut b = [0u8; 14];
    b[0..2].copy_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    b[2..6].copy_from_slice(&minimum.to_be_bytes());
    b[6..10].copy_from_slice(&preferred.to_be_bytes());
    b[10..14].copy_from_slice(&maximum.to_be_bytes());
    b
}

/// Data of `NBD_REP_META_CONTEXT`: context id, then its name.
pub fn meta_context(id: u32, name: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + name.len());
    v.extend_from_slice(&id.to_be_bytes());
    v.extend_from_slice(name.as_bytes());
    v
}

/// The reply to `NBD_OPT_EXPORT_NAME`: size, transmission flags, and 124
/// zero bytes unless the client asked for none.
pub fn export_name_reply(size: u64, transmission_flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut v = Vec::with_capacity(134);
    v.extend_from_slice(&size.to_be_bytes());
    v.extend_from_slice(&transmission_flags.to_be_bytes());
    if !no_zeroes {
        v.extend_from_slice(&[0u8; 124]);
    }
    v
}

/// The data of `NBD_OPT_INFO` / `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub requests: Vec<u16>,
}

impl InfoRequest {
    pub fn decode(data: &[u8]) -> Result<Self, ProtoError> {
        let mut r = Reader::new(data);
        let name = r.string32()?;
        let n = r.u16()?;
        let requests = (0..n).map(|_| r.u16()).collect::<Result<Vec<_>, _>>()?;
        r.finish()?;
        Ok(InfoRequest { name, requests })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut v = rep_server(&self.name);
        v.extend_from_slice(&(self.requests.len() as u16).to_be_bytes());
        for i in &self.requests {
            v.extend_from_slice(&i.to_be_bytes());
        }
        v
    }
}

/// The data of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    pub name: String,
    pub queries: Vec<String>,
}

impl MetaContextRequest {
    pub fn decode(data: &[u8]) -> Result<Self, ProtoError> {
        let mut r = Reader::new(data);
        let name = r.string32()?;
        let n = r.u32()?;
        // Each query takes at least its 4-byte length: a count the data
        // cannot hold is refused before anything is allocated for it.
        if u64::from(n) * 4 > r.remaining() as u64 {
            return Err(ProtoError::Truncated);
        }
        let queries = (0..n)
            .map(|_| r.string32())
            .collect::<Result<Vec<_>, _>>()?;
        r.finish()?;
        Ok(MetaContextRequest { name, queries })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut v = rep_server(&self.name);
        v.extend_from_slice(&(self.queries.len() as u32).to_be_bytes());
        for q in &self.queries {
            v.extend_from_slice(&rep_server(q));
        }
        v
    }
}

/// A transmission request header (any write payload follows it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: u16,
    pub handle: u64,
    pub offset: u64,
    pub len: u32,
}

impl Request {
    pub fn decode(b: &[u8; REQUEST_LEN]) -> Result<Self, ProtoError> {
        let magic = be32(&b[0..4]);
        if magic != REQUEST_MAGIC {
            return Err(ProtoError::BadMagic(magic.into()));
        }
        Ok(Request {
            flags: u16::from_be_bytes([b[4], b[5]]),
            command: u16::from_be_bytes([b[6], b[7]]),
            handle: be64(&b[8..16]),
            offset: be64(&b[16..24]),
            len: be32(&b[24..28]),
        })
    }

    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.command.to_be_bytes());
        b[8..16].copy_from_slice(&self.handle.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.len.to_be_bytes());
        b
    }
}

/// A simple reply header (read data, if any, follows it).
pub fn simple_reply(handle: u64, error: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&handle.to_be_bytes());
    b
}

/// A structured reply chunk header; `len` bytes of payload follow.
pub fn chunk_header(flags: u16, kind: u16, handle: u64, len: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&handle.to_be_bytes());
    b[16..20].copy_from_slice(&len.to_be_bytes());
    b
}

fn done(last: bool) -> u16 {
    if last {
        REPLY_FLAG_DONE
    } else {
        0
    }
}

/// `NBD_REPLY_TYPE_NONE`, always final.
pub fn chunk_none(handle: u64) -> [u8; 20] {
    chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, handle, 0)
}

/// Header and offset of an `NBD_REPLY_TYPE_OFFSET_DATA` chunk; the caller
/// sends `data_len` bytes of data after it. `data_len` must be at most
/// `u32::MAX - 8`.
pub fn chunk_offset_data_header(handle: u64, offset: u64, data_len: u32, last: bool) -> [u8; 28] {
    let mut b = [0u8; 28];
    b[0..20].copy_from_slice(&chunk_header(
        done(last),
        REPLY_TYPE_OFFSET_DATA,
        handle,
        data_len + 8,
    ));
    b[20..28].copy_from_slice(&offset.to_be_bytes());
    b
}

/// An `NBD_REPLY_TYPE_OFFSET_HOLE` chunk: `len` (nonzero) bytes of zeros at `offset`.
pub fn chunk_offset_hole(handle: u64, offset: u64, len: u32, last: bool) -> [u8; 32] {
    let mut b = [0u8; 32];
    b[0..20].copy_from_slice(&chunk_header(
        done(last),
        REPLY_TYPE_OFFSET_HOLE,
        handle,
        12,
    ));
    b[20..28].copy_from_slice(&offset.to_be_bytes());
    b[28..32].copy_from_slice(&len.to_be_bytes());
    b
}

/// An `NBD_REPLY_TYPE_BLOCK_STATUS` chunk for one context: descriptors of
/// (length, status flags).
pub fn chunk_block_status(
    handle: u64,
    context: u32,
    extents: &[(u32, u32)],
    last: bool,
) -> Vec<u8> {
    let len = 4 + 8 * extents.len();
    let mut v = Vec::with_capacity(20 + len);
    v.extend_from_slice(&chunk_header(
        done(last),
        REPLY_TYPE_BLOCK_STATUS,
        handle,
        len as u32,
    ));
    v.extend_from_slice(&context.to_be_bytes());
    for (l, f) in extents {
        v.extend_from_slice(&l.to_be_bytes());
        v.extend_from_slice(&f.to_be_bytes());
    }
    v
}

/// An `NBD_REPLY_TYPE_ERROR` chunk with a message for a human (cut to
/// what the 16-bit length can say, at a character boundary).
pub fn chunk_error(handle: u64, error: u32, message: &str, last: bool) -> Vec<u8> {
    let mut end = message.len().min(MAX_STRING);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let msg = &message.as_bytes()[..end];
    let mut v = Vec::with_capacity(26 + msg.len());
    v.extend_from_slice(&chunk_header(
        done(last),
        REPLY_TYPE_ERROR,
        handle,
        6 + msg.len() as u32,
    ));
    v.extend_from_slice(&error.to_be_bytes());
    v.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    v.extend_from_slice(msg);
    v
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b.try_into().expect("4 bytes"))
}

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b.try_into().expect("8 bytes"))
}

/// A bounds-checked cursor over option data.
struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(data: &'a [u8]) -> Self {
        Reader { data, pos: 0 }
    }

    fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        if n > self.remaining() {
            return Err(ProtoError::Truncated);
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u16(&mut self) -> Result<u16, ProtoError> {
        Ok(u16::from_be_bytes(self.take(2)?.try_into().expect("2")))
    }

    fn u32(&mut self) -> Result<u32, ProtoError> {
        Ok(be32(self.take(4)?))
    }

    /// A 32-bit length, then that many bytes of UTF-8.
    fn string32(&mut self) -> Result<String, ProtoError> {
        let n = self.u32()? as usize;
        if n > MAX_STRING {
            return Err(ProtoError::BadString);
        }
        let b = self.take(n)?;
        match std::str::from_utf8(b) {
            Ok(s) if !s.contains('\0') => Ok(s.to_string()),
            _ => Err(ProtoError::BadString),
        }
    }

    fn finish(&self) -> Result<(), ProtoError> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(ProtoError::TrailingBytes(n)),
        }
    }
}

/// The text of an export name sent with `NBD_OPT_EXPORT_NAME` (the whole
/// option data, no length prefix).
pub fn decode_export_name(data: &[u8]) -> Result<String, ProtoError> {
    if data.len() > MAX_STRING {
        return Err(ProtoError::BadString);
    }
    match std::str::from_utf8(data) {
        Ok(s) if !s.contains('\0') => Ok(s.to_string()),
        _ => Err(ProtoError::BadString),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting_bytes() {
        assert_eq!(
            greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES),
            *b"NBDMAGICIHAVEOPT\x00\x03"
        );
    }

    #[test]
    fn magic_numbers_spell_their_names() {
        assert_eq!(&NBDMAGIC.to_be_bytes(), b"NBDMAGIC");
        assert_eq!(&IHAVEOPT.to_be_bytes(), b"IHAVEOPT");
        assert_eq!(
            REPLY_MAGIC.to_be_bytes(),
            [0x00, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9]
        );
    }

    #[test]
    fn client_flags() {
        let offered = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES;
        assert_eq!(decode_client_flags([0, 0, 0, 3], offered), Ok(3));
        assert_eq!(decode_client_flags([0, 0, 0, 0], offered), Ok(0));
        assert_eq!(
            decode_client_flags([0, 0, 0, 4], offered),
            Err(ProtoError::UnknownClientFlags(4))
        );
        // NO_ZEROES is only valid when the server offered it.
        assert_eq!(
            decode_client_flags([0, 0, 0, 2], FLAG_FIXED_NEWSTYLE),
            Err(ProtoError::UnknownClientFlags(2))
        );
    }

    #[test]
    fn option_header() {
        let b = *b"IHAVEOPT\x00\x00\x00\x07\x00\x00\x00\x0a";
        let h = OptionHeader::decode(&b).unwrap();
        assert_eq!(
            h,
            OptionHeader {
                option: OPT_GO,
                len: 10
            }
        );
        assert_eq!(h.encode(), b);
        let bad = *b"IHAVEOPX\x00\x00\x00\x07\x00\x00\x00\x0a";
        assert_eq!(
            OptionHeader::decode(&bad),
            Err(ProtoError::BadMagic(0x4948_4156_454f_5058))
        );
    }

    #[test]
    fn option_replies() {
        assert_eq!(
            option_reply(OPT_LIST, REP_ACK, &[]),
            [0x00, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9, 0, 0, 0, 3, 0, 0, 0, 1, 0, 0, 0, 0]
        );
        assert_eq!(
            option_reply(OPT_LIST, REP_SERVER, &rep_server("ab")),
            [
                0x00, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9, 0, 0, 0, 3, 0, 0, 0, 2, 0, 0, 0, 6,
                0, 0, 0, 2, b'a', b'b'
            ]
        );
        assert_eq!(
            option_reply(OPT_STARTTLS, REP_ERR_TLS_REQD, &[])[12..16],
            [0x80, 0, 0, 5]
        );
        assert_eq!(REP_ERR_UNKNOWN.to_be_bytes(), [0x80, 0, 0, 6]);
        assert_eq!(REP_ERR_TOO_BIG.to_be_bytes(), [0x80, 0, 0, 9]);
    }

    #[test]
    fn info_replies() {
        assert_eq!(
            info_export(0x1_0000_0000, FLAG_HAS_FLAGS | FLAG_SEND_FLUSH),
            [0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 5]
        );
        assert_eq!(info_name("d"), [0, 1, b'd']);
        assert_eq!(
            info_block_size(1, 4096, 32 << 20),
            [0, 3, 0, 0, 0, 1, 0, 0, 0x10, 0, 0x02, 0, 0, 0]
        );
        assert_eq!(meta_context(1, "base:allocation")[..5], [0, 0, 0, 1, b'b']);
    }

    #[test]
    fn export_name_reply_bytes() {
        let r = export_name_reply(512, 0x0103, false);
        assert_eq!(r.len(), 134);
        assert_eq!(r[..10], [0, 0, 0, 0, 0, 0, 2, 0, 1, 3]);
        assert!(r[10..].iter().all(|&b| b == 0));
        assert_eq!(export_name_reply(512, 0x0103, true).len(), 10);
    }

    #[test]
    fn info_request() {
        let data = [0, 0, 0, 3, b'a', b'b', b'c', 0, 2, 0, 3, 0, 1];
        let r = InfoRequest::decode(&data).unwrap();
        assert_eq!(
            r,
            InfoRequest {
                name: "abc".into(),
                requests: vec![INFO_BLOCK_SIZE, INFO_NAME]
            }
        );
        assert_eq!(r.encode(), data);
        assert_eq!(
            InfoRequest::decode(&[0, 0, 0, 5, b'a']),
            Err(ProtoError::Truncated)
        );
        assert_eq!(
            InfoRequest::decode(&[0, 0, 0, 0, 0, 0, 9]),
            Err(ProtoError::TrailingBytes(1))
        );
        assert_eq!(
            InfoRequest::decode(&[0, 0, 0, 1, 0xff, 0, 0]),
            Err(ProtoError::BadString)
        );
        assert_eq!(
            InfoRequest::decode(&[0, 0, 0x10, 1]),
            Err(ProtoError::BadString)
        );
    }

    #[test]
    fn meta_context_request() {
        let mut data = vec![0, 0, 0, 1, b'x', 0, 0, 0, 1, 0, 0, 0, 15];
        data.extend_from_slice(b"base:allocation");
        let r = MetaContextRequest::decode(&data).unwrap();
        assert_eq!(r.name, "x");
        assert_eq!(r.queries, vec![BASE_ALLOCATION.to_string()]);
        assert_eq!(r.encode(), data);
        // A count the data cannot hold.
        assert_eq!(
            MetaContextRequest::decode(&[0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]),
            Err(ProtoError::Truncated)
        );
    }

    #[test]
    fn request_bytes() {
        let b = [
            0x25, 0x60, 0x95, 0x13, 0, 1, 0, 1, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0, 0, 0, 0x10, 0,
            0, 0, 2, 0,
        ];
        let r = Request::decode(&b).unwrap();
        assert_eq!(
            r,
            Request {
                flags: CMD_FLAG_FUA,
                command: CMD_WRITE,
                handle: 0x0102_0304_0506_0708,
                offset: 4096,
                len: 512
            }
        );
        assert_eq!(r.encode(), b);
        let mut bad = b;
        bad[3] = 0x14;
        assert_eq!(
            Request::decode(&bad),
            Err(ProtoError::BadMagic(0x2560_9514))
        );
    }

    #[test]
    fn simple_reply_bytes() {
        assert_eq!(
            simple_reply(0x0102_0304_0506_0708, EINVAL),
            [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 22, 1, 2, 3, 4, 5, 6, 7, 8]
        );
    }

    #[test]
    fn structured_chunks() {
        assert_eq!(
            chunk_none(9),
            [0x66, 0x8e, 0x33, 0xef, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 0]
        );
        assert_eq!(
            chunk_offset_data_header(9, 0x200, 4, true),
            [
                0x66, 0x8e, 0x33, 0xef, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 12, 0, 0, 0,
                0, 0, 0, 2, 0
            ]
        );
        assert_eq!(
            chunk_offset_hole(9, 0x200, 0x1000, false),
            [
                0x66, 0x8e, 0x33, 0xef, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 12, 0, 0, 0,
                0, 0, 0, 2, 0, 0, 0, 0x10, 0
            ]
        );
        assert_eq!(
            chunk_block_status(
                9,
                1,
                &[(0x1000, 0), (0x2000, STATE_HOLE | STATE_ZERO)],
                true
            ),
            [
                0x66, 0x8e, 0x33, 0xef, 0, 1, 0, 5, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 20, 0, 0, 0,
                1, 0, 0, 0x10, 0, 0, 0, 0, 0, 0, 0, 0x20, 0, 0, 0, 0, 3
            ]
        );
        assert_eq!(
            chunk_error(9, EPERM, "ro", true),
            [
                0x66, 0x8e, 0x33, 0xef, 0, 1, 0x80, 1, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 8, 0, 0, 0,
                1, 0, 2, b'r', b'o'
            ]
        );
        // A message cut inside a multi-byte character stops before it.
        let long = format!("{}é", "a".repeat(MAX_STRING - 1));
        let c = chunk_error(1, EIO, &long, true);
        assert_eq!(c.len(), 26 + MAX_STRING - 1);
    }

    proptest::proptest! {
        /// Whatever a client sends, the decoders answer without panicking,
        /// and what they accept encodes back to the same bytes.
        #[test]
        fn decoders_take_any_bytes(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            if let Ok(r) = InfoRequest::decode(&data) {
                proptest::prop_assert_eq!(r.encode(), data.clone());
            }
            if let Ok(r) = MetaContextRequest::decode(&data) {
                proptest::prop_assert_eq!(r.encode(), data.clone());
            }
            let _ = decode_export_name(&data);
            if data.len() >= REQUEST_LEN {
                let b: [u8; REQUEST_LEN] = data[..REQUEST_LEN].try_into().unwrap();
                if let Ok(r) = Request::decode(&b) {
                    proptest::prop_assert_eq!(r.encode(), b);
                }
            }
        }

        #[test]
        fn requests_round_trip(flags: u16, command: u16, handle: u64, offset: u64, len: u32) {
            let r = Request { flags, command, handle, offset, len };
            proptest::prop_assert_eq!(Request::decode(&r.encode()), Ok(r));
        }
    }

    #[test]
    fn export_names() {
        assert_eq!(decode_export_name(b"disk"), Ok("disk".into()));
        assert_eq!(decode_export_name(b""), Ok("".into()));
        assert_eq!(decode_export_name(b"a\0b"), Err(ProtoError::BadString));
        assert_eq!(
            decode_export_name(&[b'a'; MAX_STRING + 1]),
            Err(ProtoError::BadString)
        );
    }
}
