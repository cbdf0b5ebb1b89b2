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
        )?),
        FileKind::JsonLines => Box::new(LineRecords::open(shared, LineMode::Json)?),
        FileKind::Json => {
            let mut reader = BufReader::with_capacity(
                1 << 16,
                File::open(path).map_err(|e| Error::io(path, e))?,
            );
            let first = first_non_ws(&mut reader).map_err(|e| Error::io(path, e))?;
            if first == Some(b'[') {
                Box::new(JsonArrayRecords::new(shared, reader))
            } else {
                Box::new(LineRecords::open(shared, LineMode::Json)?)
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

/// JSON lines or text lines.
struct LineRecords {
    path: Arc<Path>,
    reader: BufReader<File>,
    mode: LineMode,
    line: u64,
    buf: Vec<u8>,
    done: bool,
}

impl LineRecords {
    fn open(path: Arc<Path>, mode: LineMode) -> Result<Self> {
        let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
        Ok(LineRecords {
            path,
            reader: BufReader::with_capacity(1 << 16, file),
            mode,
            line: 0,
            buf: Vec::new(),
            done: false,
        })
    }
}

impl Iterator for LineRecords {
    type Item = Result<Record>;

    fn next(&mut self) -> Option<Self::Item> {
        while !self.done {
            self.buf.clear();
            match self.reader.read_until(b'\n', &mut self.buf) {
                Ok(0) => self.done = true,
                Ok(_) => {
                    self.line += 1;
                    let at = Location {
                        path: self.path.clone(),
                        line: self.line,
                    };
                    let line = self.buf.trim_ascii();
                    if line.is_empty() {
                        continue;
                    }
                    return Some(match &self.mode {
                        LineMode::Json => serde_json::from_slice(line)
                            .map(|value| Record {
                                at: at.clone(),
                                value,
                            })
                            .map_err(|e| Error::Json {
                                at,
                                message: json_message(&e).1,
                            }),
                        LineMode::Text(col) => match std::str::from_utf8(line) {
                            Ok(s) => {
                                let mut m = serde_json::Map::new();
                                m.insert(col.clone(), Value::String(s.to_string()));
                                Ok(Record {
                                    at,
                                    value: Value::Object(m),
                                })
                            }
                            Err(e) => Err(Error::field(
                                &at,
                                col.as_str(),
                                format!("invalid UTF-8: {e}"),
                            )),
                        },
                    });
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
    fn new(path: Arc<Path>, reader: BufReader<File>) -> Self {
        JsonArrayRecords {
            path,
            reader,
            line: 1,
            state: ArrayState::Start,
            elem: Vec::new(),
        }
    }

    fn peek(&mut self) -> std::io::Result<Option<u8>> {
        Ok(self.reader.fill_buf()?.first().copied())
    }

    fn bump(&mut self) {
        self.reader.consume(1);
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
    fn scan_element(&mut self) -> std::io::Result<()> {
        self.elem.clear();
        let (mut depth, mut in_str, mut esc) = (0usize, false, false);
        loop {
            let buf = self.reader.fill_buf()?;
            if buf.is_empty() {
                return Ok(());
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
            self.elem.extend_from_slice(&buf[..used]);
            self.reader.consume(used);
            if finished {
                return Ok(());
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
                    if let Err(e) = self.scan_element() {
                        return io(self, e);
                    }
                    self.state = ArrayState::Next;
                    return Some(
                        serde_json::from_slice(&self.elem)
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
                }
            }
        }
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
