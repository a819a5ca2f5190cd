//! `asiffs serve` spoken to byte by byte over a Unix socket, in process:
//! a well-behaved session (list, info, go, I/O, block status, trim, write
//! zeroes, FUA), hostile clients (bad magic, unknown flags, oversize and
//! out-of-order options, requests past the end or over the size limit,
//! slow and vanishing peers), each followed by a check that a second
//! client is still served, and TLS (STARTTLS required, then a rustls
//! client). Every expected value comes from the NBD spec (doc/proto.md).
//! The payload memory, payload deadline and skip-log tests run `asiffs
//! serve -f` as a child process, to read its /proc status and its log.
//!
//! tests/data/nbd-tls holds a throwaway CA and server key made with
//! openssl for these tests only.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use asiffs::disk::Disk;
use asiffs::nbd::proto::*;
use asiffs::nbd::server::{Config, Export, Server};
use asiffs::registry;
use asiffs::{CreateOptions, Image, LockMode, OpenOptions};

const MIB: u64 = 1 << 20;

struct Fixture {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    image_a: PathBuf,
    disk_a: Arc<dyn Disk>,
    server: Arc<Server>,
}

/// Exports `a` (8 MiB, writable) and `b` (4 MiB, read-only).
fn start(config: Config) -> Fixture {
    start_sized(config, 8 * MIB)
}

/// As [`start`], with `a` of `size_a` bytes.
fn start_sized(config: Config, size_a: u64) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let mut exports = Vec::new();
    let mut disk_a = None;
    for (name, size, ro) in [("a", size_a, false), ("b", 4 * MIB, true)] {
        let path = dir.path().join(format!("{name}.asif"));
        let opts = CreateOptions {
            size,
            ..CreateOptions::default()
        };
        Image::create(&path, &opts).unwrap().close().unwrap();
        let d: Arc<dyn Disk> =
            Arc::from(registry::open(&path, None, &OpenOptions::writable()).unwrap());
        if name == "a" {
            disk_a = Some(Arc::clone(&d));
        }
        exports.push(Export {
            name: name.into(),
            disk: d,
            read_only: ro,
        });
    }
    let socket = dir.path().join("nbd.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let server = Server::new(exports, config);
    let serving = Arc::clone(&server);
    std::thread::spawn(move || serving.serve_unix(listener));
    Fixture {
        image_a: dir.path().join("a.asif"),
        _dir: dir,
        socket,
        disk_a: disk_a.unwrap(),
        server,
    }
}

struct Client<S: Read + Write> {
    s: S,
}

type Plain = Client<UnixStream>;

fn connect(f: &Fixture) -> Plain {
    connect_to(&f.socket)
}

fn connect_to(socket: &Path) -> Plain {
    let s = UnixStream::connect(socket).unwrap();
    // A server that stops answering fails the test instead of hanging it.
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    Client { s }
}

struct Chunk {
    flags: u16,
    kind: u16,
    handle: u64,
    payload: Vec<u8>,
}

impl<S: Read + Write> Client<S> {
    fn read_n(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.s.read_exact(&mut b).unwrap();
        b
    }

    fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).unwrap();
        self.s.flush().unwrap();
    }

    /// Reads the greeting and answers with `flags`.
    fn greet(&mut self, flags: u32) {
        assert_eq!(self.read_n(18), b"NBDMAGICIHAVEOPT\x00\x03");
        self.send(&flags.to_be_bytes());
    }

    fn option(&mut self, option: u32, data: &[u8]) {
        let h = OptionHeader {
            option,
            len: data.len() as u32,
        };
        self.send(&h.encode());
        self.send(data);
    }

    /// One option reply: (option, reply type, data).
    fn reply(&mut self) -> (u32, u32, Vec<u8>) {
        let h = self.read_n(20);
        assert_eq!(h[0..8], REPLY_MAGIC.to_be_bytes(), "option reply magic");
        let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        (opt, kind, self.read_n(len as usize))
    }

    fn reply_type(&mut self, option: u32) -> u32 {
        let (opt, kind, _) = self.reply();
        assert_eq!(opt, option);
        kind
    }

    /// Structured replies, `base:allocation`, then GO: the export's size
    /// and transmission flags.
    fn go(&mut self, name: &str) -> (u64, u16) {
        self.option(OPT_STRUCTURED_REPLY, &[]);
        assert_eq!(self.reply_type(OPT_STRUCTURED_REPLY), REP_ACK);
        let m = MetaContextRequest {
            name: name.into(),
            queries: vec![BASE_ALLOCATION.into()],
        };
        self.option(OPT_SET_META_CONTEXT, &m.encode());
        let (_, kind, data) = self.reply();
        assert_eq!(kind, REP_META_CONTEXT);
        assert_eq!(data, meta_context(1, BASE_ALLOCATION));
        assert_eq!(self.reply_type(OPT_SET_META_CONTEXT), REP_ACK);
        let r = InfoRequest {
            name: name.into(),
            requests: vec![INFO_BLOCK_SIZE],
        };
        self.option(OPT_GO, &r.encode());
        let (_, kind, data) = self.reply();
        assert_eq!(kind, REP_INFO);
        assert_eq!(data.len(), 12);
        assert_eq!(data[0..2], INFO_EXPORT.to_be_bytes());
        let size = u64::from_be_bytes(data[2..10].try_into().unwrap());
        let flags = u16::from_be_bytes(data[10..12].try_into().unwrap());
        let (_, kind, data) = self.reply();
        assert_eq!(kind, REP_INFO);
        assert_eq!(data, info_block_size(1, 4096, 32 << 20));
        assert_eq!(self.reply_type(OPT_GO), REP_ACK);
        (size, flags)
    }

    fn request(&mut self, flags: u16, command: u16, handle: u64, offset: u64, len: u32) {
        let r = Request {
            flags,
            command,
            handle,
            offset,
            len,
        };
        self.send(&r.encode());
    }

    /// A simple reply: its error value.
    fn simple(&mut self, handle: u64) -> u32 {
        let h = self.read_n(16);
        assert_eq!(
            h[0..4],
            SIMPLE_REPLY_MAGIC.to_be_bytes(),
            "simple reply magic"
        );
        assert_eq!(u64::from_be_bytes(h[8..16].try_into().unwrap()), handle);
        u32::from_be_bytes(h[4..8].try_into().unwrap())
    }

    /// The outcome of a request without read data: a simple reply, or
    /// (structured replies only) a final error chunk. 0 for success.
    fn status(&mut self, handle: u64) -> u32 {
        let magic = self.read_n(4);
        let rest = if magic == SIMPLE_REPLY_MAGIC.to_be_bytes() {
            self.read_n(12)
        } else {
            assert_eq!(magic, STRUCTURED_REPLY_MAGIC.to_be_bytes(), "reply magic");
            let h = self.read_n(16);
            assert_eq!(h[2..4], REPLY_TYPE_ERROR.to_be_bytes());
            assert_eq!(h[0..2], REPLY_FLAG_DONE.to_be_bytes());
            let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let p = self.read_n(len as usize);
            [&p[0..4], &h[4..12]].concat()
        };
        assert_eq!(u64::from_be_bytes(rest[4..12].try_into().unwrap()), handle);
        u32::from_be_bytes(rest[0..4].try_into().unwrap())
    }

    fn chunk(&mut self) -> Chunk {
        let h = self.read_n(20);
        assert_eq!(h[0..4], STRUCTURED_REPLY_MAGIC.to_be_bytes(), "chunk magic");
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        Chunk {
            flags: u16::from_be_bytes([h[4], h[5]]),
            kind: u16::from_be_bytes([h[6], h[7]]),
            handle: u64::from_be_bytes(h[8..16].try_into().unwrap()),
            payload: self.read_n(len as usize),
        }
    }

    /// A reply that is one final error chunk: its error value.
    fn error_chunk(&mut self, handle: u64) -> u32 {
        let c = self.chunk();
        assert_eq!(
            (c.kind, c.flags, c.handle),
            (REPLY_TYPE_ERROR, REPLY_FLAG_DONE, handle)
        );
        u32::from_be_bytes(c.payload[0..4].try_into().unwrap())
    }

    fn write(&mut self, handle: u64, offset: u64, data: &[u8], flags: u16) -> u32 {
        self.request(flags, CMD_WRITE, handle, offset, data.len() as u32);
        self.send(data);
        self.status(handle)
    }

    /// A structured read, reassembled; checks the chunks stay in range.
    fn read(&mut self, handle: u64, offset: u64, len: u32) -> (Vec<u8>, Vec<(u16, u64, u64)>) {
        self.request(0, CMD_READ, handle, offset, len);
        let mut out = vec![0xeeu8; len as usize];
        let mut chunks = Vec::new();
        loop {
            let c = self.chunk();
            assert_eq!(c.handle, handle);
            let at = u64::from_be_bytes(c.payload[0..8].try_into().unwrap());
            let rel = (at - offset) as usize;
            match c.kind {
                REPLY_TYPE_OFFSET_DATA => {
                    let d = &c.payload[8..];
                    out[rel..rel + d.len()].copy_from_slice(d);
                    chunks.push((c.kind, at, d.len() as u64));
                }
                REPLY_TYPE_OFFSET_HOLE => {
                    let n = u32::from_be_bytes(c.payload[8..12].try_into().unwrap()) as usize;
                    out[rel..rel + n].fill(0);
                    chunks.push((c.kind, at, n as u64));
                }
                k => panic!("unexpected chunk type {k:#x}"),
            }
            if c.flags & REPLY_FLAG_DONE != 0 {
                break;
            }
        }
        (out, chunks)
    }

    /// `base:allocation` descriptors for a range.
    fn block_status(&mut self, handle: u64, offset: u64, len: u32, flags: u16) -> Vec<(u32, u32)> {
        self.request(flags, CMD_BLOCK_STATUS, handle, offset, len);
        let c = self.chunk();
        assert_eq!(
            (c.kind, c.flags, c.handle),
            (REPLY_TYPE_BLOCK_STATUS, REPLY_FLAG_DONE, handle)
        );
        assert_eq!(c.payload[0..4], 1u32.to_be_bytes(), "context id");
        c.payload[4..]
            .chunks(8)
            .map(|d| {
                (
                    u32::from_be_bytes(d[0..4].try_into().unwrap()),
                    u32::from_be_bytes(d[4..8].try_into().unwrap()),
                )
            })
            .collect()
    }

    /// The server has closed the connection (EOF or reset), with nothing
    /// more sent.
    fn expect_closed(&mut self) {
        let mut b = [0u8; 1];
        match self.s.read(&mut b) {
            Ok(0) => {}
            Ok(_) => panic!("server sent more after it should have closed"),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            Err(e) => panic!("expected the server to close the connection: {e}"),
        }
    }
}

