//! Streaming record readers: each yields one JSON value per record with its
//! [`Location`], holding only the current record in memory.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;

use crate::error::{Error, Location, Result};
use crate::source::FileKind;

/// One raw record.
#[derive(Debug, Clone)]
pub struct Record {
    /// Where it came from.
    pub at: Location,
    /// The record (text lines become `{text_column: line}`).
    pub value: Value,
}

/// Records of one file, streamed.
pub type RecordIter = Box<dyn Iterator<Item = Result<Record>> + Send>;

/// Open `path` as a record stream; `text_column` names the key text lines
/// are stored under.
pub fn read_file(path: &Path, text_column: &str) -> Result<RecordIter> {
    read_file_bounded(path, text_column, usize::MAX)
}

/// As [`read_file`], cutting every JSON string longer than `max_string`
/// bytes (at a character boundary) while it is parsed — except an object's
/// top-level `text_column`, whose every token a text example uses. A huge
/// line is then held once (its bytes) while it is read, not again as
/// parsed strings, and the line buffer is released after it.
pub fn read_file_bounded(path: &Path, text_column: &str, max_string: usize) -> Result<RecordIter> {
    let bound = Bound {
        max: max_string,
        keep: text_column.to_string(),
    };
    let kind = FileKind::of(path).ok_or_else(|| Error::Io {
        path: path.to_path_buf(),
        source: std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "unknown file type (expected .jsonl, .json, .parquet or .txt)",
        ),
    })?;
    let shared: Arc<Path> = Arc::from(path);
    Ok(match kind {
        FileKind::Parquet => Box::new(ParquetRecords::open(path)?),
        FileKind::Text => Box::new(LineRecords::open(
            shared,
            LineMode::Text(text_column.to_string()),
            bound,
        )?),
        FileKind::JsonLines => Box::new(LineRecords::open(shared, LineMode::Json, bound)?),
        FileKind::Json => {
            let mut reader = BufReader::with_capacity(
                1 << 16,
                File::open(path).map_err(|e| Error::io(path, e))?,
            );
            let first = first_non_ws(&mut reader).map_err(|e| Error::io(path, e))?;
            if first == Some(b'[') {
                Box::new(JsonArrayRecords::new(shared, reader, bound))
            } else {
                Box::new(LineRecords::open(shared, LineMode::Json, bound)?)
            }
        }
    })
}

fn first_non_ws(r: &mut impl BufRead) -> std::io::Result<Option<u8>> {
    let buf = r.fill_buf()?;
    Ok(buf.iter().copied().find(|b| !b.is_ascii_whitespace()))
}

enum LineMode {
    Json,
    Text(String),
}

/// Line buffers above this capacity are released after their line.
const KEEP_BUFFER: usize = 4 << 20;

/// How long parsed strings may be.
#[derive(Clone)]
struct Bound {
    /// Longest string kept, bytes.
    max: usize,
    /// The top-level key whose string is kept whole.
    keep: String,
}

/// Cuts the JSON strings of one record's bytes as they stream past: past
/// `max` characters a string's bytes are dropped up to its closing quote
/// (never inside an escape or a UTF-8 sequence), except the string value of
/// the top-level key `keep`. The output is valid JSON when the input is; a
/// huge record is never held whole.
struct Cutter {
    max: usize,
    keep: Vec<u8>,
    /// Per open container: (is an object, expects a key next).
    stack: Vec<(bool, bool)>,
    in_str: bool,
    esc: bool,
    hex_left: u8,
    /// Characters of the current string so far.
    len: usize,
    is_key: bool,
    exempt: bool,
    skipping: bool,
    key: Vec<u8>,
    last_key: Vec<u8>,
    /// Bytes kept so far and, per run of dropped bytes, (kept bytes before
    /// it, bytes dropped): maps offsets in the output back to the input.
    kept: usize,
    skips: Vec<(usize, usize)>,
}

impl Cutter {
    fn new(max: usize, keep: &str) -> Self {
        Cutter {
            max,
            keep: keep.as_bytes().to_vec(),
            stack: Vec::new(),
            in_str: false,
            esc: false,
            hex_left: 0,
            len: 0,
            is_key: false,
            exempt: false,
            skipping: false,
            key: Vec::new(),
            last_key: Vec::new(),
            kept: 0,
            skips: Vec::new(),
        }
    }

