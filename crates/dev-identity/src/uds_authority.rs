//! Lets gRPC C-core clients (Python's `grpcio`, so py-spiffe; also C++, Ruby, PHP) and
//! grpc-java reach the development Workload API over its unix socket.
//!
//! Those clients send the socket path as the HTTP/2 `:authority` (percent-encoded, e.g.
//! `tmp%2Fagent.sock`), which is not a valid authority; the `h2` crate under tonic rejects
//! the whole request with `RST_STREAM(PROTOCOL_ERROR)` (hyperium/h2#487, grpc/grpc#38142),
//! while SPIRE (Go) accepts it. [`AuthorityFix`] wraps each accepted connection and, on the
//! client-to-server side only, decodes every header block (HPACK, with the client's dynamic
//! table), replaces an invalid `:authority` with `localhost`, and re-encodes the block as
//! literals without indexing, so the server's HPACK table stays empty and in sync. All
//! other frames pass through untouched; the server-to-client side is not touched at all.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER_LEN: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The largest frame payload we emit: the HTTP/2 default `SETTINGS_MAX_FRAME_SIZE`, which
/// the server never lowers.
const MAX_OUT_FRAME: usize = 16_384;
/// The largest frame or header block accepted from a client (the server's own limits are
/// lower; this only bounds memory before it gets to say so).
const MAX_IN_FRAME: usize = 1 << 20;
const MAX_HEADER_BLOCK: usize = 1 << 20;
/// What replaces an invalid `:authority`.
const REPLACEMENT_AUTHORITY: &[u8] = b"localhost";

/// A unix-socket connection whose client header blocks are normalised as described in the
/// module documentation.
pub struct AuthorityFix {
    inner: UnixStream,
    /// Raw bytes from the client not yet parsed into whole frames.
    incoming: Vec<u8>,
    /// Rewritten bytes ready for the server, from `outgoing_pos` on.
    outgoing: Vec<u8>,
    outgoing_pos: usize,
    preface_seen: bool,
    /// A header block awaiting its CONTINUATION frames.
    pending: Option<PendingBlock>,
    decoder: loona_hpack::Decoder<'static>,
    eof: bool,
}

struct PendingBlock {
    stream_id: [u8; 4],
    end_stream: bool,
    priority: Option<[u8; 5]>,
    block: Vec<u8>,
}

impl AuthorityFix {
    /// Wraps an accepted connection.
    pub fn new(inner: UnixStream) -> Self {
        Self {
            inner,
            incoming: Vec::new(),
            outgoing: Vec::new(),
            outgoing_pos: 0,
            preface_seen: false,
            pending: None,
            decoder: loona_hpack::Decoder::new(),
            eof: false,
        }
    }

