//! A message as routing conditions see it.
//!
//! `$body.…` resolves into the body only when the message says it is JSON
//! (`$contentType` `application/json` and `$contentEncoding` UTF-8, UTF-16 or UTF-32), or when
//! the hub opted into detecting JSON bodies; the body is parsed at most once per message, on
//! first use, however many routes look at it. Twin change notifications' bodies are JSON
//! whatever their properties say.

use std::cell::OnceCell;

use serde_json::Value;

use crate::message::Message;

pub struct MessageContext<'m> {
    message: &'m Message,
    detect_json: bool,
    twin_change: bool,
    body: OnceCell<Option<Value>>,
}

impl<'m> MessageContext<'m> {
    pub fn new(message: &'m Message, detect_json: bool, twin_change: bool) -> Self {
        MessageContext {
            message,
            detect_json,
            twin_change,
            body: OnceCell::new(),
        }
    }

    /// The body as JSON, if the message's properties allow it and it parses.
    pub fn body(&self) -> Option<&Value> {
        self.body.get_or_init(|| self.parse_body()).as_ref()
    }

    fn parse_body(&self) -> Option<Value> {
        let sys = &self.message.system;
        let declared_json = sys.content_type.as_deref().is_some_and(|ct| {
            ct.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .eq_ignore_ascii_case("application/json")
        });
        let encoding = sys
            .content_encoding
            .as_deref()
            .map(|e| e.trim().to_ascii_lowercase());
        let text = match (declared_json || self.twin_change, encoding.as_deref()) {
            (true, Some("utf-8" | "utf8")) => {
                std::str::from_utf8(&self.message.body).ok()?.to_string()
            }
            (true, Some("utf-16" | "utf16")) => decode_utf16(&self.message.body)?,
            (true, Some("utf-32" | "utf32")) => decode_utf32(&self.message.body)?,
            _ if self.detect_json || self.twin_change => {
                std::str::from_utf8(&self.message.body).ok()?.to_string()
            }
            _ => return None,
        };
        serde_json::from_str(text.trim_start_matches('\u{feff}')).ok()
    }

    /// The system property `name` (without its `$`, any case), as edgeHub names them.
    pub fn system_property(&self, name: &str) -> Option<&'m str> {
        let s = &self.message.system;
        let known: [(&str, &Option<String>); 12] = [
            ("connectionDeviceId", &s.connection_device_id),
            ("connectionModuleId", &s.connection_module_id),
            ("contentType", &s.content_type),
            ("contentEncoding", &s.content_encoding),
            ("messageId", &s.message_id),
            ("correlationId", &s.correlation_id),
            ("outputName", &s.output_name),
            ("to", &s.to),
            ("userId", &s.user_id),
            ("expiryTimeUtc", &s.expiry),
            ("enqueuedTime", &s.enqueued_time),
            ("iothub-enqueuedtime", &s.enqueued_time),
        ];
        known
            .into_iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .and_then(|(_, v)| v.as_deref())
    }

    /// The application property `name` in any case, as edgeHub looks them up: `Some(None)`
    /// when it was sent without a value.
    pub fn app_property(&self, name: &str) -> Option<Option<&'m str>> {
        self.message
            .properties
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_deref())
    }
}

fn decode_utf16(bytes: &[u8]) -> Option<String> {
    if !bytes.len().is_multiple_of(2) {
        return None;
    }
    let big = bytes.starts_with(&[0xFE, 0xFF]);
    let units: Vec<u16> = bytes
        .chunks_exact(2)
        .map(|c| {
            if big {
                u16::from_be_bytes([c[0], c[1]])
            } else {
                u16::from_le_bytes([c[0], c[1]])
            }
        })
        .collect();
    String::from_utf16(&units).ok()
}

fn decode_utf32(bytes: &[u8]) -> Option<String> {
    if !bytes.len().is_multiple_of(4) {
        return None;
    }
    let big = bytes.starts_with(&[0, 0, 0xFE, 0xFF]);
    bytes
        .chunks_exact(4)
        .map(|c| {
            let n = if big {
                u32::from_be_bytes([c[0], c[1], c[2], c[3]])
            } else {
                u32::from_le_bytes([c[0], c[1], c[2], c[3]])
            };
            char::from_u32(n)
        })
        .collect()
}