const HOLE: u32 = STATE_HOLE | STATE_ZERO;
const FLAGS: u32 = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;

/// A client past the greeting, having answered with [`FLAGS`].
fn greeted(f: &Fixture) -> Plain {
    let mut c = connect(f);
    c.greet(FLAGS);
    c
}

/// A client in transmission on export `a`, with structured replies and
/// `base:allocation` (see [`Client::go`]).
fn session_a(f: &Fixture) -> Plain {
    let mut c = greeted(f);
    c.go("a");
    c
}

/// `a.asif` opened apart from the server, without a lock: what another
/// reader of the file sees.
fn other_reader(f: &Fixture) -> Image {
    Image::open(
        &f.image_a,
        &OpenOptions {
            lock: LockMode::None,
            ..OpenOptions::default()
        },
    )
    .unwrap()
}

/// A fresh client still gets served: GO on `a`, and a read of what
/// `expect` says lies at 1 MiB.
fn still_serves(f: &Fixture, expect: u8) {
    let mut c = greeted(f);
    assert_eq!(c.go("a").0, 8 * MIB);
    let (data, _) = c.read(77, MIB, 4096);
    assert!(data.iter().all(|&b| b == expect), "data at 1 MiB");
    c.request(0, CMD_DISC, 78, 0, 0);
    c.expect_closed();
}

#[test]
fn well_behaved_session() {
    let f = start(Config::default());
    let mut c = greeted(&f);

    c.option(OPT_LIST, &[]);
    assert_eq!(c.reply(), (OPT_LIST, REP_SERVER, rep_server("a")));
    assert_eq!(c.reply(), (OPT_LIST, REP_SERVER, rep_server("b")));
    assert_eq!(c.reply(), (OPT_LIST, REP_ACK, vec![]));

    // INFO: size and flags of the read-only export, with its name.
    let r = InfoRequest {
        name: "b".into(),
        requests: vec![INFO_NAME],
    };
    c.option(OPT_INFO, &r.encode());
    let ro =
        FLAG_HAS_FLAGS | FLAG_READ_ONLY | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_CAN_MULTI_CONN;
    assert_eq!(
        c.reply(),
        (OPT_INFO, REP_INFO, info_export(4 * MIB, ro).to_vec())
    );
    assert_eq!(c.reply(), (OPT_INFO, REP_INFO, info_name("b")));
    assert_eq!(c.reply(), (OPT_INFO, REP_ACK, vec![]));

    let (size, flags) = c.go("a");
    assert_eq!(size, 8 * MIB);
    assert_eq!(
        flags,
        FLAG_HAS_FLAGS
            | FLAG_SEND_FLUSH
            | FLAG_SEND_FUA
            | FLAG_SEND_TRIM
            | FLAG_SEND_WRITE_ZEROES
            | FLAG_SEND_DF
            | FLAG_CAN_MULTI_CONN
    );

    // A fresh image: one hole, reported as such.
    assert_eq!(c.block_status(1, 0, 8 << 20, 0), vec![(8 << 20, HOLE)]);

    // 4 KiB with FUA at 1 MiB + 4 KiB: the whole 1 MiB chunk becomes data.
    let pattern: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(c.write(2, MIB + 4096, &pattern, CMD_FLAG_FUA), 0);
    assert_eq!(
        c.block_status(3, 0, 8 << 20, 0),
        vec![(1 << 20, HOLE), (1 << 20, 0), (6 << 20, HOLE)]
    );
    // REQ_ONE: a single descriptor.
    assert_eq!(
        c.block_status(4, 0, 8 << 20, CMD_FLAG_REQ_ONE),
        vec![(1 << 20, HOLE)]
    );
    // A range starting inside the data run.
    assert_eq!(
        c.block_status(5, MIB + 512, 1 << 20, 0),
        vec![((1 << 20) - 512, 0), (512, HOLE)]
    );

    // A read over hole and data: a hole chunk, then the data.
    let (data, chunks) = c.read(6, 0, 2 << 20);
    assert_eq!(
        chunks,
        vec![
            (REPLY_TYPE_OFFSET_HOLE, 0, MIB),
            (REPLY_TYPE_OFFSET_DATA, MIB, MIB)
        ]
    );
    assert!(data[..(MIB + 4096) as usize].iter().all(|&b| b == 0));
    assert_eq!(
        data[(MIB + 4096) as usize..(MIB + 8192) as usize],
        pattern[..]
    );
    assert!(data[(MIB + 8192) as usize..].iter().all(|&b| b == 0));

    // DF: one data chunk, zeros included.
    c.request(CMD_FLAG_DF, CMD_READ, 7, MIB, 8192);
    let ch = c.chunk();
    assert_eq!(
        (ch.kind, ch.flags),
        (REPLY_TYPE_OFFSET_DATA, REPLY_FLAG_DONE)
    );
    assert_eq!(ch.payload[..8], MIB.to_be_bytes());
    assert_eq!(
        ch.payload[8..],
        [vec![0u8; 8192 - 4096], pattern.clone()].concat()[..]
    );

    // What FUA acknowledged is in the file for any other reader.
    let other = other_reader(&f);
    let mut buf = vec![0u8; 4096];
    other.read_at(&mut buf, MIB + 4096).unwrap();
    assert_eq!(buf, pattern);
    drop(other);

    // TRIM the chunk: a hole again, reading zeros.
    c.request(0, CMD_TRIM, 8, MIB, 1 << 20);
    assert_eq!(c.simple(8), 0);
    assert_eq!(c.block_status(9, MIB, 1 << 20, 0), vec![(1 << 20, HOLE)]);

    // WRITE_ZEROES without NO_HOLE may leave a hole; with NO_HOLE it must not.
    assert_eq!(c.write(10, 3 * MIB, &[0xab; 512], 0), 0);
    c.request(0, CMD_WRITE_ZEROES, 11, 3 * MIB, 1 << 20);
    assert_eq!(c.simple(11), 0);
    assert_eq!(
        c.block_status(12, 3 * MIB, 1 << 20, 0),
        vec![(1 << 20, HOLE)]
    );
    c.request(CMD_FLAG_NO_HOLE, CMD_WRITE_ZEROES, 13, 4 * MIB, 1 << 20);
    assert_eq!(c.simple(13), 0);
    assert_eq!(c.block_status(14, 4 * MIB, 1 << 20, 0), vec![(1 << 20, 0)]);
    let (data, _) = c.read(15, 3 * MIB, 2 << 20);
    assert!(data.iter().all(|&b| b == 0));

    c.request(0, CMD_FLUSH, 16, 0, 0);
    assert_eq!(c.simple(16), 0);
    c.request(0, CMD_DISC, 17, 0, 0);
    c.expect_closed();
}

