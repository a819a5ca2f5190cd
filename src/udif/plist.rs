//! The XML property list of a UDIF image: `resource-fork` -> `blkx`, an
//! array of dictionaries whose `Data` is a `mish` table.
//!
//! Nesting is bounded before parsing ([`MAX_DEPTH`]), so no property list
//! can exhaust the stack.

use std::io::Cursor;

use base64::Engine;
use plist::{Dictionary, Value};

use super::Malformed;

/// One `blkx` resource.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BlkxResource {
    pub attributes: String,
    pub cf_name: String,
    pub id: String,
    pub name: String,
    /// The `mish` table.
    pub data: Vec<u8>,
}

/// Deepest nesting of arrays and dictionaries accepted; hdiutil's
/// property lists nest five deep.
pub const MAX_DEPTH: usize = 32;

/// Deepest nesting of `<array>`/`<dict>` elements, by a plain scan of the
/// tags (anything odd counts as deeper, never shallower). The plist crate
/// builds and drops values recursively, so depth is bounded before it
/// sees the text.
fn nesting(xml: &[u8]) -> usize {
    let (mut depth, mut max) = (0usize, 0usize);
    let mut i = 0;
    while let Some(lt) = xml[i..].iter().position(|&c| c == b'<') {
        let tag = &xml[i + lt + 1..];
        let gt = tag.iter().position(|&c| c == b'>').unwrap_or(tag.len());
        let body = &tag[..gt];
        let named = |name: &[u8], b: &[u8]| {
            b.starts_with(name)
                && b.get(name.len())
                    .map_or(true, |&c| c.is_ascii_whitespace() || c == b'/')
        };
        let (close, name) = match body.strip_prefix(b"/") {
            Some(rest) => (true, rest),
            None => (false, body),
        };
        if named(b"array", name) || named(b"dict", name) {
            if close {
                depth = depth.saturating_sub(1);
            } else if !body.ends_with(b"/") {
                depth += 1;
                max = max.max(depth);
            }
        }
        i += lt + 1;
    }
    max
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Integer(i) => i.to_string(),
        _ => String::new(),
    }
}

/// The `blkx` resources of an XML property list, in order.
pub fn decode(xml: &[u8]) -> Result<Vec<BlkxResource>, Malformed> {
    let depth = nesting(xml);
    if depth > MAX_DEPTH {
        return Err(Malformed(format!(
            "XML property list nests {depth} deep (more than {MAX_DEPTH})"
        )));
    }
    let root = Value::from_reader_xml(Cursor::new(xml)).map_err(|e| {
        Malformed(format!(
            "XML property list does not parse: {}",
            e.to_string().replace('\n', " ")
        ))
    })?;
    let root = root
        .as_dictionary()
        .ok_or_else(|| Malformed("XML property list is not a dictionary".into()))?;
    let fork = root
        .get("resource-fork")
        .ok_or_else(|| Malformed("XML property list has no resource-fork dictionary".into()))?
        .as_dictionary()
        .ok_or_else(|| Malformed("resource-fork is not a dictionary".into()))?;
    let blkx = fork
        .get("blkx")
        .ok_or_else(|| Malformed("XML property list has no blkx array".into()))?
        .as_array()
        .ok_or_else(|| Malformed("blkx is not an array".into()))?;
    blkx.iter()
        .enumerate()
        .map(|(i, e)| {
            let d = e
                .as_dictionary()
                .ok_or_else(|| Malformed(format!("blkx entry {i} is not a dictionary")))?;
            let data = d
                .get("Data")
                .and_then(Value::as_data)
                .ok_or_else(|| Malformed(format!("blkx entry {i} has no Data")))?;
            let field = |k: &str| d.get(k).map(text).unwrap_or_default();
            Ok(BlkxResource {
                attributes: field("Attributes"),
                cf_name: field("CFName"),
                id: field("ID"),
                name: field("Name"),
                data: data.to_vec(),
            })
        })
        .collect()
}

/// The XML property list holding `blkx` (and nothing else).
pub fn encode(blkx: &[BlkxResource]) -> Vec<u8> {
    let entries = blkx
        .iter()
        .map(|b| {
            let mut d = Dictionary::new();
            d.insert("Attributes".into(), Value::String(b.attributes.clone()));
            d.insert("CFName".into(), Value::String(b.cf_name.clone()));
            d.insert("Data".into(), Value::Data(b.data.clone()));
            d.insert("ID".into(), Value::String(b.id.clone()));
            d.insert("Name".into(), Value::String(b.name.clone()));
            Value::Dictionary(d)
        })
        .collect();
    let mut fork = Dictionary::new();
    fork.insert("blkx".into(), Value::Array(entries));
    let mut root = Dictionary::new();
    root.insert("resource-fork".into(), Value::Dictionary(fork));
    let mut out = Vec::new();
    Value::Dictionary(root)
        .to_writer_xml(&mut out)
        .expect("writing a plist to memory");
    out.push(b'\n');
    out
}

