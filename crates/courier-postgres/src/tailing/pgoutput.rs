//! The few messages of PostgreSQL's `pgoutput` logical replication protocol (version 1)
//! the log-tailing relay needs, as carried by the replication stream's `XLogData`
//! messages: Relation and Insert (Begin and Commit too, though the replication client
//! already reports those as events of their own); everything else is recognised and
//! skipped.
//!
//! Columns are requested in binary (`binary 'true'`): `bigint` arrives as 8 big-endian
//! bytes, `text` as its UTF-8 bytes and `bytea` as its raw bytes, so nothing needs
//! unescaping. Text-format columns (`'t'`) are decoded too, in case a server sends them.

use std::fmt;

/// One decoded replication message.
#[derive(Debug, PartialEq)]
pub(crate) enum Change {
    /// A transaction starts.
    Begin {
        /// Its transaction id.
        xid: u32,
    },
    /// The columns of a table, sent before its first change in each decoding session.
    Relation(Relation),
    /// A new row.
    Insert {
        /// The table's id ([`Relation::id`]).
        relation: u32,
        /// The row's columns, in table order.
        columns: Vec<Column>,
    },
    /// The transaction ends; the slot may be advanced to `end_lsn` once every row of the
    /// transaction (and of every one before it) was published.
    Commit {
        /// The end of the commit record.
        end_lsn: u64,
    },
    /// Any other message (type, origin, logical message, update, delete, truncate).
    Other,
}

/// A table as `pgoutput` describes it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Relation {
    /// Its object id.
    pub(crate) id: u32,
    /// Its schema.
    pub(crate) namespace: String,
    /// Its name.
    pub(crate) name: String,
    /// Its column names, in order.
    pub(crate) columns: Vec<String>,
}

/// One column value of a row.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Column {
    /// SQL NULL.
    Null,
    /// An unchanged TOASTed value (updates only; never in an insert).
    Unchanged,
    /// The value in the type's text output format.
    Text(Vec<u8>),
    /// The value in the type's binary send format.
    Binary(Vec<u8>),
}

/// A replication message that does not parse.
#[derive(Debug)]
pub(crate) struct ProtocolError(pub(crate) String);

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed pgoutput message: {}", self.0)
    }
}

struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        if self.data.len() < n {
            return Err(ProtocolError(format!(
                "needed {n} more bytes, {} left",
                self.data.len()
            )));
        }
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, ProtocolError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, ProtocolError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, ProtocolError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, ProtocolError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }
    fn cstring(&mut self) -> Result<String, ProtocolError> {
        let end = self
            .data
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| ProtocolError("unterminated string".into()))?;
        let s = std::str::from_utf8(&self.data[..end])
            .map_err(|_| ProtocolError("string is not UTF-8".into()))?
            .to_owned();
        self.data = &self.data[end + 1..];
        Ok(s)
    }
}

/// Decode one message.
pub(crate) fn parse(data: &[u8]) -> Result<Change, ProtocolError> {
    let mut r = Reader { data };
    match r.u8()? {
        b'B' => {
            let _final_lsn = r.u64()?;
            let _commit_time = r.u64()?;
            let xid = r.u32()?;
            Ok(Change::Begin { xid })
        }
        b'C' => {
            let _flags = r.u8()?;
            let _commit_lsn = r.u64()?;
            let end_lsn = r.u64()?;
            Ok(Change::Commit { end_lsn })
        }
        b'R' => {
            let id = r.u32()?;
            let namespace = r.cstring()?;
            let name = r.cstring()?;
            let _replica_identity = r.u8()?;
            let n = r.u16()?;
            let mut columns = Vec::with_capacity(usize::from(n));
            for _ in 0..n {
                let _flags = r.u8()?;
                columns.push(r.cstring()?);
                let _type_oid = r.u32()?;
                let _type_modifier = r.u32()?;
            }
            Ok(Change::Relation(Relation {
                id,
                namespace,
                name,
                columns,
            }))
        }
        b'I' => {
            let relation = r.u32()?;
            match r.u8()? {
                b'N' => {}
                other => {
                    return Err(ProtocolError(format!(
                        "insert tuple marker {:?}, expected 'N'",
                        other as char
                    )));
                }
            }
            let columns = tuple(&mut r)?;
            Ok(Change::Insert { relation, columns })
        }
        b'Y' | b'O' | b'M' | b'U' | b'D' | b'T' => Ok(Change::Other),
        other => Err(ProtocolError(format!(
            "unknown message type {:?}",
            other as char
        ))),
    }
}

fn tuple(r: &mut Reader<'_>) -> Result<Vec<Column>, ProtocolError> {
    let n = r.u16()?;
    let mut columns = Vec::with_capacity(usize::from(n));
    for _ in 0..n {
        let column = match r.u8()? {
            b'n' => Column::Null,
            b'u' => Column::Unchanged,
            kind @ (b't' | b'b') => {
                let len = r.u32()? as usize;
                let value = r.take(len)?.to_vec();
                if kind == b't' {
                    Column::Text(value)
                } else {
                    Column::Binary(value)
                }
            }
            other => {
                return Err(ProtocolError(format!(
                    "unknown column kind {:?}",
                    other as char
                )));
            }
        };
        columns.push(column);
    }
    Ok(columns)
}