    /// Moves every complete frame from `incoming` to `outgoing`, rewriting header blocks.
    fn process(&mut self) -> io::Result<()> {
        if !self.preface_seen {
            if self.incoming.len() < PREFACE.len() {
                return Ok(());
            }
            // Whatever it is, the server judges it; only a real preface is followed by frames.
            self.outgoing.extend(self.incoming.drain(..PREFACE.len()));
            self.preface_seen = true;
        }
        loop {
            let Some(header) = self.incoming.get(..FRAME_HEADER_LEN) else {
                return Ok(());
            };
            let len =
                usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]);
            if len > MAX_IN_FRAME {
                return Err(protocol_error("frame too large"));
            }
            if self.incoming.len() < FRAME_HEADER_LEN + len {
                return Ok(());
            }
            let frame: Vec<u8> = self.incoming.drain(..FRAME_HEADER_LEN + len).collect();
            self.frame(&frame)?;
        }
    }

    fn frame(&mut self, frame: &[u8]) -> io::Result<()> {
        let (header, payload) = frame.split_at(FRAME_HEADER_LEN);
        let (kind, flags) = (header[3], header[4]);
        let mut stream_id = [0u8; 4];
        stream_id.copy_from_slice(&header[5..9]);

        if let Some(mut pending) = self.pending.take() {
            if kind != CONTINUATION || stream_id != pending.stream_id {
                return Err(protocol_error("header block interrupted"));
            }
            append_bounded(&mut pending.block, payload)?;
            if flags & END_HEADERS != 0 {
                return self.emit_headers(pending);
            }
            self.pending = Some(pending);
            return Ok(());
        }
        if kind != HEADERS {
            self.outgoing.extend_from_slice(frame);
            return Ok(());
        }

        let mut rest = payload;
        let mut pad = 0;
        if flags & PADDED != 0 {
            let (&len, tail) = rest
                .split_first()
                .ok_or_else(|| protocol_error("bad padding"))?;
            pad = usize::from(len);
            rest = tail;
        }
        let mut priority = None;
        if flags & PRIORITY != 0 {
            let (fields, tail) = rest
                .split_at_checked(5)
                .ok_or_else(|| protocol_error("bad priority"))?;
            let mut p = [0u8; 5];
            p.copy_from_slice(fields);
            priority = Some(p);
            rest = tail;
        }
        let fragment = rest
            .get(
                ..rest
                    .len()
                    .checked_sub(pad)
                    .ok_or_else(|| protocol_error("bad padding"))?,
            )
            .ok_or_else(|| protocol_error("bad padding"))?;
        let mut block = Vec::new();
        append_bounded(&mut block, fragment)?;
        let pending = PendingBlock {
            stream_id,
            end_stream: flags & END_STREAM != 0,
            priority,
            block,
        };
        if flags & END_HEADERS != 0 {
            self.emit_headers(pending)
        } else {
            self.pending = Some(pending);
            Ok(())
        }
    }

    fn emit_headers(&mut self, pending: PendingBlock) -> io::Result<()> {
        let mut fields = Vec::new();
        self.decoder
            .decode_with_cb(&pending.block, |name, value| {
                let value = if name.as_ref() == b":authority" && !valid_authority(&value) {
                    REPLACEMENT_AUTHORITY.to_vec()
                } else {
                    value.into_owned()
                };
                fields.push((name.into_owned(), value));
            })
            .map_err(|e| protocol_error(&format!("undecodable header block: {e:?}")))?;

        let mut payload = Vec::new();
        if let Some(priority) = pending.priority {
            payload.extend_from_slice(&priority);
        }
        for (name, value) in &fields {
            // Literal header field without indexing, new name (RFC 7541 section 6.2.2).
            payload.push(0x00);
            encode_string(&mut payload, name);
            encode_string(&mut payload, value);
        }

        let mut flags = if pending.end_stream { END_STREAM } else { 0 };
        if pending.priority.is_some() {
            flags |= PRIORITY;
        }
        let mut chunks = payload.chunks(MAX_OUT_FRAME).peekable();
        let mut kind = HEADERS;
        // An empty block still needs its one HEADERS frame.
        let first_empty: &[u8] = &[];
        let mut chunk = chunks.next().unwrap_or(first_empty);
        loop {
            let last = chunks.peek().is_none();
            let frame_flags = if last { flags | END_HEADERS } else { flags };
            self.write_frame(kind, frame_flags, pending.stream_id, chunk);
            match chunks.next() {
                Some(next) => chunk = next,
                None => return Ok(()),
            }
            kind = CONTINUATION;
            // Only HEADERS carries END_STREAM and PRIORITY.
            flags = 0;
        }
    }

    fn write_frame(&mut self, kind: u8, flags: u8, stream_id: [u8; 4], payload: &[u8]) {
        let len = payload.len();
        self.outgoing.extend_from_slice(&[
            (len >> 16) as u8,
            (len >> 8) as u8,
            len as u8,
            kind,
            flags,
        ]);
        self.outgoing.extend_from_slice(&stream_id);
        self.outgoing.extend_from_slice(payload);
    }
}

/// Whether `h2` would accept `value` as an `:authority`.
fn valid_authority(value: &[u8]) -> bool {
    tonic::codegen::http::uri::Authority::try_from(value).is_ok()
}

/// An HPACK string literal without Huffman coding (RFC 7541 sections 5.1 and 5.2).
fn encode_string(out: &mut Vec<u8>, bytes: &[u8]) {
    let mut len = bytes.len();
    if len < 0x7f {
        out.push(len as u8);
    } else {
        out.push(0x7f);
        len -= 0x7f;
        while len >= 0x80 {
            out.push((len & 0x7f) as u8 | 0x80);
            len >>= 7;
        }
        out.push(len as u8);
    }
    out.extend_from_slice(bytes);
}

fn append_bounded(block: &mut Vec<u8>, fragment: &[u8]) -> io::Result<()> {
    if block.len() + fragment.len() > MAX_HEADER_BLOCK {
        return Err(protocol_error("header block too large"));
    }
    block.extend_from_slice(fragment);
    Ok(())
}

fn protocol_error(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("HTTP/2 from a Workload API client: {what}"),
    )
}

impl AsyncRead for AuthorityFix {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.outgoing_pos < this.outgoing.len() {
                let ready = &this.outgoing[this.outgoing_pos..];
                let n = ready.len().min(buf.remaining());
                buf.put_slice(&ready[..n]);
                this.outgoing_pos += n;
                if this.outgoing_pos == this.outgoing.len() {
                    this.outgoing.clear();
                    this.outgoing_pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; 8192];
            let mut read = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
            if read.filled().is_empty() {
                // The client closed: hand over whatever is left as it is.
                this.eof = true;
                this.outgoing.append(&mut this.incoming);
                continue;
            }
            this.incoming.extend_from_slice(read.filled());
            this.process()?;
        }
    }
}

