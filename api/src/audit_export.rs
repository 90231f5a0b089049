//! Signed audit exports (docs/audit-format.md, ADR 0023): the JSON Lines writer that chains
//! every line to the one before and signs checkpoints with the platform's Ed25519 audit
//! signing key, and the verifier that checks a file with the public key alone.
//!
//! Each line is one JSON object with `n` (its line number, from 1) and `prev` (SHA-256, hex,
//! of the exact bytes of the line before, 64 zeros for the first). Line 1 is the header;
//! then the entries, each carrying its seal; every `CHECKPOINT_EVERY` lines and at the end a
//! checkpoint signs `n` and `prev`, which pins every byte before it. The verifier names the
//! first line that is altered, missing, inserted or out of order.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, Seek, SeekFrom};
use std::sync::Arc;

use ekm_keys::SigningKey;
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

/// The `format` of the header line.
pub const EXPORT_FORMAT: &str = "ekm-audit-export";
/// The format's version (the header's `version`).
pub const EXPORT_VERSION: u64 = 1;
/// Lines between two signed checkpoints: an alteration whose author also recomputed the
/// chain after it is located to at most this many lines.
pub const CHECKPOINT_EVERY: u64 = 100;
/// The longest line a verifier reads (1 MiB): an entry is a few hundred bytes, and a longer
/// line is not read into memory whole.
pub const MAX_LINE_BYTES: usize = 1024 * 1024;
/// The deepest nesting of arrays and objects a line may have (within what every JSON parser
/// handles, so that independent verifiers agree).
pub const MAX_NESTING: usize = 64;
/// Domain separation of the signed checkpoint message.
const CHECKPOINT_LABEL: &str = "ekm-audit-export-checkpoint-v1";
const ZERO_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The message a checkpoint's signature covers.
fn checkpoint_message(n: u64, prev: &str, last: bool) -> String {
    format!(
        "{CHECKPOINT_LABEL}\n{n}\n{prev}\n{}",
        if last { "final" } else { "more" }
    )
}

fn line_hash(line: impl AsRef<[u8]>) -> String {
    hex::encode(Sha256::digest(line.as_ref()))
}

/// What the header line says about the export.
#[derive(Clone, Debug, Serialize)]
pub struct ExportHeader {
    pub org_id: String,
    pub exported_at: String,
    /// Every entry up to this position that matched the filter is in the export (the audit
    /// chain had sealed it when the export began).
    pub through_position: i64,
    /// The query's filters, as given (empty when the whole organization is exported).
    pub filter: BTreeMap<String, String>,
}

#[derive(Serialize)]
struct HeaderLine<'a> {
    n: u64,
    kind: &'static str,
    prev: &'a str,
    format: &'static str,
    version: u64,
    org_id: &'a str,
    exported_at: &'a str,
    through_position: i64,
    filter: &'a BTreeMap<String, String>,
    algorithm: &'static str,
    key_id: &'a str,
}

/// A checkpoint line, byte for byte: the format fixes it exactly, so that nothing can be
/// added to the last line of an export, which no later line hashes.
fn checkpoint_line(n: u64, prev: &str, last: bool, signature: &str) -> String {
    format!(
        "{{\"n\":{n},\"kind\":\"checkpoint\",\"prev\":\"{prev}\",\"final\":{last},\"signature\":\"{signature}\"}}"
    )
}

/// Writes a signed export, line by line. Every method returns whole lines, each ending in
/// `\n`, to be written in order.
pub struct ExportWriter {
    key: Arc<SigningKey>,
    /// The number of the next line.
    n: u64,
    /// The hash of the last line written.
    prev: String,
    since_checkpoint: u64,
}

impl ExportWriter {
    /// A writer, and the header line.
    pub fn start(key: Arc<SigningKey>, header: &ExportHeader) -> (ExportWriter, String) {
        let key_id = key.key_id();
        let mut writer = ExportWriter {
            key,
            n: 1,
            prev: ZERO_HASH.to_owned(),
            since_checkpoint: 0,
        };
        let line = serde_json::to_string(&HeaderLine {
            n: 1,
            kind: "header",
            prev: ZERO_HASH,
            format: EXPORT_FORMAT,
            version: EXPORT_VERSION,
            org_id: &header.org_id,
            exported_at: &header.exported_at,
            through_position: header.through_position,
            filter: &header.filter,
            algorithm: "ed25519",
            key_id: &key_id,
        })
        .unwrap_or_default();
        let mut out = String::new();
        writer.push(line, &mut out);
        (writer, out)
    }