impl Column {
    /// A `bigint` column.
    pub(crate) fn int8(&self) -> Result<i64, String> {
        match self {
            Column::Binary(b) if b.len() == 8 => {
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                Ok(i64::from_be_bytes(a))
            }
            Column::Text(t) => std::str::from_utf8(t)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| "not a bigint".to_owned()),
            other => Err(format!("not a bigint: {}", other.what())),
        }
    }

    /// A `text` column.
    pub(crate) fn text(self) -> Result<String, String> {
        match self {
            Column::Binary(b) | Column::Text(b) => {
                String::from_utf8(b).map_err(|_| "text is not UTF-8".to_owned())
            }
            other => Err(format!("expected text, got {}", other.what())),
        }
    }

    /// A `bytea` column.
    pub(crate) fn bytea(self) -> Result<Vec<u8>, String> {
        match self {
            Column::Binary(b) => Ok(b),
            Column::Text(t) => unhex(&t),
            other => Err(format!("expected bytea, got {}", other.what())),
        }
    }

    fn what(&self) -> &'static str {
        match self {
            Column::Null => "NULL",
            Column::Unchanged => "an unchanged TOAST value",
            Column::Text(_) => "a text value",
            Column::Binary(_) => "a binary value",
        }
    }

    /// Bytes the value occupies.
    pub(crate) fn len(&self) -> usize {
        match self {
            Column::Text(b) | Column::Binary(b) => b.len(),
            _ => 0,
        }
    }
}

/// `bytea` in its hex text format (`\x0aff`).
fn unhex(t: &[u8]) -> Result<Vec<u8>, String> {
    let hex = t
        .strip_prefix(b"\\x")
        .ok_or_else(|| "bytea text is not in hex format (set bytea_output = hex)".to_owned())?;
    if hex.len() % 2 != 0 {
        return Err("bytea hex has an odd length".into());
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Ok(c - b'0'),
        b'a'..=b'f' => Ok(c - b'a' + 10),
        b'A'..=b'F' => Ok(c - b'A' + 10),
        _ => Err(format!("bad hex digit {:?} in bytea", c as char)),
    };
    hex.chunks(2)
        .map(|p| Ok(digit(p[0])? << 4 | digit(p[1])?))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    // Captured from PostgreSQL 15 (`binary 'true'`, `messages 'true'`).
    #[test]
    fn parses_a_captured_transaction() {
        assert_eq!(
            parse(&hex("420000000001daed98000303eb6420e628000002e0")).unwrap(),
            Change::Begin { xid: 0x2e0 }
        );
        let Change::Relation(rel) = parse(&hex("5200004011636f75726965725f736372617463685f7900636f75726965725f6f7574626f7800640006017365710000000014ffffffff006d6573736167655f69640000000019ffffffff006368616e6e656c0000000019ffffffff00686561646572730000000019ffffffff007061796c6f61640000000011ffffffff00637265617465645f61740000000014ffffffff")).unwrap() else {
            panic!("not a relation")
        };
        assert_eq!(rel.namespace, "courier_scratch_y");
        assert_eq!(rel.name, "courier_outbox");
        assert_eq!(
            rel.columns,
            [
                "seq",
                "message_id",
                "channel",
                "headers",
                "payload",
                "created_at"
            ]
        );
        let Change::Insert { relation, columns } = parse(&hex("49000040114e000662000000080000000000000001620000000369643162000000026368620000000b7b2261223a22622763227d620000000300ff2762000000080000000000000005")).unwrap() else {
            panic!("not an insert")
        };
        assert_eq!(relation, rel.id);
        assert_eq!(columns[0].int8().unwrap(), 1);
        assert_eq!(columns[1].clone().text().unwrap(), "id1");
        assert_eq!(columns[3].clone().text().unwrap(), r#"{"a":"b'c"}"#);
        assert_eq!(columns[4].clone().bytea().unwrap(), vec![0x00, 0xff, 0x27]);
        assert_eq!(
            parse(&hex("43000000000001daed980000000001daedc8000303eb6420e628")).unwrap(),
            Change::Commit { end_lsn: 0x1daedc8 }
        );
        assert_eq!(
            parse(&hex(
                "4d010000000001daee08636f75726965722d6d61726b0000000000"
            ))
            .unwrap(),
            Change::Other
        );
    }

    #[test]
    fn text_columns_and_truncation() {
        assert_eq!(Column::Text(b"42".to_vec()).int8().unwrap(), 42);
        assert_eq!(
            Column::Text(b"\\x00FF27".to_vec()).bytea().unwrap(),
            vec![0, 255, 39]
        );
        assert!(Column::Text(b"\\x0".to_vec()).bytea().is_err());
        assert!(Column::Null.text().is_err());
        assert!(parse(&hex("49000040114e0006620000")).is_err());
        assert!(parse(b"Z").is_err());
        assert!(parse(b"").is_err());
    }
}