#[test]
fn export_name_and_simple_replies() {
    let f = start(Config::default());
    let mut c = connect(&f);
    // No NO_ZEROES: the reply carries 124 zero bytes.
    c.greet(FLAG_C_FIXED_NEWSTYLE);
    c.option(OPT_EXPORT_NAME, b"b");
    let r = c.read_n(134);
    let ro =
        FLAG_HAS_FLAGS | FLAG_READ_ONLY | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_CAN_MULTI_CONN;
    assert_eq!(r, export_name_reply(4 * MIB, ro, false));
    // Simple replies: read data follows the header.
    c.request(0, CMD_READ, 1, 0, 512);
    assert_eq!(c.simple(1), 0);
    assert_eq!(c.read_n(512), vec![0u8; 512]);
    // Writes to a read-only export: EPERM; errors carry no payload.
    assert_eq!(c.write(2, 0, &[1; 512], 0), EPERM);
    c.request(0, CMD_READ, 3, 4 * MIB, 512);
    assert_eq!(c.simple(3), EINVAL);
    // BLOCK_STATUS needs structured replies and a context.
    c.request(0, CMD_BLOCK_STATUS, 4, 0, 512);
    assert_eq!(c.simple(4), EINVAL);
    c.request(0, CMD_FLUSH, 5, 0, 0);
    assert_eq!(c.simple(5), 0);
    c.request(0, CMD_DISC, 6, 0, 0);
    c.expect_closed();
}