impl AsyncWrite for AuthorityFix {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for AuthorityFix {
    type ConnectInfo = <UnixStream as tonic::transport::server::Connected>::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// Runs raw client bytes through the rewriter and decodes what the server would see.
    type Block = Vec<(Vec<u8>, Vec<u8>)>;

    fn rewrite(input: &[u8]) -> (Vec<Block>, Vec<u8>) {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _guard = rt.enter();
        let mut fix = AuthorityFix::new(UnixStream::from_std(a).unwrap());
        fix.incoming.extend_from_slice(input);
        fix.process().unwrap();
        let out = fix.outgoing.clone();
        assert_eq!(&out[..PREFACE.len()], PREFACE);
        let mut server = loona_hpack::Decoder::new();
        let mut blocks = Vec::new();
        let mut rest = &out[PREFACE.len()..];
        let mut other = Vec::new();
        while !rest.is_empty() {
            let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
            let (f, tail) = rest.split_at(9 + len);
            if f[3] == HEADERS {
                blocks.push(server.decode(&f[9..]).unwrap());
            } else {
                other.extend_from_slice(f);
            }
            rest = tail;
        }
        (blocks, other)
    }

    #[test]
    fn an_invalid_authority_becomes_localhost_and_the_rest_survives() {
        let mut client = loona_hpack::Encoder::new();
        let first = client.encode([
            (&b":method"[..], &b"POST"[..]),
            (b":authority", b"tmp%2Fwl%2Fapi.sock"),
            (b":path", b"/SpiffeWorkloadAPI/FetchX509SVID"),
            (b"workload.spiffe.io", b"true"),
        ]);
        // The second request refers to the first one's entries through the dynamic table.
        let second = client.encode([
            (&b":method"[..], &b"POST"[..]),
            (b":authority", b"tmp%2Fwl%2Fapi.sock"),
            (b":path", b"/SpiffeWorkloadAPI/FetchX509Bundles"),
            (b"workload.spiffe.io", b"true"),
        ]);
        let settings = frame(0x4, 0, 0, &[]);
        // The first block split over HEADERS + CONTINUATION, with padding.
        let (a, b) = first.split_at(3);
        let mut padded = vec![2u8];
        padded.extend_from_slice(a);
        padded.extend_from_slice(&[0, 0]);
        let mut input = PREFACE.to_vec();
        input.extend(settings.clone());
        input.extend(frame(HEADERS, PADDED, 1, &padded));
        input.extend(frame(CONTINUATION, END_HEADERS, 1, b));
        input.extend(frame(HEADERS, END_HEADERS | END_STREAM, 3, &second));

        let (blocks, other) = rewrite(&input);
        assert_eq!(other, settings);
        assert_eq!(blocks.len(), 2);
        for (block, path) in blocks.iter().zip([
            "/SpiffeWorkloadAPI/FetchX509SVID",
            "/SpiffeWorkloadAPI/FetchX509Bundles",
        ]) {
            let get = |n: &str| {
                block
                    .iter()
                    .find(|(k, _)| k == n.as_bytes())
                    .map(|(_, v)| v.clone())
            };
            assert_eq!(get(":authority").unwrap(), b"localhost");
            assert_eq!(get(":path").unwrap(), path.as_bytes());
            assert_eq!(get("workload.spiffe.io").unwrap(), b"true");
        }
    }

    #[test]
    fn a_valid_authority_is_kept_and_garbage_is_an_error() {
        let mut client = loona_hpack::Encoder::new();
        let block = client.encode([(&b":authority"[..], &b"localhost:8081"[..])]);
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_HEADERS, 1, &block));
        let (blocks, _) = rewrite(&input);
        assert_eq!(blocks[0][0].1, b"localhost:8081");

        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _guard = rt.enter();
        let mut fix = AuthorityFix::new(UnixStream::from_std(a).unwrap());
        fix.incoming.extend_from_slice(PREFACE);
        fix.incoming.extend(frame(
            HEADERS,
            END_HEADERS,
            1,
            &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
        ));
        assert!(fix.process().is_err());
        let mut huge = PREFACE.to_vec();
        huge.extend_from_slice(&[0xff, 0xff, 0xff, HEADERS, 0, 0, 0, 0, 1]);
        let (c, _d) = std::os::unix::net::UnixStream::pair().unwrap();
        c.set_nonblocking(true).unwrap();
        let mut fix2 = AuthorityFix::new(UnixStream::from_std(c).unwrap());
        fix2.incoming = huge;
        assert!(fix2.process().is_err());
    }
}