/// `xml` with its `blkx` array replaced by `entries`: each the current
/// entry it names (every key kept) or a new one (`None`) named as a whole
/// disk, with the `Data` given (`None`: the entry's own). Everything else
/// in the property list is kept.
pub fn rewrite(
    xml: &[u8],
    entries: &[(Option<usize>, Option<Vec<u8>>)],
) -> Result<Vec<u8>, Malformed> {
    let mut root = Value::from_reader_xml(Cursor::new(xml)).map_err(|e| {
        Malformed(format!(
            "XML property list does not parse: {}",
            e.to_string().replace('\n', " ")
        ))
    })?;
    let blkx = root
        .as_dictionary_mut()
        .and_then(|d| d.get_mut("resource-fork"))
        .and_then(Value::as_dictionary_mut)
        .and_then(|d| d.get_mut("blkx"))
        .ok_or_else(|| Malformed("XML property list has no blkx array".into()))?;
    let old = blkx
        .as_array()
        .ok_or_else(|| Malformed("blkx is not an array".into()))?
        .clone();
    let mut next_id = old.len();
    let new = entries
        .iter()
        .map(|(origin, data)| {
            let mut d = match origin
                .and_then(|i| old.get(i))
                .and_then(Value::as_dictionary)
            {
                Some(d) => d.clone(),
                None => {
                    let mut d = Dictionary::new();
                    let name = "whole disk (unknown partition : 0)".to_string();
                    d.insert("Attributes".into(), Value::String("0x0050".into()));
                    d.insert("CFName".into(), Value::String(name.clone()));
                    d.insert("ID".into(), Value::String(next_id.to_string()));
                    d.insert("Name".into(), Value::String(name));
                    next_id += 1;
                    d
                }
            };
            if let Some(data) = data {
                d.insert("Data".into(), Value::Data(data.clone()));
            }
            Value::Dictionary(d)
        })
        .collect();
    *blkx = Value::Array(new);
    let mut out = Vec::new();
    root.to_writer_xml(&mut out)
        .map_err(|e| Malformed(format!("writing the property list: {e}")))?;
    out.push(b'\n');
    Ok(out)
}