    fn push(&mut self, line: String, out: &mut String) {
        self.prev = line_hash(&line);
        self.n += 1;
        self.since_checkpoint += 1;
        out.push_str(&line);
        out.push('\n');
    }

    fn checkpoint(&mut self, last: bool, out: &mut String) {
        let signature = self
            .key
            .sign(checkpoint_message(self.n, &self.prev, last).as_bytes());
        let line = checkpoint_line(self.n, &self.prev, last, &signature);
        self.push(line, out);
        self.since_checkpoint = 0;
    }

    /// The line of one entry (`kind` "event"; "access" for the access log), from its JSON
    /// object text, with its seal; followed by a signed checkpoint when one is due.
    pub fn entry(&mut self, kind: &str, entry_json: &str, seal: Option<&str>) -> String {
        let fields = entry_json
            .strip_prefix('{')
            .and_then(|t| t.strip_suffix('}'))
            .unwrap_or("");
        let mut line = String::with_capacity(entry_json.len() + 200);
        let _ = write!(
            line,
            "{{\"n\":{},\"kind\":{},\"prev\":\"{}\"",
            self.n,
            Value::String(kind.to_owned()),
            self.prev
        );
        if !fields.is_empty() {
            line.push(',');
            line.push_str(fields);
        }
        line.push_str(",\"seal\":");
        line.push_str(&seal.map_or_else(
            || "null".to_owned(),
            |s| Value::String(s.to_owned()).to_string(),
        ));
        line.push('}');
        let mut out = String::with_capacity(line.len() + 1);
        self.push(line, &mut out);
        if self.since_checkpoint >= CHECKPOINT_EVERY {
            self.checkpoint(false, &mut out);
        }
        out
    }

    /// The final signed checkpoint.
    pub fn finish(mut self) -> String {
        let mut out = String::new();
        self.checkpoint(true, &mut out);
        out
    }
}

/// What an intact export holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VerifiedExport {
    pub org_id: String,
    pub exported_at: String,
    /// The query's filters as the header states them: anything but `org` makes the export
    /// a partial one.
    pub filter: BTreeMap<String, String>,
    pub through_position: i64,
    pub lines: u64,
    pub entries: u64,
    pub checkpoints: u64,
    pub key_id: String,
}

impl VerifiedExport {
    /// Whether the export holds only the entries matching a filter (not the whole
    /// organization's log up to `through_position`).
    pub fn partial(&self) -> bool {
        self.filter.keys().any(|k| k != "org")
    }
}

/// The first thing wrong with an export: the physical line (1-based) and what happened to it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ExportFailure {
    pub line: u64,
    /// `altered`, `missing`, `inserted`, `reordered`, `truncated` or `wrong_key`.
    pub problem: &'static str,
    pub detail: String,
}

fn fail(line: u64, problem: &'static str, detail: impl Into<String>) -> ExportFailure {
    ExportFailure {
        line,
        problem,
        detail: detail.into(),
    }
}

struct Parsed {
    n: Option<u64>,
    prev: Option<String>,
    object: Option<serde_json::Map<String, Value>>,
}

