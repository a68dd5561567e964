//! edgeHub conformance: every row of `tests/conformance/edgehub.tsv` run against the router.
//!
//! A row is `kind <TAB> subject <TAB> expected <TAB> text <TAB> where the row comes from`
//! and, for a deliberate difference, a sixth column `fleethub=<value>: <why>` (each is
//! listed in the README). Kinds:
//! - `cond`: `text` as the WHERE of a route from `/messages/*` (`/twinChangeNotifications`
//!   for the `twin` message), evaluated against the reference message named by `subject`;
//!   expected `true`, `false`, `undefined`, or `error` (refused when the route is installed).
//! - `route`: a whole route; expected `ok` or `error`.
//! - `source`: `text` is a route's source path, `subject` a message origin (`device`,
//!   `module:{m}`, `module:{m}/{output}`, `twin`); expected `match` or `nomatch`.

use bytes::Bytes;
use fleethub_router::context::MessageContext;
use fleethub_router::route::{Origin, Route, Truth};
use fleethub_router::{Message, SystemProperties};

const DATA: &str = include_str!("conformance/edgehub.tsv");

/// The reference messages rows name.
fn message(name: &str) -> (Message, bool) {
    let props = |list: &[(&str, Option<&str>)]| -> Vec<(String, Option<String>)> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.map(str::to_string)))
            .collect()
    };
    match name {
        // Application properties and system properties as in edgeHub's compiler tests
        // (their arbitrary system names mapped onto real ones), and a JSON body.
        "m" => (
            Message {
                body: Bytes::from_static(
                    br#"{"a": 1, "s": "text", "b": true, "f": false, "n": null, "arr": [1, 2, {"x": 3}], "obj": {"k": "v", "deep": {"z": 2}}, "a!b": 5, "it's": 6, "100%": 7, "\u00fcml": 8, "date": "2020-01-01T00:00:00Z", "big": 1e300, "neg": -2.5, "zero": 0, "empty": "", "num_str": "42", "Upper": 9}"#,
                ),
                properties: props(&[
                    ("key1", Some("value1")),
                    ("key2", Some("3")),
                    ("key3", Some("VALUE3")),
                    ("null_value", None),
                    ("$to", Some("value4")),
                    ("$body.s", Some("from a property")),
                    ("dotted.name", Some("d")),
                    ("with-dash", Some("x")),
                ]),
                system: SystemProperties {
                    message_id: Some("sysvalue1".into()),
                    correlation_id: Some("4".into()),
                    user_id: Some("SYSVALUE3".into()),
                    to: Some("sysvalue4".into()),
                    content_type: Some("application/json".into()),
                    content_encoding: Some("utf-8".into()),
                    connection_device_id: Some("dev1".into()),
                    connection_module_id: Some("mod1".into()),
                    output_name: Some("out1".into()),
                    ..Default::default()
                },
            },
            false,
        ),
        // A body the message does not declare as JSON: `$body` queries are undefined.
        "opaque" => (
            Message {
                body: Bytes::from_static(br#"{"a": 1}"#),
                properties: props(&[("key1", Some("value1"))]),
                system: SystemProperties::default(),
            },
            false,
        ),
        // A twin change notification, as the hub makes them.
        "twin" => (
            Message {
                body: Bytes::from_static(
                    br#"{"version": 4, "properties": {"reported": {"fw": 2, "state": {"mode": "eco"}}}}"#,
                ),
                properties: Vec::new(),
                system: SystemProperties {
                    connection_device_id: Some("dev1".into()),
                    ..Default::default()
                },
            },
            true,
        ),
        other => panic!("no reference message {other:?}"),
    }
}

fn origin(name: &str) -> Origin<'_> {
    let none = Origin {
        hub_module: None,
        output: None,
        twin_change: false,
    };
    match name {
        "device" => none,
        "twin" => Origin {
            twin_change: true,
            ..none
        },
        _ => {
            let module = name.strip_prefix("module:").expect("an origin");
            match module.split_once('/') {
                Some((m, o)) => Origin {
                    hub_module: Some(m),
                    output: Some(o),
                    ..none
                },
                None => Origin {
                    hub_module: Some(module),
                    ..none
                },
            }
        }
    }
}

struct Row<'a> {
    line: usize,
    kind: &'a str,
    subject: &'a str,
    expected: &'a str,
    text: &'a str,
    fleethub: Option<&'a str>,
}

fn rows() -> Vec<Row<'static>> {
    DATA.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|(i, l)| {
            let cols: Vec<&str> = l.split('\t').collect();
            assert!(
                cols.len() >= 5,
                "line {}: want 5 tab-separated columns: {l:?}",
                i + 1
            );
            let fleethub = cols.get(5).map(|c| {
                c.strip_prefix("fleethub=")
                    .and_then(|c| c.split(':').next())
                    .unwrap_or_else(|| {
                        panic!("line {}: sixth column is fleethub=<value>: <why>", i + 1)
                    })
            });
            Row {
                line: i + 1,
                kind: cols[0],
                subject: cols[1],
                expected: cols[2],
                text: cols[3],
                fleethub,
            }
        })
        .collect()
}

/// What fleethub makes of a row, in the row's own terms.
fn outcome(row: &Row) -> String {
    match row.kind {
        "cond" => {
            let (m, twin) = message(row.subject);
            let source = if twin {
                "/twinChangeNotifications"
            } else {
                "/messages/*"
            };
            let route = format!("FROM {source} WHERE {} INTO $upstream", row.text);
            match Route::parse(&route) {
                Err(_) => "error".into(),
                Ok(r) => {
                    let c = r.condition.expect("a condition");
                    match c.evaluate(&MessageContext::new(&m, false, twin)) {
                        Truth::True => "true".into(),
                        Truth::False => "false".into(),
                        Truth::Undefined => "undefined".into(),
                    }
                }
            }
        }
        "route" => match Route::parse(row.text) {
            Ok(_) => "ok".into(),
            Err(_) => "error".into(),
        },
        "source" => {
            let r = Route::parse(&format!("FROM {} INTO $upstream", row.text))
                .unwrap_or_else(|e| panic!("line {}: {e}", row.line));
            if r.source.matches(&origin(row.subject)) {
                "match".into()
            } else {
                "nomatch".into()
            }
        }
        other => panic!("line {}: unknown kind {other:?}", row.line),
    }
}

#[test]
fn every_row_behaves_as_in_edgehub_or_as_documented() {
    let rows = rows();
    let mut failures = Vec::new();
    for row in &rows {
        let want = row.fleethub.unwrap_or(row.expected);
        let got = outcome(row);
        if got != want {
            failures.push(format!(
                "line {}: {} {:?} on {}: want {want}, got {got}",
                row.line, row.kind, row.text, row.subject
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} rows differ:\n{}",
        failures.len(),
        rows.len(),
        failures.join("\n")
    );
}

#[test]
fn the_table_covers_every_category_with_several_hundred_rows() {
    let rows = rows();
    assert!(rows.len() >= 400, "{} rows", rows.len());
    for kind in ["cond", "route", "source"] {
        assert!(rows.iter().any(|r| r.kind == kind), "no {kind} rows");
    }
    for expected in [
        "true",
        "false",
        "undefined",
        "error",
        "ok",
        "match",
        "nomatch",
    ] {
        assert!(
            rows.iter().any(|r| r.expected == expected),
            "no {expected} rows"
        );
    }
    let differences = rows.iter().filter(|r| r.fleethub.is_some()).count();
    assert!(differences <= 10, "{differences} deliberate differences");
}