/// In-place edits of the `<data>` elements of `xml` holding a `mish`
/// table: `edit` may change a table's bytes (not its length). Each edit
/// is `(offset in xml, new bytes)`; the XML keeps its length and layout,
/// since only base64 characters change, one for one.
pub fn patch_tables(xml: &[u8], edit: impl Fn(&mut Vec<u8>)) -> Vec<(usize, Vec<u8>)> {
    const OPEN: &[u8] = b"<data>";
    const CLOSE: &[u8] = b"</data>";
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut patches = Vec::new();
    let mut at = 0;
    while let Some(open) = find(&xml[at..], OPEN) {
        let start = at + open + OPEN.len();
        let Some(len) = find(&xml[start..], CLOSE) else {
            break;
        };
        let body = &xml[start..start + len];
        at = start + len + CLOSE.len();
        let positions: Vec<usize> = (0..body.len())
            .filter(|&i| !body[i].is_ascii_whitespace())
            .collect();
        let text: Vec<u8> = positions.iter().map(|&i| body[i]).collect();
        let Ok(mut table) = b64.decode(&text) else {
            continue;
        };
        if !table.starts_with(super::blkx::MISH_MAGIC) {
            continue;
        }
        let before = table.clone();
        edit(&mut table);
        if table == before || table.len() != before.len() {
            continue;
        }
        let new_text = b64.encode(&table);
        if new_text.len() != text.len() {
            continue; // other padding than ours: leave it alone
        }
        let mut new_body = body.to_vec();
        for (&i, &c) in positions.iter().zip(new_text.as_bytes()) {
            new_body[i] = c;
        }
        let first = (0..body.len()).find(|&i| body[i] != new_body[i]);
        let last = (0..body.len()).rev().find(|&i| body[i] != new_body[i]);
        if let (Some(f), Some(l)) = (first, last) {
            patches.push((start + f, new_body[f..=l].to_vec()));
        }
    }
    patches
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, data: &[u8]) -> BlkxResource {
        BlkxResource {
            attributes: "0x0050".into(),
            cf_name: format!("part {id}"),
            id: id.into(),
            name: format!("part {id}"),
            data: data.to_vec(),
        }
    }

    #[test]
    fn round_trip() {
        let e = vec![entry("-1", b"mish-one"), entry("0", &[9; 300])];
        assert_eq!(decode(&encode(&e)).unwrap(), e);
    }

    #[test]
    fn skips_other_resources() {
        let deep = "<array>".repeat(20) + "<array/>" + &"</array>".repeat(20);
        let xml = format!(
            "<?xml version=\"1.0\"?><plist version=\"1.0\"><dict>\
             <key>other</key>{deep}\
             <key>resource-fork</key><dict>\
             <key>plst</key><array><dict><key>Data</key><data>AAAA</data></dict></array>\
             <key>blkx</key><array><dict><key>ID</key><integer>7</integer>\
             <key>Data</key><data>bWlzaA==</data><key>Extra</key><dict/></dict></array>\
             </dict></dict></plist>"
        );
        let got = decode(xml.as_bytes()).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].id, "7");
        assert_eq!(got[0].data, b"mish");
    }

    #[test]
    fn refusals() {
        let wrap =
            |inner: &str| format!("<?xml version=\"1.0\"?><plist version=\"1.0\">{inner}</plist>");
        let e = |inner: &str| decode(wrap(inner).as_bytes()).unwrap_err().0;
        assert_eq!(e("<array/>"), "XML property list is not a dictionary");
        assert_eq!(
            e("<dict><key>a</key><string>b</string></dict>"),
            "XML property list has no resource-fork dictionary"
        );
        assert_eq!(
            e("<dict><key>resource-fork</key><string>b</string></dict>"),
            "resource-fork is not a dictionary"
        );
        assert_eq!(
            e("<dict><key>resource-fork</key><dict/></dict>"),
            "XML property list has no blkx array"
        );
        assert_eq!(
            e("<dict><key>resource-fork</key><dict><key>blkx</key><dict/></dict></dict>"),
            "blkx is not an array"
        );
        assert_eq!(
            e("<dict><key>resource-fork</key><dict><key>blkx</key><array><string/></array></dict></dict>"),
            "blkx entry 0 is not a dictionary"
        );
        assert_eq!(
            e("<dict><key>resource-fork</key><dict><key>blkx</key><array><dict/></array></dict></dict>"),
            "blkx entry 0 has no Data"
        );
        let deep = "<array>".repeat(100000);
        assert_eq!(
            e(&format!("<dict><key>x</key>{deep}")),
            "XML property list nests 100001 deep (more than 32)"
        );
        assert_eq!(
            nesting(b"<dict ><array\n/><array>< /array></array ></dict>"),
            2
        );
        assert!(decode(b"<plist><dict><key>x</key>")
            .unwrap_err()
            .0
            .starts_with("XML property list does not parse: "));
    }

    #[test]
    fn rewrite_keeps_other_keys() {
        let xml = b"<?xml version=\"1.0\"?><plist version=\"1.0\"><dict>\
             <key>resource-fork</key><dict>\
             <key>blkx</key><array><dict><key>ID</key><string>-1</string>\
             <key>Data</key><data>AAAA</data><key>Extra</key><integer>5</integer></dict></array>\
             <key>plst</key><array><dict><key>Data</key><data>AAAA</data></dict></array>\
             </dict><key>other</key><string>kept</string></dict></plist>";
        let out = rewrite(
            xml,
            &[
                (Some(0), Some(b"one".to_vec())),
                (None, Some(b"two".to_vec())),
            ],
        )
        .unwrap();
        let got = decode(&out).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(
            (got[0].id.as_str(), got[0].data.as_slice()),
            ("-1", &b"one"[..])
        );
        assert_eq!(
            (got[1].id.as_str(), got[1].data.as_slice()),
            ("1", &b"two"[..])
        );
        assert_eq!(got[1].name, "whole disk (unknown partition : 0)");
        let root = Value::from_reader_xml(Cursor::new(&out)).unwrap();
        let root = root.as_dictionary().unwrap();
        assert_eq!(root.get("other").and_then(Value::as_string), Some("kept"));
        let fork = root.get("resource-fork").unwrap().as_dictionary().unwrap();
        assert!(fork.get("plst").is_some());
        let e0 = fork.get("blkx").unwrap().as_array().unwrap()[0]
            .as_dictionary()
            .unwrap();
        assert_eq!(
            e0.get("Extra").and_then(Value::as_unsigned_integer),
            Some(5)
        );
    }

    #[test]
    fn patches_keep_the_layout() {
        let mut table = b"mish".to_vec();
        table.extend_from_slice(&[0x11; 200]);
        let xml = encode(&[entry("0", &table), entry("1", b"not a table")]);
        let patches = patch_tables(&xml, |t| t[10] = 0);
        assert_eq!(patches.len(), 1);
        let mut patched = xml.clone();
        for (at, bytes) in &patches {
            patched[*at..*at + bytes.len()].copy_from_slice(bytes);
        }
        assert_eq!(patched.len(), xml.len());
        let got = decode(&patched).unwrap();
        let mut want = table.clone();
        want[10] = 0;
        assert_eq!(got[0].data, want);
        assert_eq!(got[1].data, b"not a table");
    }
}