    /// Whether to keep byte `b`.
    fn feed(&mut self, b: u8) -> bool {
        let keep = self.decide(b);
        if keep {
            self.kept += 1;
        } else {
            match self.skips.last_mut() {
                Some((at, n)) if *at == self.kept => *n += 1,
                _ => self.skips.push((self.kept, 1)),
            }
        }
        keep
    }

    fn decide(&mut self, b: u8) -> bool {
        if !self.in_str {
            match b {
                b'"' => {
                    self.in_str = true;
                    self.len = 0;
                    self.skipping = false;
                    self.is_key = self.stack.last() == Some(&(true, true));
                    self.exempt =
                        !self.is_key && self.stack.len() == 1 && self.last_key == self.keep;
                    self.key.clear();
                }
                b'{' => self.stack.push((true, true)),
                b'[' => self.stack.push((false, false)),
                b'}' | b']' => {
                    self.stack.pop();
                }
                b':' | b',' => {
                    if let Some(top) = self.stack.last_mut() {
                        // In an object a colon ends the key, a comma starts
                        // the next one.
                        top.1 = top.0 && b == b',';
                    }
                }
                _ => {}
            }
            return true;
        }
        // Inside a string.
        if self.hex_left > 0 {
            self.hex_left -= 1;
            return !self.skipping;
        }
        if self.esc {
            self.esc = false;
            if b == b'u' {
                self.hex_left = 4;
            }
            return !self.skipping;
        }
        match b {
            b'"' => {
                self.in_str = false;
                self.skipping = false;
                if self.is_key && self.stack.len() == 1 {
                    self.last_key = std::mem::take(&mut self.key);
                }
                true
            }
            _ => {
                let starts_char = b & 0xC0 != 0x80;
                if starts_char && !self.exempt && !self.is_key && self.len >= self.max {
                    self.skipping = true;
                }
                if self.skipping {
                    if b == b'\\' {
                        self.esc = true;
                    }
                    return false;
                }
                if starts_char {
                    self.len += 1;
                }
                if b == b'\\' {
                    self.esc = true;
                }
                if self.is_key && self.stack.len() == 1 && self.key.len() < 256 {
                    self.key.push(b);
                }
                true
            }
        }
    }

    /// The input offset of output offset `at`.
    fn source_offset(&self, at: usize) -> usize {
        at + self
            .skips
            .iter()
            .take_while(|(k, _)| *k <= at)
            .map(|(_, n)| n)
            .sum::<usize>()
    }
}

/// JSON lines or text lines.
struct LineRecords {
    path: Arc<Path>,
    reader: BufReader<File>,
    mode: LineMode,
    bound: Bound,
    line: u64,
    /// File offset of the start of `buf`.
    pos: u64,
    buf: Vec<u8>,
    done: bool,
}

impl LineRecords {
    fn open(path: Arc<Path>, mode: LineMode, bound: Bound) -> Result<Self> {
        let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
        Ok(LineRecords {
            path,
            reader: BufReader::with_capacity(1 << 16, file),
            mode,
            bound,
            line: 0,
            pos: 0,
            buf: Vec::new(),
            done: false,
        })
    }
}

impl LineRecords {
    /// Reads the next line into `buf` (its strings cut per `bound` in JSON
    /// mode once the line outgrows the bound); the bytes it took from the
    /// file (0 at the end) and the cutter, if one ran.
    fn read_line(&mut self) -> std::io::Result<(usize, Option<Cutter>)> {
        self.buf.clear();
        let bounded = matches!(self.mode, LineMode::Json) && self.bound.max < usize::MAX;
        if !bounded {
            return Ok((self.reader.read_until(b'\n', &mut self.buf)?, None));
        }
        let mut cutter: Option<Cutter> = None;
        let mut consumed = 0;
        loop {
            let avail = self.reader.fill_buf()?;
            if avail.is_empty() {
                return Ok((consumed, cutter));
            }
            let (n, done) = match avail.iter().position(|&b| b == b'\n') {
                Some(i) => (i + 1, true),
                None => (avail.len(), false),
            };
            let chunk = &avail[..n];
            match cutter.as_mut() {
                None => {
                    self.buf.extend_from_slice(chunk);
                    if self.buf.len() > self.bound.max {
                        let mut c = Cutter::new(self.bound.max, &self.bound.keep);
                        let old = std::mem::take(&mut self.buf);
                        self.buf = old.iter().copied().filter(|&b| c.feed(b)).collect();
                        cutter = Some(c);
                    }
                }
                Some(c) => self
                    .buf
                    .extend(chunk.iter().copied().filter(|&b| c.feed(b))),
            }
            self.reader.consume(n);
            consumed += n;
            if done {
                return Ok((consumed, cutter));
            }
        }
    }
}