/// The deepest nesting of arrays and objects in `line`, outside strings.
pub(crate) fn nesting(line: &[u8]) -> usize {
    let (mut depth, mut deepest, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for &b in line {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

fn parse(line: &[u8]) -> Parsed {
    let unparsed = Parsed {
        n: None,
        prev: None,
        object: None,
    };
    if line.len() > MAX_LINE_BYTES || nesting(line) > MAX_NESTING {
        return unparsed;
    }
    match serde_json::from_slice::<Value>(line) {
        Ok(Value::Object(object)) => Parsed {
            n: object.get("n").and_then(Value::as_u64),
            prev: object
                .get("prev")
                .and_then(Value::as_str)
                .map(str::to_owned),
            object: Some(object),
        },
        _ => Parsed {
            n: None,
            prev: None,
            object: None,
        },
    }
}

/// What naming a misplaced line needs from the rest of the file (a second pass, made only
/// once something is wrong): how many lines carry the misplaced line's number, and the first
/// line after it that carries its own place's number.
struct Numbers {
    same_number: usize,
    place_later: Option<u64>,
}

/// Why line `line` (parsed as `p`) is not where the chain expects it: the first line whose
/// number or link is wrong is out of order, was put there, follows a gap, or was altered
/// (it, or the line before it). See docs/audit-format.md, section 5.
fn misplaced(
    line: u64,
    p: &Parsed,
    this_hash: &str,
    next: Option<&Parsed>,
    numbers: &Numbers,
    expected_prev: &str,
    public_key: &[u8],
) -> ExportFailure {
    if let Some(n) = p.n.filter(|&n| n > line && numbers.same_number == 1) {
        if let Some(at) = numbers.place_later {
            return fail(
                line,
                "reordered",
                format!(
                    "line {line} holds line {n} of the export; line {line} of the export is at line {at}"
                ),
            );
        }
    }
    // Does the chain go on without this line? Then it was put there.
    if next.is_some_and(|next| next.prev.as_deref() == Some(expected_prev)) {
        return fail(
            line,
            "inserted",
            format!(
                "line {line} is not part of the export: line {} follows line {} directly",
                line + 1,
                line - 1
            ),
        );
    }
    match p.n {
        Some(n) if n > line => fail(
            line,
            "missing",
            if n == line + 1 {
                format!("line {line} of the export is missing (line {line} holds line {n})")
            } else {
                format!(
                    "lines {line} to {} of the export are missing (line {line} holds line {n})",
                    n - 1
                )
            },
        ),
        Some(n) if n < line => fail(
            line,
            "inserted",
            format!("line {line} repeats line number {n}, which the export already used"),
        ),
        Some(_) if line > 1 => {
            // The link is wrong: either the line before changed, or this line's `prev`. If
            // what follows still vouches for this line as it is, the line before changed.
            let vouched = match next {
                Some(next) => next.prev.as_deref() == Some(this_hash),
                None => p.object.as_ref().is_some_and(|o| {
                    o.get("kind").and_then(Value::as_str) == Some("checkpoint")
                        && ekm_keys::verify_signature(
                            public_key,
                            checkpoint_message(
                                line,
                                p.prev.as_deref().unwrap_or(""),
                                o.get("final").and_then(Value::as_bool).unwrap_or(false),
                            )
                            .as_bytes(),
                            o.get("signature").and_then(Value::as_str).unwrap_or(""),
                        )
                }),
            };
            if vouched {
                fail(
                    line - 1,
                    "altered",
                    format!(
                        "line {} does not hash to the value that line {line} recorded as its predecessor",
                        line - 1
                    ),
                )
            } else {
                fail(
                    line,
                    "altered",
                    format!("line {line}'s record of its predecessor was altered"),
                )
            }
        }
        _ => fail(
            line,
            "altered",
            format!("line {line} has no valid line number or predecessor hash"),
        ),
    }
}

/// One line as read: its bytes (without the `\n`), unless it is longer than
/// `MAX_LINE_BYTES` (then the bytes are skipped, not kept), and whether a `\n` ended it.
struct RawLine {
    bytes: Vec<u8>,
    too_long: bool,
    terminated: bool,
}

/// The next line, or `None` at the end. Never holds more than `MAX_LINE_BYTES` + 1 bytes.
fn next_line<R: BufRead>(input: &mut R) -> std::io::Result<Option<RawLine>> {
    let mut bytes = Vec::new();
    let limit = MAX_LINE_BYTES as u64 + 1;
    let read = std::io::Read::take(&mut *input, limit).read_until(b'\n', &mut bytes)?;
    if read == 0 {
        return Ok(None);
    }
    let mut terminated = bytes.last() == Some(&b'\n');
    if terminated {
        bytes.pop();
    }
    let too_long = bytes.len() > MAX_LINE_BYTES;
    if too_long && !terminated {
        // Skip the rest of the line without keeping it.
        loop {
            let buffer = input.fill_buf()?;
            if buffer.is_empty() {
                break;
            }
            match buffer.iter().position(|&b| b == b'\n') {
                Some(at) => {
                    input.consume(at + 1);
                    terminated = true;
                    break;
                }
                None => {
                    let all = buffer.len();
                    input.consume(all);
                }
            }
        }
    }
    if too_long {
        bytes = Vec::new();
    }
    Ok(Some(RawLine {
        bytes,
        too_long,
        terminated,
    }))
}

/// The second pass of `Numbers`.
fn scan_numbers<R: BufRead + Seek>(
    input: &mut R,
    number: Option<u64>,
    line: u64,
) -> std::io::Result<Numbers> {
    input.seek(SeekFrom::Start(0))?;
    let mut numbers = Numbers {
        same_number: 0,
        place_later: None,
    };
    let mut at = 0u64;
    while let Some(raw) = next_line(input)? {
        at += 1;
        let n = if raw.too_long {
            None
        } else {
            parse(&raw.bytes).n
        };
        if n.is_some() && n == number {
            numbers.same_number += 1;
        }
        if at > line && n == Some(line) && numbers.place_later.is_none() {
            numbers.place_later = Some(at);
        }
    }
    Ok(numbers)
}

/// Verifies an export's bytes with the raw Ed25519 public key (`verify_export_from`).
pub fn verify_export(text: &[u8], public_key: &[u8]) -> Result<VerifiedExport, ExportFailure> {
    verify_export_from(&mut std::io::Cursor::new(text), public_key)
        .unwrap_or_else(|error| Err(fail(0, "unreadable", error.to_string())))
}

/// Verifies an export with the raw Ed25519 public key. Needs nothing else: no database, no
/// audit key. Reads it once, line by line, in bounded memory (two lines of at most
/// `MAX_LINE_BYTES`, and their parse, at a time, whatever the export's length or a hostile
/// line's); once a line is found misplaced, reads it once more to name what happened.
pub fn verify_export_from<R: BufRead + Seek>(
    input: &mut R,
    public_key: &[u8],
) -> std::io::Result<Result<VerifiedExport, ExportFailure>> {
    let given_key = ekm_keys::key_id(public_key);
    let mut summary = VerifiedExport {
        org_id: String::new(),
        exported_at: String::new(),
        filter: BTreeMap::new(),
        through_position: 0,
        lines: 0,
        entries: 0,
        checkpoints: 0,
        key_id: given_key.clone(),
    };
    let read = |line: RawLine| {
        let parsed = if line.too_long {
            parse(b"")
        } else {
            parse(&line.bytes)
        };
        let hash = line_hash(&line.bytes);
        (parsed, hash, line)
    };
    let Some(first) = next_line(input)? else {
        return Ok(Err(fail(
            1,
            "truncated",
            "the export is empty: not even its header is there",
        )));
    };
    let mut current = read(first);
    let mut expected_prev = ZERO_HASH.to_owned();
    let mut last_checkpoint = 0u64;
    let mut ended = false;
    let mut line = 0u64;
    loop {
        line += 1;
        let next = next_line(input)?.map(read);
        let (p, this_hash, raw) = &current;
        if ended {
            return Ok(Err(fail(
                line,
                "inserted",
                format!("line {line} follows the final signed checkpoint, where the export ends"),
            )));
        }
        if raw.too_long {
            return Ok(Err(fail(
                line,
                "altered",
                format!("line {line} is longer than {MAX_LINE_BYTES} bytes"),
            )));
        }
        if !raw.terminated {
            return Ok(Err(fail(
                line,
                "altered",
                format!("line {line} does not end with a newline: the export was cut or changed"),
            )));
        }
        let Some(object) = &p.object else {
            return Ok(Err(fail(
                line,
                "altered",
                format!(
                    "line {line} is not a JSON object in UTF-8 (nesting at most {MAX_NESTING} deep)"
                ),
            )));
        };
        if p.prev.as_deref() != Some(expected_prev.as_str()) || p.n != Some(line) {
            let numbers = scan_numbers(input, p.n, line)?;
            return Ok(Err(misplaced(
                line,
                p,
                this_hash,
                next.as_ref().map(|(next, _, _)| next),
                &numbers,
                &expected_prev,
                public_key,
            )));
        }
        let kind = object.get("kind").and_then(Value::as_str).unwrap_or("");
        match (line, kind) {
            (1, "header") => {
                let text = |name: &str| object.get(name).and_then(Value::as_str).unwrap_or("");
                if text("format") != EXPORT_FORMAT
                    || object.get("version").and_then(Value::as_u64) != Some(EXPORT_VERSION)
                {
                    return Ok(Err(fail(
                        1,
                        "altered",
                        format!(
                            "the header does not name format {EXPORT_FORMAT} version {EXPORT_VERSION}"
                        ),
                    )));
                }
                if text("key_id") != given_key {
                    return Ok(Err(fail(
                        1,
                        "wrong_key",
                        format!(
                            "the export was signed with key {}; the public key given is key {given_key}",
                            text("key_id")
                        ),
                    )));
                }
                summary.org_id = text("org_id").to_owned();
                summary.exported_at = text("exported_at").to_owned();
                summary.filter = object
                    .get("filter")
                    .and_then(Value::as_object)
                    .map(|f| {
                        f.iter()
                            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_owned()))
                            .collect()
                    })
                    .unwrap_or_default();
                summary.through_position = object
                    .get("through_position")
                    .and_then(Value::as_i64)
                    .unwrap_or(0);
            }
            (1, _) => return Ok(Err(fail(1, "altered", "line 1 is not the export's header"))),
            (_, "event" | "access") => summary.entries += 1,
            (_, "checkpoint") => {
                let last = object
                    .get("final")
                    .and_then(Value::as_bool)
                    .unwrap_or(false);
                let signature = object
                    .get("signature")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                if raw.bytes.as_slice()
                    != checkpoint_line(line, &expected_prev, last, signature).as_bytes()
                {
                    return Ok(Err(fail(
                        line,
                        "altered",
                        format!("the checkpoint at line {line} is not in the exact form of a checkpoint line"),
                    )));
                }
                if !ekm_keys::verify_signature(
                    public_key,
                    checkpoint_message(line, &expected_prev, last).as_bytes(),
                    signature,
                ) {
                    return Ok(Err(fail(
                        line,
                        "altered",
                        format!(
                            "the signed checkpoint at line {line} does not verify: a line from {} to {} was altered and the chain after it recomputed, or the checkpoint itself was",
                            last_checkpoint + 1,
                            line - 1
                        ),
                    )));
                }
                summary.checkpoints += 1;
                last_checkpoint = line;
                ended = last;
            }
            _ => {
                return Ok(Err(fail(
                    line,
                    "altered",
                    format!("line {line} has no known kind (header, event, access, checkpoint)"),
                )))
            }
        }
        expected_prev.clone_from(this_hash);
        match next {
            Some(next) => current = next,
            None => break,
        }
    }
    summary.lines = line;
    if !ended {
        return Ok(Err(fail(
            line + 1,
            "truncated",
            format!(
                "the export ends after line {line} without its final signed checkpoint: lines were removed from its end"
            ),
        )));
    }
    Ok(Ok(summary))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key() -> Arc<SigningKey> {
        Arc::new(SigningKey::from_seed(&[7u8; 32]).unwrap())
    }

    fn export(entries: usize) -> String {
        let header = ExportHeader {
            org_id: "org_1".into(),
            exported_at: "2026-12-01T00:00:00Z".into(),
            through_position: entries as i64,
            filter: BTreeMap::new(),
        };
        let (mut writer, mut out) = ExportWriter::start(key(), &header);
        for i in 0..entries {
            out.push_str(&writer.entry(
                "event",
                &format!("{{\"position\":{},\"actor\":\"user:tok_{i}\",\"details\":{{\"reason\":\"r\\n{i}\"}}}}", i + 1),
                Some(&format!("{i:064x}")),
            ));
        }
        out.push_str(&writer.finish());
        out
    }

    fn lines(text: &str) -> Vec<String> {
        text.lines().map(str::to_owned).collect()
    }

    fn join(lines: &[String]) -> String {
        let mut text = lines.join("\n");
        text.push('\n');
        text
    }

    #[test]
    fn an_intact_export_verifies_and_counts_its_lines() {
        let text = export(250);
        let verified = verify_export(text.as_bytes(), &key().public_key()).unwrap();
        assert_eq!(verified.entries, 250);
        assert_eq!(
            verified.checkpoints, 3,
            "at lines 101 and 202, and the final one"
        );
        assert_eq!(verified.lines, 1 + 250 + 3);
        assert_eq!(verified.org_id, "org_1");
        // Every line is JSON with its number.
        for (i, line) in text.lines().enumerate() {
            let v: Value = serde_json::from_str(line).unwrap();
            assert_eq!(v["n"], i as u64 + 1);
        }
    }

    #[test]
    fn an_empty_organization_exports_a_header_and_a_final_checkpoint() {
        let verified = verify_export(export(0).as_bytes(), &key().public_key()).unwrap();
        assert_eq!(
            (verified.entries, verified.checkpoints, verified.lines),
            (0, 1, 2)
        );
    }

    #[test]
    fn another_key_is_named_as_such() {
        let other = SigningKey::from_seed(&[8u8; 32]).unwrap();
        let failure = verify_export(export(3).as_bytes(), &other.public_key()).unwrap_err();
        assert_eq!((failure.line, failure.problem), (1, "wrong_key"));
    }

    #[test]
    fn a_rewritten_chain_is_caught_by_the_next_signature() {
        // Alter line 5 and recompute every `prev` after it: only the signature can tell.
        let mut l = lines(&export(150));
        l[4] = l[4].replace("user:tok_3", "user:tok_X");
        for i in 5..l.len() {
            let mut v: serde_json::Map<String, Value> = serde_json::from_str(&l[i]).unwrap();
            v.insert("prev".into(), Value::String(line_hash(&l[i - 1])));
            // Keep the field order of the original line: rebuild by replacing the hash.
            let old: Value = serde_json::from_str(&l[i]).unwrap();
            l[i] = l[i].replace(old["prev"].as_str().unwrap(), v["prev"].as_str().unwrap());
        }
        let failure = verify_export(join(&l).as_bytes(), &key().public_key()).unwrap_err();
        assert_eq!(failure.problem, "altered");
        assert_eq!(failure.line, 101, "the first checkpoint, 100 lines in");
        assert!(
            failure.detail.contains("from 1 to 100"),
            "{}",
            failure.detail
        );
    }

    #[test]
    fn the_last_checkpoint_cannot_gain_anything_although_no_line_hashes_it() {
        let mut l = lines(&export(3));
        let last = l.len() - 1;
        for changed in [
            l[last].replace("{\"n\"", "{\"note\":\"x\",\"n\""),
            l[last].replace("}", ",\"final\":true}"),
            format!("{} ", l[last]),
            l[last].replace(":", ": "),
        ] {
            l[last] = changed;
            let failure = verify_export(join(&l).as_bytes(), &key().public_key()).unwrap_err();
            assert_eq!(
                (failure.line, failure.problem),
                (last as u64 + 1, "altered"),
                "{}",
                l[last]
            );
            l = lines(&export(3));
        }
    }

    #[test]
    fn hostile_lines_are_refused_at_their_line_without_reading_them_whole() {
        let l = lines(&export(3));
        // No newline after the last line.
        let cut = join(&l);
        let failure =
            verify_export(&cut.as_bytes()[..cut.len() - 1], &key().public_key()).unwrap_err();
        assert_eq!((failure.line, failure.problem), (5, "altered"));
        assert!(failure.detail.contains("newline"), "{}", failure.detail);
        // A line of 8 MiB: refused as too long.
        let mut long = l.clone();
        long[2] = format!("{{\"pad\":\"{}\"}}", "x".repeat(8 * MAX_LINE_BYTES));
        let failure = verify_export(join(&long).as_bytes(), &key().public_key()).unwrap_err();
        assert_eq!((failure.line, failure.problem), (3, "altered"));
        assert!(failure.detail.contains("longer than"), "{}", failure.detail);
        // Nested deeper than the format allows, or not JSON as RFC 8259 has it.
        let with = |extra: &str| format!("{},\"zz\":{extra}}}", &l[2][..l[2].len() - 1]);
        for changed in [
            with(&format!("{}0{}", "[".repeat(64), "]".repeat(64))),
            with("NaN"),
            with("1e400"),
        ] {
            let mut bad = l.clone();
            bad[2] = changed;
            let failure = verify_export(join(&bad).as_bytes(), &key().public_key()).unwrap_err();
            assert_eq!(
                (failure.line, failure.problem),
                (3, "altered"),
                "{}",
                bad[2]
            );
            assert!(
                failure.detail.contains("not a JSON object"),
                "{}",
                failure.detail
            );
        }
        // 64 deep in all is fine for the parser (and then the link tells the line changed).
        let mut deep = l.clone();
        deep[2] = with(&format!("{}0{}", "[".repeat(63), "]".repeat(63)));
        let failure = verify_export(join(&deep).as_bytes(), &key().public_key()).unwrap_err();
        assert!(
            failure.detail.contains("does not hash"),
            "{}",
            failure.detail
        );
    }

    #[test]
    fn a_filtered_export_says_it_is_partial() {
        let header = ExportHeader {
            org_id: "org_1".into(),
            exported_at: "2026-12-01T00:00:00Z".into(),
            through_position: 9,
            filter: [
                ("org".to_owned(), "org_1".to_owned()),
                ("action".to_owned(), "scope.pause".to_owned()),
            ]
            .into(),
        };
        let (writer, mut text) = ExportWriter::start(key(), &header);
        text.push_str(&writer.finish());
        let verified = verify_export(text.as_bytes(), &key().public_key()).unwrap();
        assert!(verified.partial());
        assert_eq!(verified.exported_at, "2026-12-01T00:00:00Z");
        assert!(!verify_export(export(2).as_bytes(), &key().public_key())
            .unwrap()
            .partial());
    }

    #[test]
    fn a_truncated_export_and_lines_after_the_end_are_named() {
        let l = lines(&export(120));
        let failure = verify_export(join(&l[..50]).as_bytes(), &key().public_key()).unwrap_err();
        assert_eq!((failure.line, failure.problem), (51, "truncated"));
        // Cut right after a non-final checkpoint: still truncated.
        assert!(l[100].contains("\"kind\":\"checkpoint\""));
        let failure = verify_export(join(&l[..101]).as_bytes(), &key().public_key()).unwrap_err();
        assert_eq!((failure.line, failure.problem), (102, "truncated"));
        let mut more = l.clone();
        more.push(l[3].clone());
        let failure = verify_export(join(&more).as_bytes(), &key().public_key()).unwrap_err();
        assert_eq!(
            (failure.line, failure.problem),
            (l.len() as u64 + 1, "inserted")
        );
    }

    #[derive(Debug, Clone)]
    enum Mutation {
        Alter(usize, usize),
        Remove(usize),
        Insert(usize, usize),
        Swap(usize),
    }

    fn mutation() -> impl Strategy<Value = Mutation> {
        prop_oneof![
            (1usize..260, 0usize..400).prop_map(|(l, b)| Mutation::Alter(l, b)),
            (0usize..260).prop_map(Mutation::Remove),
            (1usize..260, 0usize..260).prop_map(|(at, from)| Mutation::Insert(at, from)),
            (0usize..259).prop_map(Mutation::Swap),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Any one change to an export fails verification, and the first line named is the
        /// changed one (or, for a removal, the line where the gap shows).
        #[test]
        fn any_change_is_named_at_its_line(entries in 0usize..255, m in mutation()) {
            let original = lines(&export(entries));
            let count = original.len();
            let mut l = original.clone();
            let (expected_line, expected_problems): (usize, &[&str]) = match m {
                Mutation::Alter(i, byte) => {
                    let i = i % count;
                    let mut bytes = l[i].clone().into_bytes();
                    let at = byte % bytes.len();
                    bytes[at] = if bytes[at] == b'x' { b'y' } else { b'x' };
                    match String::from_utf8(bytes) {
                        Ok(changed) if changed != l[i] => l[i] = changed,
                        _ => return Ok(()),
                    }
                    // An altered line is named at its own number, or (when the change broke
                    // the line's own number or link) as out of place there.
                    (i + 1, &["altered", "inserted", "missing", "reordered", "wrong_key"])
                }
                Mutation::Remove(i) => {
                    let i = i % count;
                    l.remove(i);
                    if i == count - 1 {
                        (count, &["truncated"])
                    } else {
                        (i + 1, &["missing"])
                    }
                }
                Mutation::Insert(at, from) => {
                    let at = at % (count + 1);
                    let line = l[from % count].clone();
                    l.insert(at, line);
                    (at + 1, &["inserted"])
                }
                Mutation::Swap(i) => {
                    let i = i % (count - 1);
                    l.swap(i, i + 1);
                    if l[i] == l[i + 1] {
                        return Ok(());
                    }
                    (i + 1, &["reordered"])
                }
            };
            let failure = verify_export(join(&l).as_bytes(), &key().public_key()).unwrap_err();
            prop_assert!(expected_problems.contains(&failure.problem), "{m:?}: {failure:?}");
            prop_assert!(failure.line as usize <= expected_line + 1, "{m:?}: {failure:?}");
            prop_assert!(failure.line as usize + 1 >= expected_line, "{m:?}: {failure:?}");
        }
    }
}
