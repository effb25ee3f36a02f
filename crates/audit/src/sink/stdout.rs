//! The stdout sink: each batch is one write to standard output.

use std::io::{self, Write};

use super::{ChainHead, RecordWriter};

/// JSON lines on standard output.
#[derive(Debug, Default)]
pub(crate) struct StdoutSink {
    buf: Vec<u8>,
}

impl RecordWriter for StdoutSink {
    fn open(&mut self) -> io::Result<Option<ChainHead>> {
        self.buf.clear();
        Ok(None)
    }

    fn write_line(&mut self, line: &[u8]) -> io::Result<()> {
        self.buf.extend_from_slice(line);
        self.buf.push(b'\n');
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        let mut out = io::stdout().lock();
        let written = out.write_all(&self.buf).and_then(|()| out.flush());
        self.buf.clear();
        written
    }

    fn sync(&mut self) -> io::Result<()> {
        Ok(())
    }
}