impl Iterator for LineRecords {
    type Item = Result<Record>;

    fn next(&mut self) -> Option<Self::Item> {
        while !self.done {
            match self.read_line() {
                Ok((0, _)) => self.done = true,
                Ok((n, cutter)) => {
                    self.line += 1;
                    let start = self.pos;
                    self.pos += n as u64;
                    let at = Location {
                        path: self.path.clone(),
                        line: self.line,
                    };
                    if self.buf.trim_ascii().is_empty() {
                        continue;
                    }
                    let text = match std::str::from_utf8(&self.buf) {
                        Ok(s) => s.trim_ascii(),
                        Err(e) => {
                            return Some(Err(not_utf8(&self.buf, &e, at, start, cutter.as_ref())))
                        }
                    };
                    let record = match &self.mode {
                        LineMode::Json => serde_json::from_str(text)
                            .map(|value| Record {
                                at: at.clone(),
                                value,
                            })
                            .map_err(|e| Error::Json {
                                at,
                                message: json_message(&e).1,
                            }),
                        LineMode::Text(col) => {
                            let mut m = serde_json::Map::new();
                            m.insert(col.clone(), Value::String(text.to_string()));
                            Ok(Record {
                                at,
                                value: Value::Object(m),
                            })
                        }
                    };
                    if self.buf.capacity() > KEEP_BUFFER {
                        self.buf = Vec::new();
                    }
                    return Some(record);
                }
                Err(e) => {
                    self.done = true;
                    return Some(Err(Error::io(&self.path, e)));
                }
            }
        }
        None
    }
}

/// Elements of a top-level JSON array, split by a byte scanner that tracks
/// nesting and strings, so that only one element is in memory at a time.
struct JsonArrayRecords {
    path: Arc<Path>,
    reader: BufReader<File>,
    line: u64,
    /// File offset of the next unread byte.
    pos: u64,
    bound: Bound,
    state: ArrayState,
    elem: Vec<u8>,
}

#[derive(PartialEq)]
enum ArrayState {
    Start,
    First,
    Next,
    Done,
}

impl JsonArrayRecords {
    fn new(path: Arc<Path>, reader: BufReader<File>, bound: Bound) -> Self {
        JsonArrayRecords {
            path,
            reader,
            line: 1,
            pos: 0,
            bound,
            state: ArrayState::Start,
            elem: Vec::new(),
        }
    }

    fn peek(&mut self) -> std::io::Result<Option<u8>> {
        Ok(self.reader.fill_buf()?.first().copied())
    }

    fn bump(&mut self) {
        self.reader.consume(1);
        self.pos += 1;
    }

    fn skip_ws(&mut self) -> std::io::Result<Option<u8>> {
        while let Some(b) = self.peek()? {
            if !b.is_ascii_whitespace() {
                return Ok(Some(b));
            }
            if b == b'\n' {
                self.line += 1;
            }
            self.bump();
        }
        Ok(None)
    }

    fn syntax(&mut self, message: &str) -> Option<Result<Record>> {
        self.state = ArrayState::Done;
        Some(Err(Error::Json {
            at: Location {
                path: self.path.clone(),
                line: self.line,
            },
            message: message.to_string(),
        }))
    }