#[test]
fn bad_handshakes_close_only_their_connection() {
    let f = start(Config::default());

    // Bad option magic: closed, nothing sent.
    let mut c = greeted(&f);
    c.send(b"IHAVEOPX\x00\x00\x00\x03\x00\x00\x00\x00");
    c.expect_closed();

    // A client flag the server did not offer.
    let mut c = connect(&f);
    c.greet(FLAGS | 0x80);
    c.expect_closed();

    // Option data over the limit: TOO_BIG, then closed.
    let mut c = greeted(&f);
    c.send(
        &OptionHeader {
            option: OPT_GO,
            len: 1 << 30,
        }
        .encode(),
    );
    assert_eq!(c.reply_type(OPT_GO), REP_ERR_TOO_BIG);
    c.expect_closed();

    // Unknown, malformed and out-of-order options are refused one by one
    // and the session goes on.
    let mut c = greeted(&f);
    c.option(99, b"junk");
    assert_eq!(c.reply_type(99), REP_ERR_UNSUP);
    c.option(OPT_LIST, b"x");
    assert_eq!(c.reply_type(OPT_LIST), REP_ERR_INVALID);
    let m = MetaContextRequest {
        name: "a".into(),
        queries: vec![BASE_ALLOCATION.into()],
    };
    c.option(OPT_SET_META_CONTEXT, &m.encode());
    assert_eq!(c.reply_type(OPT_SET_META_CONTEXT), REP_ERR_INVALID);
    c.option(OPT_GO, &[0, 0, 0, 9, b'a']);
    assert_eq!(c.reply_type(OPT_GO), REP_ERR_INVALID);
    let r = InfoRequest {
        name: "nosuch".into(),
        requests: vec![],
    };
    c.option(OPT_INFO, &r.encode());
    assert_eq!(c.reply_type(OPT_INFO), REP_ERR_UNKNOWN);
    c.option(OPT_STARTTLS, &[]);
    assert_eq!(c.reply_type(OPT_STARTTLS), REP_ERR_POLICY);
    c.option(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(c.reply_type(OPT_STRUCTURED_REPLY), REP_ACK);
    c.option(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(c.reply_type(OPT_STRUCTURED_REPLY), REP_ERR_INVALID);
    c.option(OPT_SET_META_CONTEXT, &m.encode());
    assert_eq!(c.reply_type(OPT_SET_META_CONTEXT), REP_META_CONTEXT);
    assert_eq!(c.reply_type(OPT_SET_META_CONTEXT), REP_ACK);
    // ABORT is acknowledged, then the server hangs up.
    c.option(OPT_ABORT, &[]);
    assert_eq!(c.reply_type(OPT_ABORT), REP_ACK);
    c.expect_closed();

    // EXPORT_NAME cannot be refused politely: an unknown name closes.
    let mut c = greeted(&f);
    c.option(OPT_EXPORT_NAME, b"nosuch");
    c.expect_closed();

    still_serves(&f, 0);
}

#[test]
fn bad_requests_get_the_spec_errors() {
    let f = start(Config::default());
    let mut c = session_a(&f);
    let end = 8 * MIB;
    // Past the end: ENOSPC for writes, EINVAL for reads and block status.
    assert_eq!(c.write(1, end - 512, &[1; 1024], 0), ENOSPC);
    c.request(0, CMD_TRIM, 2, end, 1);
    assert_eq!(c.error_chunk(2), ENOSPC);
    c.request(0, CMD_WRITE_ZEROES, 3, end - 1, 2);
    assert_eq!(c.error_chunk(3), ENOSPC);
    c.request(0, CMD_READ, 4, end - 512, 1024);
    assert_eq!(c.error_chunk(4), EINVAL);
    c.request(0, CMD_BLOCK_STATUS, 5, end, 512);
    assert_eq!(c.error_chunk(5), EINVAL);
    // An offset whose end overflows 64 bits.
    c.request(0, CMD_READ, 6, u64::MAX - 10, 512);
    assert_eq!(c.error_chunk(6), EINVAL);
    // Unknown command, and flags not valid for the command.
    c.request(0, 42, 7, 0, 0);
    assert_eq!(c.error_chunk(7), EINVAL);
    assert_eq!(c.write(8, 0, &[1; 512], CMD_FLAG_DF), EINVAL);
    c.request(CMD_FLAG_FAST_ZERO, CMD_WRITE_ZEROES, 9, 0, 512);
    assert_eq!(c.error_chunk(9), EINVAL);
    c.request(CMD_FLAG_REQ_ONE, CMD_READ, 10, 0, 512);
    assert_eq!(c.error_chunk(10), EINVAL);
    c.request(0, CMD_BLOCK_STATUS, 11, 0, 0);
    assert_eq!(c.error_chunk(11), EINVAL);
    // A read over the 32 MiB limit is refused and the session goes on.
    c.request(0, CMD_READ, 12, 0, (32 << 20) + 1);
    assert_eq!(c.error_chunk(12), EINVAL);
    assert_eq!(c.write(13, MIB, &[0x5a; 4096], 0), 0);
    // A write over the limit: refused, and the unread payload ends the session.
    c.request(0, CMD_WRITE, 14, 0, 64 << 20);
    assert_eq!(c.error_chunk(14), EINVAL);
    c.expect_closed();

    // Bad request magic closes the connection without a reply.
    let mut c = session_a(&f);
    let mut r = Request {
        flags: 0,
        command: CMD_READ,
        handle: 1,
        offset: 0,
        len: 512,
    }
    .encode();
    r[0] ^= 0xff;
    c.send(&r);
    c.expect_closed();

    still_serves(&f, 0x5a);
}

#[test]
fn a_vanishing_client_loses_nothing_it_flushed() {
    let f = start(Config::default());
    let mut c = session_a(&f);
    assert_eq!(c.write(1, MIB, &[0x11; 8192], 0), 0);
    c.request(0, CMD_FLUSH, 2, 0, 0);
    assert_eq!(c.simple(2), 0);
    // Half a write, then gone.
    c.request(0, CMD_WRITE, 3, MIB, 8192);
    c.send(&[0x22; 4096]);
    drop(c);

    // The flushed bytes are in the file, and the torn write never landed.
    let other = other_reader(&f);
    let mut buf = vec![0u8; 8192];
    other.read_at(&mut buf, MIB).unwrap();
    assert_eq!(buf, vec![0x11; 8192]);
    // Through the shared disk too.
    let mut buf = vec![0u8; 8192];
    f.disk_a.read_at(&mut buf, MIB).unwrap();
    assert_eq!(buf, vec![0x11; 8192]);
    still_serves(&f, 0x11);
}

#[test]
fn slow_peers_are_dropped_after_the_handshake_timeout() {
    let f = start(Config {
        handshake_timeout: Duration::from_millis(500),
        ..Config::default()
    });
    // Connected, greeting read, then silence.
    let mut idle = connect(&f);
    assert_eq!(idle.read_n(18).len(), 18);
    // Half an option header, then silence.
    let mut half = greeted(&f);
    half.send(b"IHAVE");
    // A write payload that never comes.
    let mut stall = session_a(&f);
    stall.request(0, CMD_WRITE, 1, 0, 4096);
    stall.send(&[1; 100]);

    let t = Instant::now();
    idle.expect_closed();
    half.expect_closed();
    stall.expect_closed();
    assert!(t.elapsed() < Duration::from_secs(15));

    // Busy but never done: options every 50 ms keep each read short, but
    // the handshake as a whole has 500 ms.
    let mut busy = greeted(&f);
    let t = Instant::now();
    let mut replies = 0;
    loop {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "still haggling after 10 s"
        );
        let h = OptionHeader {
            option: OPT_LIST,
            len: 0,
        };
        if busy.s.write_all(&h.encode()).is_err() {
            break;
        }
        // REP_SERVER "a", REP_SERVER "b", ACK: 25 + 25 + 20 bytes.
        let mut b = [0u8; 70];
        if busy.s.read_exact(&mut b).is_err() {
            break;
        }
        assert_eq!(b[50..], option_reply(OPT_LIST, REP_ACK, &[])[..]);
        replies += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(replies >= 2, "{replies} LIST replies before the close");
    still_serves(&f, 0);
}

#[test]
fn clients_in_parallel_share_one_disk() {
    let f = Arc::new(start(Config::default()));
    let threads: Vec<_> = (0..4u8)
        .map(|i| {
            let f = Arc::clone(&f);
            std::thread::spawn(move || {
                let mut c = session_a(&f);
                let at = u64::from(i) * MIB;
                for k in 0..16u64 {
                    assert_eq!(c.write(k, at + k * 4096, &[i + 1; 4096], 0), 0);
                }
                c.request(0, CMD_FLUSH, 99, 0, 0);
                assert_eq!(c.simple(99), 0);
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    // Each client's writes are visible to another connection.
    let mut c = session_a(&f);
    for i in 0..4u8 {
        let (data, _) = c.read(1, u64::from(i) * MIB, 16 * 4096);
        assert!(data.iter().all(|&b| b == i + 1), "client {i}");
    }
}

#[test]
fn connections_over_the_limit_are_closed() {
    let f = start(Config {
        max_connections: 1,
        ..Config::default()
    });
    let mut first = greeted(&f);
    let mut second = connect(&f);
    second.expect_closed();
    // The first is unaffected.
    assert_eq!(first.go("a").0, 8 * MIB);
}

fn tls_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/nbd-tls")
}

#[test]
fn tls_is_required_then_served() {
    let d = tls_dir();
    let tls = asiffs::nbd::tls::server_config(
        &d.join("server-cert.pem"),
        &d.join("server-key.pem"),
        None,
    )
    .unwrap();
    let f = start(Config {
        tls: Some(tls),
        ..Config::default()
    });

    // Nothing but STARTTLS before TLS.
    let mut c = greeted(&f);
    c.option(OPT_LIST, &[]);
    assert_eq!(c.reply_type(OPT_LIST), REP_ERR_TLS_REQD);
    c.option(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(c.reply_type(OPT_STRUCTURED_REPLY), REP_ERR_TLS_REQD);
    c.option(OPT_STARTTLS, b"x");
    assert_eq!(c.reply_type(OPT_STARTTLS), REP_ERR_INVALID);
    c.option(OPT_EXPORT_NAME, b"a");
    c.expect_closed();

    // STARTTLS, a rustls client, then a whole session inside TLS.
    let mut c = greeted(&f);
    c.option(OPT_STARTTLS, &[]);
    assert_eq!(c.reply_type(OPT_STARTTLS), REP_ACK);
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::pem::PemObject::pem_file_iter(d.join("ca-cert.pem")).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let conn =
        rustls::ClientConnection::new(Arc::new(cfg), "localhost".try_into().unwrap()).unwrap();
    let mut t = Client {
        s: rustls::StreamOwned::new(conn, c.s),
    };
    t.option(OPT_STARTTLS, &[]);
    assert_eq!(t.reply_type(OPT_STARTTLS), REP_ERR_INVALID);
    t.option(OPT_LIST, &[]);
    assert_eq!(t.reply(), (OPT_LIST, REP_SERVER, rep_server("a")));
    assert_eq!(t.reply(), (OPT_LIST, REP_SERVER, rep_server("b")));
    assert_eq!(t.reply(), (OPT_LIST, REP_ACK, vec![]));
    t.go("a");
    assert_eq!(t.write(1, 0, &[0x77; 4096], CMD_FLAG_FUA), 0);
    let (data, _) = t.read(2, 0, 4096);
    assert_eq!(data, vec![0x77; 4096]);
    // Replies of many TLS records, which the server hands to the socket
    // several records per writev.
    let big = pattern(3, 3 * MIB as usize + 123);
    assert_eq!(t.write(3, MIB, &big, 0), 0);
    let (data, _) = t.read(4, MIB, big.len() as u32);
    assert!(data == big, "a multi-record read came back wrong");
}

/// Each request's bytes, distinct per handle.
fn pattern(handle: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (handle as usize * 31 + i / 7) as u8)
        .collect()
}

/// One whole reply to any request: a simple reply as (handle, error, no
/// data), or a read's single final data chunk as (handle, 0, offset and
/// data).
fn any_reply(c: &mut Plain) -> (u64, u32, Vec<u8>) {
    let magic = c.read_n(4);
    if magic == SIMPLE_REPLY_MAGIC.to_be_bytes() {
        let r = c.read_n(12);
        let error = u32::from_be_bytes(r[0..4].try_into().unwrap());
        return (
            u64::from_be_bytes(r[4..12].try_into().unwrap()),
            error,
            Vec::new(),
        );
    }
    assert_eq!(magic, STRUCTURED_REPLY_MAGIC.to_be_bytes(), "reply magic");
    let h = c.read_n(16);
    assert_eq!(h[0..2], REPLY_FLAG_DONE.to_be_bytes(), "one chunk per read");
    assert_eq!(h[2..4], REPLY_TYPE_OFFSET_DATA.to_be_bytes());
    let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
    let handle = u64::from_be_bytes(h[4..12].try_into().unwrap());
    (handle, 0, c.read_n(len as usize))
}

fn request_bytes(command: u16, handle: u64, offset: u64, len: u32) -> [u8; 28] {
    Request {
        flags: 0,
        command,
        handle,
        offset,
        len,
    }
    .encode()
}

/// A client with 64 requests in flight on one connection gets every reply
/// exactly once, each whole, matched by handle in whatever order they come.
#[test]
fn many_requests_in_flight_on_one_connection() {
    let f = start(Config::default());
    // Small enough that all requests and all replies fit in the socket
    // buffers, so sending everything first cannot deadlock.
    const N: u32 = 2048;
    let n = u64::from(N);
    // What the reads will find, written straight to the shared disk.
    for i in 0..32u64 {
        f.disk_a
            .write_at(&pattern(1000 + i, N as usize), 4 * MIB + i * n)
            .unwrap();
    }
    let mut c = session_a(&f);
    let mut frame = Vec::new();
    for h in 0..64u64 {
        let i = h / 2;
        if h % 2 == 0 {
            frame.extend_from_slice(&request_bytes(CMD_WRITE, h, MIB + i * n, N));
            frame.extend_from_slice(&pattern(h, N as usize));
        } else {
            frame.extend_from_slice(&request_bytes(CMD_READ, h, 4 * MIB + i * n, N));
        }
    }
    c.send(&frame);
    let mut order = Vec::new();
    for _ in 0..64 {
        let (h, error, data) = any_reply(&mut c);
        assert!(
            h < 64 && !order.contains(&h),
            "handle {h} unknown or repeated"
        );
        assert_eq!(error, 0, "handle {h}");
        if h % 2 == 0 {
            assert!(data.is_empty());
        } else {
            let i = h / 2;
            assert_eq!(data[0..8], (4 * MIB + i * n).to_be_bytes(), "handle {h}");
            assert_eq!(data[8..], pattern(1000 + i, N as usize), "handle {h}");
        }
        order.push(h);
    }
    // Every write landed where it was sent.
    c.request(0, CMD_FLUSH, 100, 0, 0);
    assert_eq!(c.simple(100), 0);
    for i in 0..32u64 {
        let mut buf = vec![0u8; N as usize];
        f.disk_a.read_at(&mut buf, MIB + i * n).unwrap();
        assert_eq!(buf, pattern(2 * i, N as usize), "write {}", 2 * i);
    }
}

/// `NBD_CMD_DISC` right behind many in-flight writes: each still gets its
/// reply before the server closes, and all of them are in the file.
#[test]
fn disconnect_answers_the_writes_in_flight() {
    let f = start(Config::default());
    const N: u32 = 2048;
    let n = u64::from(N);
    let mut c = session_a(&f);
    let mut frame = Vec::new();
    for h in 0..48u64 {
        frame.extend_from_slice(&request_bytes(CMD_WRITE, h, 2 * MIB + h * n, N));
        frame.extend_from_slice(&pattern(h, N as usize));
    }
    frame.extend_from_slice(&request_bytes(CMD_DISC, 99, 0, 0));
    c.send(&frame);
    let mut seen = Vec::new();
    for _ in 0..48 {
        let (h, error, data) = any_reply(&mut c);
        assert!(
            h < 48 && !seen.contains(&h),
            "handle {h} unknown or repeated"
        );
        assert_eq!((error, data.len()), (0, 0), "handle {h}");
        seen.push(h);
    }
    c.expect_closed();
    f.disk_a.flush().unwrap();
    let other = other_reader(&f);
    for h in 0..48u64 {
        let mut buf = vec![0u8; N as usize];
        other.read_at(&mut buf, 2 * MIB + h * n).unwrap();
        assert_eq!(buf, pattern(h, N as usize), "write {h}");
    }
}

/// Polls `done` every 10 ms until it holds; fails after `limit`.
fn wait_until(limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let t = Instant::now();
    while !done() {
        assert!(t.elapsed() < limit, "{what}: not after {limit:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// With room for exactly one 32 MiB payload, a 32 MiB write waits for a
/// half-sent one to finish instead of being refused; both land whole, and
/// the payload bytes held never pass the bound.
#[test]
fn a_32_mib_write_waits_for_room_and_lands() {
    const BIG: u32 = 32 << 20;
    let f = Arc::new(start_sized(
        Config {
            max_payload_memory: BIG.into(),
            ..Config::default()
        },
        64 * MIB,
    ));
    let first = pattern(1, BIG as usize);
    let second = pattern(2, BIG as usize);

    // The first write's header and 1 MiB: the server holds that piece and
    // the room for the next one, 2 MiB.
    let mut early = session_a(&f);
    early.request(0, CMD_WRITE, 1, 0, BIG);
    early.send(&first[..MIB as usize]);
    wait_until(Duration::from_secs(20), "2 MiB held", || {
        f.server.payload_bytes_held() == 2 * MIB
    });

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let peak = {
        let (f, stop) = (Arc::clone(&f), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut peak = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                peak = peak.max(f.server.payload_bytes_held());
                std::thread::yield_now();
            }
            peak
        })
    };
    // The second cannot take room while the first could not then finish.
    let late = {
        let (f, second) = (Arc::clone(&f), second.clone());
        std::thread::spawn(move || {
            let mut c = session_a(&f);
            c.write(2, 32 * MIB, &second, 0)
        })
    };
    early.send(&first[MIB as usize..]);
    assert_eq!(early.status(1), 0);
    assert_eq!(late.join().unwrap(), 0);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(peak.join().unwrap() <= u64::from(BIG));
    assert_eq!(f.server.payload_bytes_held(), 0);

    let (data, _) = early.read(3, 0, BIG);
    assert!(data == first, "first 32 MiB read back");
    let (data, _) = early.read(4, 32 * MIB, BIG);
    assert!(data == second, "second 32 MiB read back");
}

/// `asiffs serve -f` as a child process, so its memory and log can be
/// looked at; killed when dropped.
struct Served {
    child: std::process::Child,
    dir: tempfile::TempDir,
    socket: PathBuf,
    log: PathBuf,
}

impl Served {
    /// Serves a directory holding `a.asif` (64 MiB) and a FIFO `x.asif`;
    /// returns once the server says it is serving.
    fn start(args: &[&str]) -> Served {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir(&src).unwrap();
        let opts = CreateOptions {
            size: 64 * MIB,
            ..CreateOptions::default()
        };
        Image::create(src.join("a.asif"), &opts)
            .unwrap()
            .close()
            .unwrap();
        let fifo = std::ffi::CString::new(src.join("x.asif").into_os_string().into_encoded_bytes())
            .unwrap();
        // SAFETY: fifo is a NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        let socket = dir.path().join("nbd.sock");
        let log = dir.path().join("stderr.log");
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_asiffs"))
            .arg("serve")
            .arg(&src)
            .arg("--socket")
            .arg(&socket)
            .arg("-f")
            .args(args)
            .env_remove("ASIFFS_LOG")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        assert!(line.starts_with("serving a on "), "{line:?}");
        Served {
            child,
            dir,
            socket,
            log,
        }
    }

    /// A client in transmission on `a`.
    fn session(&self) -> Plain {
        let mut c = connect_to(&self.socket);
        c.greet(FLAGS);
        c.go("a");
        c
    }

    /// A line of /proc/PID/status, in KiB.
    fn status_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let line = status
            .lines()
            .find(|l| l.starts_with(field))
            .unwrap_or_else(|| panic!("no {field} in {status}"));
        line[field.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .unwrap()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap()
    }

    /// The path of an entry of SOURCE as the server names it.
    fn source_path(&self, name: &str) -> String {
        let src = self.dir.path().join("src").canonicalize().unwrap();
        src.join(name).display().to_string()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Raises this process's descriptor limit to at least `n`.
fn want_fds(n: u64) {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: r is a valid rlimit for the call to fill and then read.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut r), 0);
        if r.rlim_cur < n && r.rlim_max >= n {
            r.rlim_cur = n;
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &r), 0);
        }
    }
}

/// 256 clients each announce a 32 MiB write, send 2 MiB and stall: the
/// server holds no more than the 64 MiB bound of payloads (its whole
/// resident size stays under 64 MiB + the margin below), and a
/// well-behaved client still writes and reads back its bytes meanwhile.
#[test]
fn announced_writes_cost_only_what_is_sent() {
    const STALLERS: usize = 256;
    const ANNOUNCED: u32 = 32 << 20;
    const SENT: usize = 2 << 20;
    // Threads (17 per connection), stacks and the allocator's slack.
    const MARGIN_MIB: u64 = 96;
    want_fds(4096);
    let s = Served::start(&["--max-connections", "300", "--handshake-timeout", "60"]);
    let base = s.status_kib("VmRSS:");
    let payload = vec![0xa5u8; SENT];
    let mut stallers: Vec<(Plain, usize)> = (0..STALLERS)
        .map(|i| {
            let mut c = s.session();
            c.request(0, CMD_WRITE, i as u64, 0, ANNOUNCED);
            c.s.set_nonblocking(true).unwrap();
            (c, 0)
        })
        .collect();
    // Push the 2 MiB of each as far as the server takes them. Room goes
    // to about 33 of them a piece each, then only to the one furthest
    // along (the others could not all finish otherwise); so wait until
    // that one has sent its 2 MiB whole.
    wait_until(Duration::from_secs(30), "a staller's 2 MiB taken", || {
        for (c, sent) in stallers.iter_mut() {
            while *sent < SENT {
                match c.s.write(&payload[*sent..]) {
                    Ok(n) => *sent += n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => panic!("staller: {e}"),
                }
            }
        }
        stallers.iter().any(|(_, n)| *n == SENT)
    });
    let whole = stallers.iter().filter(|(_, n)| *n == SENT).count();
    let pushed: usize = stallers.iter().map(|(_, n)| n).sum();

    // All stallers still connected: a fresh client is served, exactly.
    let mut c = s.session();
    let data = pattern(7, MIB as usize);
    assert_eq!(c.write(1, 40 * MIB, &data, CMD_FLAG_FUA), 0);
    let (back, _) = c.read(2, 40 * MIB, MIB as u32);
    assert!(back == data, "1 MiB read back");

    let rss = s.status_kib("VmRSS:");
    let peak = s.status_kib("VmHWM:");
    eprintln!(
        "{STALLERS} stallers ({whole} sent 2 MiB whole, {} MiB sent in all): \
         RSS {} MiB at start, {} MiB now, peak {} MiB",
        pushed >> 20,
        base >> 10,
        rss >> 10,
        peak >> 10
    );
    let bound = (server_default_room() >> 20) + MARGIN_MIB;
    assert!(
        peak >> 10 <= bound,
        "peak RSS {} MiB over {bound} MiB",
        peak >> 10
    );
    drop(stallers);
}

fn server_default_room() -> u64 {
    asiffs::nbd::server::DEFAULT_PAYLOAD_MEMORY
}

/// A payload trickled a byte every 100 ms is dropped once its deadline
/// (handshake timeout 2 s + 4096 bytes at 1 MiB/s) passes, with the reason
/// in the log; another client is served all along.
#[test]
fn a_trickled_payload_is_dropped_at_its_deadline() {
    let s = Served::start(&["--handshake-timeout", "2"]);
    let mut slow = s.session();
    slow.request(0, CMD_WRITE, 1, 0, 4096);
    let t = Instant::now();
    let mut trickle = slow.s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        // Ends at the first failed write, once the server has hung up.
        for i in 0..4096u32 {
            if trickle.write_all(&[i as u8]).is_err() {
                return i;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        4096
    });
    // Meanwhile another client writes and reads back.
    let mut c = s.session();
    for k in 0..5u64 {
        let data = pattern(k, 64 * 1024);
        assert_eq!(c.write(k, k * MIB, &data, 0), 0);
        assert_eq!(c.read(100 + k, k * MIB, 64 * 1024).0, data);
    }
    slow.expect_closed();
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(4),
        "dropped after {took:?}"
    );
    let sent = writer.join().unwrap();
    assert!(sent < 60, "{sent} bytes trickled before the close was seen");
    // The log says why.
    let want = "dropped: write payload of 4096 bytes not received within 2.0 s";
    wait_until(Duration::from_secs(5), "the drop logged", || {
        s.log().contains(want)
    });
    // And the server goes on.
    let mut c = s.session();
    assert_eq!(c.write(9, 0, &[0x3c; 4096], 0), 0);
    assert_eq!(c.read(10, 0, 4096).0, vec![0x3c; 4096]);
}

/// A FIFO named as an image is skipped with its reason, as other skipped
/// images are.
#[test]
fn a_fifo_named_as_an_image_is_skipped_with_a_reason() {
    let s = Served::start(&[]);
    let want = format!(
        "{}: skipped: a FIFO, not a regular file",
        s.source_path("x.asif")
    );
    // Logged before the server said it was serving.
    let log = s.log();
    assert_eq!(
        log.lines().filter(|l| l.ends_with(&want)).count(),
        1,
        "{log}"
    );
}

/// One whole reply, simple or structured: every chunk up to the final one,
/// all of the same handle (a reply is never interleaved with another).
struct Whole {
    handle: u64,
    error: u32,
    /// Read data as (offset, bytes); holes come as zeros.
    data: Vec<(u64, Vec<u8>)>,
    /// A block status chunk's payload.
    status: Vec<u8>,
}

fn whole_reply(c: &mut Plain) -> Whole {
    let magic = c.read_n(4);
    if magic == SIMPLE_REPLY_MAGIC.to_be_bytes() {
        let r = c.read_n(12);
        return Whole {
            handle: u64::from_be_bytes(r[4..12].try_into().unwrap()),
            error: u32::from_be_bytes(r[0..4].try_into().unwrap()),
            data: Vec::new(),
            status: Vec::new(),
        };
    }
    let mut w: Option<Whole> = None;
    let mut magic = magic;
    loop {
        assert_eq!(magic, STRUCTURED_REPLY_MAGIC.to_be_bytes(), "chunk magic");
        let h = c.read_n(16);
        let flags = u16::from_be_bytes([h[0], h[1]]);
        let kind = u16::from_be_bytes([h[2], h[3]]);
        let handle = u64::from_be_bytes(h[4..12].try_into().unwrap());
        let p = c.read_n(u32::from_be_bytes(h[12..16].try_into().unwrap()) as usize);
        let w = w.get_or_insert(Whole {
            handle,
            error: 0,
            data: Vec::new(),
            status: Vec::new(),
        });
        assert_eq!(w.handle, handle, "chunks of two replies interleaved");
        let at = || u64::from_be_bytes(p[0..8].try_into().unwrap());
        match kind {
            REPLY_TYPE_OFFSET_DATA => w.data.push((at(), p[8..].to_vec())),
            REPLY_TYPE_OFFSET_HOLE => {
                let n = u32::from_be_bytes(p[8..12].try_into().unwrap());
                w.data.push((at(), vec![0; n as usize]));
            }
            REPLY_TYPE_ERROR => w.error = u32::from_be_bytes(p[0..4].try_into().unwrap()),
            REPLY_TYPE_BLOCK_STATUS => w.status = p,
            REPLY_TYPE_NONE => {}
            k => panic!("unexpected chunk type {k:#x}"),
        }
        if flags & REPLY_FLAG_DONE != 0 {
            break;
        }
        magic = c.read_n(4);
    }
    w.unwrap()
}

/// Read data of a reply joined into the range it covers, from `offset`.
fn joined(w: &Whole, offset: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0xeeu8; len];
    for (at, d) in &w.data {
        let rel = (at - offset) as usize;
        out[rel..rel + d.len()].copy_from_slice(d);
    }
    out
}

/// Sends `frame` from another thread in slices of odd sizes, one `write`
/// each, so that headers and payloads straddle what the server receives.
fn send_sliced(c: &Plain, frame: Vec<u8>) -> std::thread::JoinHandle<()> {
    let mut s = c.s.try_clone().unwrap();
    std::thread::spawn(move || {
        let sizes = [1usize, 3, 27, 29, 5, 61, 113, 4093, 2, 997, 28 * 3 + 1];
        let mut at = 0;
        for n in sizes.iter().cycle() {
            if at == frame.len() {
                break;
            }
            let end = (at + n).min(frame.len());
            s.write_all(&frame[at..end]).unwrap();
            at = end;
        }
    })
}

/// What the pipelined frame asks, and the answer each handle must get.
enum Want {
    Ok,
    Error(u32),
    Data(u64, Vec<u8>),
    Status(Vec<u8>),
}

/// 200 mixed requests sent at once in odd slices (writes with payloads,
/// reads with and without DF, trims, flushes, block status, and requests
/// that fail): every handle is answered exactly once, each reply whole,
/// with the exact data or error. Then the written and trimmed ranges read
/// back exactly, and a flush puts the completed writes in the file. The
/// reads and the writes over stored data go to the session's io_uring.
#[test]
fn two_hundred_pipelined_requests_in_odd_slices() {
    pipelined(Config::default());
}

/// The same, each request on a worker thread (`--aio threads`).
#[test]
fn two_hundred_pipelined_requests_without_the_ring() {
    pipelined(Config {
        ring: false,
        ..Config::default()
    });
}

fn pipelined(config: Config) {
    let size = 64 * MIB;
    let f = start_sized(config, size);
    let k8 = 8 * 1024;
    for h in 0..200u64 {
        f.disk_a
            .write_at(&pattern(1000 + h, 8192), 4 * MIB + h * k8)
            .unwrap();
    }
    // Half the writes below land on stored chunks (which the ring takes),
    // half allocate (which a worker does).
    f.disk_a.write_at(&vec![0x5a; 800 * 1024], MIB).unwrap();
    for m in 0..20u64 {
        f.disk_a
            .write_at(&vec![0xcc; MIB as usize], 40 * MIB + m * MIB)
            .unwrap();
    }
    let mut c = session_a(&f);
    let mut frame = Vec::new();
    let mut want = Vec::new();
    let push = |frame: &mut Vec<u8>, flags, command, h, offset, len| {
        let r = Request {
            flags,
            command,
            handle: h,
            offset,
            len,
        };
        frame.extend_from_slice(&r.encode());
    };
    for h in 0..200u64 {
        let w = match h % 10 {
            0 | 5 => {
                let len = 4096 + (h % 3) as u32 * 1000;
                push(&mut frame, 0, CMD_WRITE, h, MIB + h * k8, len);
                frame.extend_from_slice(&pattern(h, len as usize));
                Want::Ok
            }
            1 | 6 => {
                let len = 4096 + (h % 4) as usize * 777;
                let flags = if h % 20 == 1 { CMD_FLAG_DF } else { 0 };
                push(&mut frame, flags, CMD_READ, h, 4 * MIB + h * k8, len as u32);
                Want::Data(4 * MIB + h * k8, pattern(1000 + h, 8192)[..len].to_vec())
            }
            2 => {
                push(
                    &mut frame,
                    0,
                    CMD_TRIM,
                    h,
                    40 * MIB + h / 10 * MIB,
                    MIB as u32,
                );
                Want::Ok
            }
            7 => {
                push(&mut frame, 0, CMD_TRIM, h, 12 * MIB + h * k8, 4096);
                Want::Ok
            }
            3 | 8 => {
                push(&mut frame, 0, CMD_FLUSH, h, 0, 0);
                Want::Ok
            }
            9 => {
                push(&mut frame, 0, CMD_READ, h, 14 * MIB + h * k8, 512);
                Want::Data(14 * MIB + h * k8, vec![0; 512])
            }
            _ => match h / 10 % 4 {
                0 => {
                    push(&mut frame, 0, CMD_READ, h, size - 512, 1024);
                    Want::Error(EINVAL)
                }
                1 => {
                    push(&mut frame, 0, CMD_WRITE, h, size - 50, 100);
                    frame.extend_from_slice(&pattern(h, 100));
                    Want::Error(ENOSPC)
                }
                2 => {
                    push(&mut frame, 0, 42, h, 0, 0);
                    Want::Error(EINVAL)
                }
                _ => {
                    push(&mut frame, 0, CMD_BLOCK_STATUS, h, 62 * MIB, 65536);
                    let desc = [65536u32.to_be_bytes(), HOLE.to_be_bytes()].concat();
                    Want::Status([&1u32.to_be_bytes()[..], &desc].concat())
                }
            },
        };
        want.push(w);
    }
    let sender = send_sliced(&c, frame);
    let mut seen = [false; 200];
    for _ in 0..200 {
        let r = whole_reply(&mut c);
        let h = r.handle;
        assert!(
            h < 200 && !seen[h as usize],
            "handle {h} unknown or repeated"
        );
        seen[h as usize] = true;
        match &want[h as usize] {
            Want::Ok => assert_eq!((r.error, r.data.len()), (0, 0), "handle {h}"),
            Want::Error(e) => assert_eq!(r.error, *e, "handle {h}"),
            Want::Data(at, d) => {
                assert_eq!(r.error, 0, "handle {h}");
                assert!(joined(&r, *at, d.len()) == *d, "handle {h}: data");
            }
            Want::Status(s) => assert_eq!((r.error, &r.status), (0, s), "handle {h}"),
        }
    }
    sender.join().unwrap();

    // Every write was answered, so a flush now covers them all: another
    // reader of the file sees them.
    c.request(0, CMD_FLUSH, 500, 0, 0);
    assert_eq!(c.simple(500), 0);
    let other = other_reader(&f);
    for h in (0..200u64).filter(|h| h % 5 == 0) {
        let len = 4096 + (h % 3) as usize * 1000;
        let mut buf = vec![0u8; len];
        other.read_at(&mut buf, MIB + h * k8).unwrap();
        assert!(buf == pattern(h, len), "write {h} in the file");
    }
    drop(other);

    // Read back, pipelined too: the writes' bytes and the trimmed MiBs as
    // zeros.
    let mut frame = Vec::new();
    for h in 0..200u64 {
        let (at, len) = match h % 10 {
            0 | 5 => (MIB + h * k8, 4096 + (h % 3) as u32 * 1000),
            2 => (40 * MIB + h / 10 * MIB, 65536),
            _ => continue,
        };
        frame.extend_from_slice(
            &Request {
                flags: 0,
                command: CMD_READ,
                handle: 1000 + h,
                offset: at,
                len,
            }
            .encode(),
        );
    }
    let sender = send_sliced(&c, frame);
    let mut seen = Vec::new();
    for _ in 0..60 {
        let r = whole_reply(&mut c);
        let h = r.handle - 1000;
        assert!(
            h < 200 && !seen.contains(&h),
            "handle {} repeated",
            r.handle
        );
        seen.push(h);
        assert_eq!(r.error, 0, "read back {h}");
        if h % 10 == 2 {
            let d = joined(&r, 40 * MIB + h / 10 * MIB, 65536);
            assert!(d.iter().all(|&b| b == 0), "trim {h} reads zeros");
        } else {
            let len = 4096 + (h % 3) as usize * 1000;
            assert!(
                joined(&r, MIB + h * k8, len) == pattern(h, len),
                "write {h}"
            );
        }
    }
    sender.join().unwrap();
    c.request(0, CMD_DISC, 501, 0, 0);
    c.expect_closed();
}

/// Requests whose every byte comes in a `write` of its own still parse:
/// a write with its payload, a read of it, a flush.
#[test]
fn a_request_sent_byte_by_byte_still_parses() {
    let f = start(Config::default());
    let mut c = session_a(&f);
    let data = pattern(3, 700);
    let write = Request {
        flags: 0,
        command: CMD_WRITE,
        handle: 1,
        offset: 2 * MIB + 5,
        len: 700,
    };
    for b in write.encode().iter().chain(&data) {
        c.send(&[*b]);
    }
    assert_eq!(c.simple(1), 0);
    let read = Request {
        flags: 0,
        command: CMD_READ,
        handle: 2,
        offset: 2 * MIB + 5,
        len: 700,
    };
    for b in read.encode() {
        c.send(&[b]);
    }
    let r = whole_reply(&mut c);
    assert_eq!((r.handle, r.error), (2, 0));
    assert_eq!(joined(&r, 2 * MIB + 5, 700), data);
    for b in request_bytes(CMD_FLUSH, 3, 0, 0) {
        c.send(&[b]);
    }
    assert_eq!(c.simple(3), 0);
}

/// A client that sends reads and stops reading the replies stalls only
/// itself: the replies the socket cannot take wait on the session's sender
/// thread, not on its ring, so the host reads behind them hold no lock.
/// Another client trims, flushes (which waits for every host I/O started
/// before it), writes and reads the same range at once.
#[test]
fn a_client_that_stops_reading_holds_no_lock() {
    let f = start_sized(Config::default(), 64 * MIB);
    f.disk_a
        .write_at(&vec![0x77; 16 * MIB as usize], 0)
        .unwrap();
    let reads_before = f.disk_a.stats()["reads"].as_u64().unwrap();
    let mut stalled = session_a(&f);
    let mut frame = Vec::new();
    for h in 0..256u64 {
        let r = Request {
            flags: 0,
            command: CMD_READ,
            handle: h,
            offset: h * 65536,
            len: 65536,
        };
        frame.extend_from_slice(&r.encode());
    }
    stalled.send(&frame);
    // Every read has reached the disk; 16 MiB of replies cannot all be in
    // the socket's buffer.
    let deadline = Instant::now() + Duration::from_secs(20);
    while f.disk_a.stats()["reads"].as_u64().unwrap() < reads_before + 256 {
        assert!(
            Instant::now() < deadline,
            "the stalled client's reads never ran"
        );
        std::thread::yield_now();
    }
    let mut other = session_a(&f);
    let start = Instant::now();
    other.request(0, CMD_TRIM, 1, 0, 16 * MIB as u32);
    assert_eq!(other.status(1), 0);
    other.request(0, CMD_FLUSH, 2, 0, 0);
    assert_eq!(other.status(2), 0);
    assert_eq!(other.write(3, 4096, &[0x42; 4096], 0), 0);
    let (data, _) = other.read(4, 0, 8192);
    assert!(data[..4096].iter().all(|&b| b == 0), "trimmed");
    assert!(data[4096..].iter().all(|&b| b == 0x42), "written");
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "the other client waited {:?}",
        start.elapsed()
    );
    // The stalled client still gets its replies, whole, with what was
    // there when its reads ran.
    let mut seen = [false; 256];
    for _ in 0..256 {
        let r = whole_reply(&mut stalled);
        let h = r.handle;
        assert_eq!(r.error, 0, "handle {h}");
        assert!(!std::mem::replace(&mut seen[h as usize], true));
        assert!(
            joined(&r, h * 65536, 65536) == vec![0x77; 65536],
            "handle {h}"
        );
    }
}

/// `serve` gives each plain session an io_uring and a sender thread, and
/// `--aio threads` neither; the bytes are the same either way.
#[test]
fn aio_chooses_the_ring_or_the_workers() {
    for (args, threads) in [(&[][..], 1), (&["--aio", "threads"][..], 0)] {
        let served = Served::start(args);
        let mut c = served.session();
        assert_eq!(c.write(1, MIB, &pattern(7, 65536), 0), 0);
        // Stored now: this read translates.
        let (data, _) = c.read(2, MIB, 65536);
        assert!(data == pattern(7, 65536), "{args:?}");
        let named = |name: &str| {
            std::fs::read_dir(format!("/proc/{}/task", served.child.id()))
                .unwrap()
                .filter(|t| {
                    let comm = t.as_ref().unwrap().path().join("comm");
                    std::fs::read_to_string(comm).is_ok_and(|c| c.trim() == name)
                })
                .count()
        };
        assert_eq!(named("asiffs-ring"), threads, "{args:?}");
        assert_eq!(named("asiffs-nbd-send"), threads, "{args:?}");
    }
}