    /// Reads one element into `self.elem`; stops before the `,` or `]`
    /// that ends it.
    fn scan_element(&mut self) -> std::io::Result<Option<Cutter>> {
        self.elem.clear();
        let (mut depth, mut in_str, mut esc) = (0usize, false, false);
        let mut cutter: Option<Cutter> = None;
        loop {
            let buf = self.reader.fill_buf()?;
            if buf.is_empty() {
                return Ok(cutter);
            }
            let mut used = 0;
            let mut finished = false;
            for &b in buf {
                if in_str {
                    match b {
                        _ if esc => esc = false,
                        b'\\' => esc = true,
                        b'"' => in_str = false,
                        _ => {}
                    }
                } else {
                    match b {
                        b'"' => in_str = true,
                        b'{' | b'[' => depth += 1,
                        b'}' | b']' if depth > 0 => depth -= 1,
                        b',' | b']' if depth == 0 => {
                            finished = true;
                            break;
                        }
                        _ => {}
                    }
                }
                if b == b'\n' {
                    self.line += 1;
                }
                used += 1;
            }
            match cutter.as_mut() {
                None => {
                    self.elem.extend_from_slice(&buf[..used]);
                    if self.elem.len() > self.bound.max {
                        let mut c = Cutter::new(self.bound.max, &self.bound.keep);
                        let old = std::mem::take(&mut self.elem);
                        self.elem = old.iter().copied().filter(|&b| c.feed(b)).collect();
                        cutter = Some(c);
                    }
                }
                Some(c) => self
                    .elem
                    .extend(buf[..used].iter().copied().filter(|&b| c.feed(b))),
            }
            self.reader.consume(used);
            self.pos += used as u64;
            if finished {
                return Ok(cutter);
            }
        }
    }
}

impl Iterator for JsonArrayRecords {
    type Item = Result<Record>;

    fn next(&mut self) -> Option<Self::Item> {
        let io = |s: &mut Self, e: std::io::Error| {
            s.state = ArrayState::Done;
            Some(Err(Error::io(&s.path, e)))
        };
        loop {
            let b = match self.skip_ws() {
                Ok(b) => b,
                Err(e) => return io(self, e),
            };
            match (&self.state, b) {
                (ArrayState::Done, _) => return None,
                (ArrayState::Start, Some(b'[')) => {
                    self.bump();
                    self.state = ArrayState::First;
                }
                (ArrayState::Start, _) => {
                    return self.syntax("expected `[` at the start of a JSON array file")
                }
                (ArrayState::First | ArrayState::Next, Some(b']')) => {
                    self.bump();
                    self.state = ArrayState::Done;
                    return match self.skip_ws() {
                        Ok(None) => None,
                        Ok(Some(_)) => self.syntax("trailing characters after the array"),
                        Err(e) => io(self, e),
                    };
                }
                (ArrayState::Next, Some(b',')) => {
                    self.bump();
                    self.state = ArrayState::First;
                    match self.skip_ws() {
                        Ok(Some(b']')) => return self.syntax("trailing comma before `]`"),
                        Ok(_) => {}
                        Err(e) => return io(self, e),
                    }
                }
                (ArrayState::Next, _) => {
                    return self.syntax("expected `,` or `]` after an array element")
                }
                (ArrayState::First, None) => {
                    return self.syntax("unexpected end of file inside the array")
                }
                (ArrayState::First, Some(_)) => {
                    let at = Location {
                        path: self.path.clone(),
                        line: self.line,
                    };
                    let start = self.pos;
                    let cutter = match self.scan_element() {
                        Ok(c) => c,
                        Err(e) => return io(self, e),
                    };
                    self.state = ArrayState::Next;
                    let text = match std::str::from_utf8(&self.elem) {
                        Ok(s) => s,
                        Err(e) => {
                            return Some(Err(not_utf8(&self.elem, &e, at, start, cutter.as_ref())))
                        }
                    };
                    let record = Some(
                        serde_json::from_str(text)
                            .map(|value| Record {
                                at: at.clone(),
                                value,
                            })
                            .map_err(|e| {
                                let (lines_in, message) = json_message(&e);
                                Error::Json {
                                    at: Location {
                                        line: at.line + lines_in,
                                        ..at
                                    },
                                    message,
                                }
                            }),
                    );
                    if self.elem.capacity() > KEEP_BUFFER {
                        self.elem = Vec::new();
                    }
                    return record;
                }
            }
        }
    }
}

/// The error for `bytes` (read from `start` in the file, beginning on
/// `at.line`) failing UTF-8 validation: the line of the bad byte and its
/// offsets in that line and in the file.
/// `cutter`, when strings were cut, maps offsets back to the file's.
fn not_utf8(
    bytes: &[u8],
    e: &std::str::Utf8Error,
    at: Location,
    start: u64,
    cutter: Option<&Cutter>,
) -> Error {
    let bad = e.valid_up_to();
    let before = &bytes[..bad];
    let newlines = before.iter().filter(|&&b| b == b'\n').count() as u64;
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |p| p + 1);
    let src = |o: usize| cutter.map_or(o, |c| c.source_offset(o)) as u64;
    Error::NotUtf8 {
        at: Location {
            line: at.line + newlines,
            ..at
        },
        byte: bytes[bad],
        offset: src(bad) - src(line_start),
        file_offset: start + src(bad),
    }
}

/// serde_json's message without its "at line L column C" (the record's own
/// line numbers mean nothing to the user), with the lines into the record
/// where it failed and the column.
fn json_message(e: &serde_json::Error) -> (u64, String) {
    let full = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    let base = full.strip_suffix(&suffix).unwrap_or(&full);
    let message = if e.column() > 0 {
        format!("{base} (column {})", e.column())
    } else {
        base.to_string()
    };
    (e.line().saturating_sub(1) as u64, message)
}

/// Runs a call into the Parquet reader, which panics on some malformed
/// files (an `unwrap` in its metadata decoder); the panic becomes an error
/// naming the file.
fn parquet_guard<T>(path: &Path, f: impl FnOnce() -> T) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|_| Error::Parquet {
        path: path.to_path_buf(),
        message: "the Parquet reader failed on malformed metadata".into(),
    })
}

/// Rows of a Parquet file (row groups are read one at a time); the
/// location's line is the 1-based row number.
struct ParquetRecords {
    path: PathBuf,
    shared: Arc<Path>,
    rows: parquet::record::reader::RowIter<'static>,
    row: u64,
    done: bool,
}

impl ParquetRecords {
    fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let reader = parquet_guard(path, || {
            parquet::file::serialized_reader::SerializedFileReader::try_from(file)
        })?
        .map_err(|e| Error::Parquet {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Ok(ParquetRecords {
            path: path.to_path_buf(),
            shared: Arc::from(path),
            rows: reader.into_iter(),
            row: 0,
            done: false,
        })
    }
}

impl Iterator for ParquetRecords {
    type Item = Result<Record>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let rows = &mut self.rows;
        let row = match parquet_guard(&self.path, || rows.next()) {
            Ok(row) => row?,
            Err(e) => {
                self.done = true;
                return Some(Err(e));
            }
        };
        self.row += 1;
        Some(match row {
            Ok(row) => Ok(Record {
                at: Location {
                    path: self.shared.clone(),
                    line: self.row,
                },
                value: row.to_json_value(),
            }),
            Err(e) => {
                self.done = true;
                Err(Error::Parquet {
                    path: self.path.clone(),
                    message: format!("row {}: {e}", self.row),
                })
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cut(json: &str, max: usize, keep: &str) -> Value {
        let mut c = Cutter::new(max, keep);
        let out: Vec<u8> = json.bytes().filter(|&b| c.feed(b)).collect();
        serde_json::from_slice(&out).expect("the cut record is valid JSON")
    }

    #[test]
    fn long_strings_are_cut_and_short_ones_kept() {
        let long = "é".repeat(50) + &"x".repeat(100);
        let rec = format!(
            r#"{{"a": "{long}", "text": "{long}", "m": [{{"text": "{long}", "k": "short"}}], "n": 12, "e": "\u00e9\u00e9\u00e9\u00e9\u00e9\n\""}}"#
        );
        let v = cut(&rec, 3, "text");
        assert_eq!(v["a"], "ééé");
        // The top-level text column is whole; a nested one is not.
        assert_eq!(v["text"].as_str().unwrap(), long);
        assert_eq!(v["m"][0]["text"], "ééé");
        assert_eq!(v["m"][0]["k"], "sho");
        assert_eq!(v["n"], 12);
        // Escapes are never split.
        assert_eq!(v["e"], "ééé");
        // Nothing changes under the bound.
        let v = cut(&rec, 1000, "text");
        assert_eq!(v, serde_json::from_str::<Value>(&rec).unwrap());
    }
}
