//! The route language's table of cases: valid and invalid routes, and conditions evaluated
//! against a message (every function, undefined handling, precedence).

use bytes::Bytes;
use proptest::prelude::*;

use super::*;
use crate::context::MessageContext;
use crate::message::{Message, SystemProperties};

fn input(m: &str, i: &str) -> Sink {
    Sink::ModuleInput {
        module: m.into(),
        input: i.into(),
    }
}

/// Valid routes: (text, source, has condition, sink).
fn valid() -> Vec<(&'static str, Source, bool, Sink)> {
    use Source::*;
    vec![
        ("FROM /* INTO $upstream", All, false, Sink::Upstream),
        ("from /* into $upstream", All, false, Sink::Upstream),
        ("FROM /messages/* INTO $upstream", Messages, false, Sink::Upstream),
        ("FROM /messages/modules/* INTO $upstream", AnyModule, false, Sink::Upstream),
        ("FROM /messages/modules/filter/* INTO $upstream", Module("filter".into()), false, Sink::Upstream),
        ("FROM /messages/modules/filter/outputs/* INTO $upstream", ModuleOutputs("filter".into()), false, Sink::Upstream),
        ("FROM /messages/modules/filter/outputs/out1 INTO $upstream", ModuleOutput("filter".into(), "out1".into()), false, Sink::Upstream),
        ("FROM /twinChangeNotifications INTO $upstream", TwinChangeNotifications, false, Sink::Upstream),
        ("FROM /messages/* INTO BrokeredEndpoint(\"/modules/filter/inputs/in1\")", Messages, false, input("filter", "in1")),
        ("FROM /messages/* INTO brokeredendpoint(\"/modules/f/inputs/i\")", Messages, false, input("f", "i")),
        ("FROM /messages/* INTO BrokeredEndpoint( \"/modules/f/inputs/i\" )", Messages, false, input("f", "i")),
        ("FROM /messages/* WHERE temperature > 30 INTO $upstream", Messages, true, Sink::Upstream),
        ("FROM /messages/* where $body.temperature > 30 into $upstream", Messages, true, Sink::Upstream),
        ("FROM /messages/* WHERE $connectionDeviceId = 'dev1' INTO $upstream", Messages, true, Sink::Upstream),
        ("FROM /messages/* WHERE (a = 1) INTO $upstream", Messages, true, Sink::Upstream),
        ("FROM /messages/* WHERE a IN ['x', 'y'] INTO $upstream", Messages, true, Sink::Upstream),
        ("FROM /messages/* WHERE NOT IS_DEFINED($body.x) INTO $upstream", Messages, true, Sink::Upstream),
        ("FROM /messages/* WHERE CONTAINS(name, 'INTO') INTO $upstream", Messages, true, Sink::Upstream),
        ("FROM /messages/* WHERE a = 'x' AND (b = 'y' OR c = 'z') INTO $upstream", Messages, true, Sink::Upstream),
        ("  FROM   /messages/*   INTO   $upstream  ", Messages, false, Sink::Upstream),
        ("FROM /messages/modules/m-1.x/outputs/o_2 INTO $upstream", ModuleOutput("m-1.x".into(), "o_2".into()), false, Sink::Upstream),
        ("FROM /messages/* WHERE $body.readings[1] = 20 INTO $upstream", Messages, true, Sink::Upstream),
        ("FROM /messages/* WHERE $body.nested.level >= 3 INTO BrokeredEndpoint(\"/modules/a/inputs/b\")", Messages, true, input("a", "b")),
        ("FROM /messages/* WHERE -count < 0 INTO $upstream", Messages, true, Sink::Upstream),
        ("FROM /messages/* WHERE x = 'it''s' INTO $upstream", Messages, true, Sink::Upstream),
        ("FROM /messages/* WHERE UPPER(severity) = 'HIGH' INTO $upstream", Messages, true, Sink::Upstream),
        ("FROM /messages/* WHERE $body.temperature * 9 / 5 + 32 > 80 INTO $upstream", Messages, true, Sink::Upstream),
        ("FROM /messages/* WHERE a NIN [1, 2] INTO $upstream", Messages, true, Sink::Upstream),
        ("FROM /messages/* WHERE true INTO $upstream", Messages, true, Sink::Upstream),
        ("FROM /messages/* WHERE $outputName = 'o' AND $connectionModuleId = 'm' INTO $upstream", Messages, true, Sink::Upstream),
        ("FROM /twinChangeNotifications WHERE properties.reported.fw > 1 INTO $upstream", TwinChangeNotifications, true, Sink::Upstream),
        ("FROM /messages/modules/a/* WHERE $body.x = 1 INTO BrokeredEndpoint(\"/modules/b/inputs/c\")", Module("a".into()), true, input("b", "c")),
        ("FROM /* WHERE 1 = 1 INTO $UPSTREAM", All, true, Sink::Upstream),
        ("FROM /messages/* WHERE into_count = 1 INTO $upstream", Messages, true, Sink::Upstream),
        ("FROM /messages/* WHERE STARTS_WITH($body.name, 'Pump') INTO $upstream", Messages, true, Sink::Upstream),
    ]
}

/// Invalid routes: (text, column, what the error must say it expected).
fn invalid() -> Vec<(&'static str, usize, &'static str)> {
    vec![
        ("", 1, "FROM"),
        ("SELECT /* INTO $upstream", 1, "FROM"),
        ("FROM", 5, "a source"),
        ("FROM INTO $upstream", 6, "a source"),
        ("FROM /messages INTO $upstream", 6, "a source ("),
        ("FROM /messages/*", 17, "WHERE or INTO"),
        ("FROM /messages/* $upstream", 6, "a source ("),
        ("FROM /nothing/* INTO $upstream", 6, "a source ("),
        ("FROM /messages/modules//* INTO $upstream", 6, "a source ("),
        (
            "FROM /messages/modules/m/outputs/ INTO $upstream",
            6,
            "a source (",
        ),
        (
            "FROM /messages/modules/m/inputs/x INTO $upstream",
            6,
            "a source (",
        ),
        ("FROM /messages/* INTO", 22, "a sink"),
        ("FROM /messages/* INTO upstream", 23, "a sink"),
        ("FROM /messages/* INTO $upstream extra", 33, "end of route"),
        ("FROM /messages/* INTO BrokeredEndpoint", 39, "(\"/modules/"),
        (
            "FROM /messages/* INTO BrokeredEndpoint(\"/modules/a\")",
            40,
            "an endpoint",
        ),
        (
            "FROM /messages/* INTO BrokeredEndpoint(\"/modules/a/outputs/b\")",
            40,
            "an endpoint",
        ),
        (
            "FROM /messages/* INTO BrokeredEndpoint(\"/modules//inputs/b\")",
            40,
            "an endpoint",
        ),
        (
            "FROM /messages/* INTO BrokeredEndpoint('/modules/a/inputs/b'",
            39,
            "(\"/modules/",
        ),
        ("FROM /messages/* WHERE INTO $upstream", 24, "an expression"),
        (
            "FROM /messages/* WHERE a = INTO $upstream",
            28,
            "an expression",
        ),
        ("FROM /messages/* WHERE a = 1", 29, "INTO"),
        ("FROM /messages/* WHERE a = 1 INT0 $upstream", 30, "INTO"),
        ("FROM /messages/* WHERE (a = 1 INTO $upstream", 31, "')'"),
        (
            "FROM /messages/* WHERE a = 'x INTO $upstream",
            28,
            "a closing quote",
        ),
        (
            "FROM /messages/* WHERE NOPE(a) INTO $upstream",
            24,
            "a known function",
        ),
        (
            "FROM /messages/* WHERE LOWER(a, b) = 'x' INTO $upstream",
            24,
            "1 argument",
        ),
        (
            "FROM /messages/* WHERE SUBSTRING(a, 1) = 'x' INTO $upstream",
            24,
            "3 argument",
        ),
        (
            "FROM /messages/* WHERE a IN ('x') INTO $upstream",
            29,
            "'['",
        ),
        (
            "FROM /messages/* WHERE a IN [1, INTO $upstream",
            38,
            "',' or ']'",
        ),
        (
            "FROM /messages/* WHERE a = 1 AND INTO $upstream",
            34,
            "an expression",
        ),
        (
            "FROM /messages/* WHERE $body. = 1 INTO $upstream",
            31,
            "a property name",
        ),
        (
            "FROM /messages/* WHERE a ! b INTO $upstream",
            26,
            "an operator",
        ),
        (
            "FROM /messages/* WHERE a = 1 b = 2 INTO $upstream",
            30,
            "INTO",
        ),
        (
            "FROM /messages/* WHERE IS_DEFINED('x') INTO $upstream",
            24,
            "a property path",
        ),
        (
            "FROM /messages/* WHERE a = @ INTO $upstream",
            28,
            "an expression",
        ),
    ]
}

fn message() -> Message {
    let body = br#"{"temperature": 31.5, "humidity": 40, "name": "Pump-7", "nested": {"level": 3, "ok": true, "none": null}, "readings": [10, 20, 30], "tags": ["a", "b"]}"#;
    Message {
        body: Bytes::from_static(body),
        properties: vec![
            ("alert".into(), "true".into()),
            ("severity".into(), "high".into()),
            ("count".into(), "7".into()),
        ],
        system: SystemProperties {
            content_type: Some("application/json".into()),
            content_encoding: Some("utf-8".into()),
            message_id: Some("m-1".into()),
            correlation_id: Some("c-9".into()),
            output_name: Some("temperatureOutput".into()),
            connection_device_id: Some("dev1".into()),
            connection_module_id: Some("sensor".into()),
            ..Default::default()
        },
    }
}

/// Conditions on [`message`]: Some(true) matches, Some(false) false, None undefined.
fn conditions() -> Vec<(&'static str, Option<bool>)> {
    vec![
        // $body, system and application properties
        ("$body.temperature > 30", Some(true)),
        ("$body.temperature = 31.5", Some(true)),
        ("$body.humidity <= 40", Some(true)),
        ("$body.humidity < 40", Some(false)),
        ("$body.name = 'Pump-7'", Some(true)),
        ("$body.nested.level >= 3", Some(true)),
        ("$body.nested.ok = true", Some(true)),
        ("$body.nested.none = null", Some(true)),
        ("$body.readings[2] = 30", Some(true)),
        ("$body.tags[0] = 'a'", Some(true)),
        ("$body.missing = 1", None),
        ("$body.readings[9] = 1", None),
        ("$connectionDeviceId = 'dev1'", Some(true)),
        ("$connectionModuleId = 'sensor'", Some(true)),
        ("$contentType = 'application/json'", Some(true)),
        ("$contentEncoding = 'utf-8'", Some(true)),
        ("$messageId = 'm-1'", Some(true)),
        ("$correlationId = 'c-9'", Some(true)),
        ("$outputName = 'temperatureOutput'", Some(true)),
        ("$userId = 'x'", None),
        ("alert = 'true'", Some(true)),
        ("severity = 'high'", Some(true)),
        ("severity <> 'low'", Some(true)),
        ("severity != 'high'", Some(false)),
        ("missing = 'x'", None),
        ("count = '7'", Some(true)),
        ("count = 7", None),
        ("AS_NUMBER(count) = 7", Some(true)),
        // comparisons across types are undefined
        ("$body.name > 3", None),
        ("$body.temperature = '31.5'", None),
        ("$body.nested.ok = 'true'", None),
        // logic, three-valued
        ("$body.temperature > 30 AND severity = 'high'", Some(true)),
        ("$body.temperature > 30 AND severity = 'low'", Some(false)),
        ("$body.temperature > 40 OR severity = 'high'", Some(true)),
        ("$body.temperature > 40 OR severity = 'low'", Some(false)),
        ("NOT $body.temperature > 40", Some(true)),
        ("NOT ($body.temperature > 30)", Some(false)),
        ("missing = 1 AND true", None),
        ("missing = 1 AND false", Some(false)),
        ("missing = 1 OR true", Some(true)),
        ("missing = 1 OR false", None),
        ("NOT missing = 1", None),
        ("NOT NOT true", Some(true)),
        // precedence
        ("true OR false AND false", Some(true)),
        ("(true OR false) AND false", Some(false)),
        ("NOT false AND false", Some(false)),
        ("1 + 2 * 3 = 7", Some(true)),
        ("(1 + 2) * 3 = 9", Some(true)),
        ("10 - 4 - 3 = 3", Some(true)),
        ("12 / 3 / 2 = 2", Some(true)),
        ("7 % 4 = 3", Some(true)),
        ("-2 * -3 = 6", Some(true)),
        ("2 + 3 > 4 AND 1 < 2", Some(true)),
        ("1 / 0 = 1", None),
        ("'a' + 1 = 1", None),
        // IN / NIN
        ("severity IN ['low', 'high']", Some(true)),
        ("severity IN ['low']", Some(false)),
        ("severity NIN ['low']", Some(true)),
        ("$body.humidity IN [10, 40]", Some(true)),
        ("missing IN ['x']", None),
        // type functions
        ("IS_DEFINED($body.temperature)", Some(true)),
        ("IS_DEFINED($body.nope)", Some(false)),
        ("IS_DEFINED(severity)", Some(true)),
        ("IS_NULL($body.nested.none)", Some(true)),
        ("IS_NULL($body.nested.nope)", Some(false)),
        ("IS_STRING($body.name)", Some(true)),
        ("IS_STRING($body.humidity)", Some(false)),
        ("IS_NUMBER($body.humidity)", Some(true)),
        ("IS_BOOL($body.nested.ok)", Some(true)),
        ("IS_OBJECT($body.nested)", Some(true)),
        ("IS_ARRAY($body.readings)", Some(true)),
        ("IS_ARRAY($body.nested)", Some(false)),
        ("IS_PRIMITIVE($body.name)", Some(true)),
        ("IS_PRIMITIVE($body.nested)", Some(false)),
        // math
        ("ABS(-4.5) = 4.5", Some(true)),
        ("CEILING($body.temperature) = 32", Some(true)),
        ("FLOOR($body.temperature) = 31", Some(true)),
        ("EXP(0) = 1", Some(true)),
        ("POWER(2, 8) = 256", Some(true)),
        ("SIGN(-3) = -1", Some(true)),
        ("SIGN(0) = 0", Some(true)),
        ("SQRT(81) = 9", Some(true)),
        ("SQRT(-1) = 1", None),
        ("SQUARE(4) = 16", Some(true)),
        ("ABS('x') = 1", None),
        ("AS_NUMBER('x') = 1", None),
        ("AS_NUMBER(' 2.5 ') = 2.5", Some(true)),
        // strings
        ("LENGTH($body.name) = 6", Some(true)),
        ("LOWER($body.name) = 'pump-7'", Some(true)),
        ("UPPER(severity) = 'HIGH'", Some(true)),
        (
            "CONCAT(severity, '-', $body.name) = 'high-Pump-7'",
            Some(true),
        ),
        ("CONCAT(severity, $body.humidity) = 'x'", None),
        ("CONTAINS($body.name, 'mp-')", Some(true)),
        ("CONTAINS($body.name, 'zz')", Some(false)),
        ("STARTS_WITH($body.name, 'Pu')", Some(true)),
        ("ENDS_WITH($body.name, '-7')", Some(true)),
        ("ENDS_WITH($body.name, 'x')", Some(false)),
        ("INDEX_OF($body.name, '-') = 4", Some(true)),
        ("INDEX_OF($body.name, 'q') = -1", Some(true)),
        ("SUBSTRING($body.name, 0, 4) = 'Pump'", Some(true)),
        ("SUBSTRING($body.name, 5, 10) = '7'", Some(true)),
        ("SUBSTRING($body.name, -1, 2) = 'x'", None),
        ("LENGTH(missing) = 1", None),
        ("upper(severity) = 'HIGH'", Some(true)),
        // literals
        ("true", Some(true)),
        ("false", Some(false)),
        ("null = null", Some(true)),
        ("'x' = 'x'", Some(true)),
        ("'it''s' = 'it''s'", Some(true)),
        ("1.5e1 = 15", Some(true)),
        ("1", None),
    ]
}

#[test]
fn valid_routes_parse_to_the_right_parts() {
    for (text, source, has_condition, sink) in valid() {
        let r = Route::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
        assert_eq!(r.source, source, "{text}");
        assert_eq!(r.condition.is_some(), has_condition, "{text}");
        assert_eq!(r.sink, sink, "{text}");
    }
}

#[test]
fn invalid_routes_say_where_and_what() {
    for (text, column, expected) in invalid() {
        match Route::parse(text) {
            Ok(r) => panic!("{text:?} parsed: {r:?}"),
            Err(e) => {
                assert!(
                    e.expected.contains(expected),
                    "{text:?}: {e} (wanted {expected:?})"
                );
                assert_eq!(e.column, column, "{text:?}: {e}");
            }
        }
    }
}

#[test]
fn conditions_evaluate_three_valued() {
    let m = message();
    for (cond, want) in conditions() {
        let c = crate::condition::Condition::parse(cond).unwrap_or_else(|e| panic!("{cond}: {e}"));
        let ctx = MessageContext::new(&m, false, false);
        let got = match c.evaluate(&ctx) {
            Some(serde_json::Value::Bool(b)) => Some(b),
            Some(_) | None => None,
        };
        assert_eq!(got, want, "{cond}");
    }
}

#[test]
fn the_table_has_at_least_150_cases() {
    assert!(valid().len() + invalid().len() + conditions().len() >= 150);
}

#[test]
fn body_needs_json_content_type_and_encoding() {
    let mut m = message();
    let cond = crate::condition::Condition::parse("$body.temperature > 30").unwrap();
    m.system.content_type = None;
    assert!(!cond.matches(&MessageContext::new(&m, false, false)));
    assert!(
        cond.matches(&MessageContext::new(&m, true, false)),
        "opt-in detection"
    );
    m.system.content_type = Some("application/json; charset=utf-8".into());
    m.system.content_encoding = Some("latin-1".into());
    assert!(!cond.matches(&MessageContext::new(&m, false, false)));
    // UTF-16 little-endian bodies are decoded.
    let text = r#"{"temperature": 35}"#;
    let utf16: Vec<u8> = text.encode_utf16().flat_map(|u| u.to_le_bytes()).collect();
    m.body = Bytes::from(utf16);
    m.system.content_encoding = Some("UTF-16".into());
    assert!(cond.matches(&MessageContext::new(&m, false, false)));
    let utf32: Vec<u8> = text
        .chars()
        .flat_map(|c| (c as u32).to_le_bytes())
        .collect();
    m.body = Bytes::from(utf32);
    m.system.content_encoding = Some("utf-32".into());
    assert!(cond.matches(&MessageContext::new(&m, false, false)));
}

#[test]
fn sources_match_origins() {
    let hub_out = Origin {
        hub_module: Some("filter"),
        output: Some("out1"),
        twin_change: false,
    };
    let device = Origin {
        hub_module: None,
        output: None,
        twin_change: false,
    };
    let twin = Origin {
        hub_module: None,
        output: None,
        twin_change: true,
    };
    let s = |t: &str| {
        Route::parse(&format!("FROM {t} INTO $upstream"))
            .unwrap()
            .source
    };
    assert!(s("/*").matches(&hub_out) && s("/*").matches(&device) && s("/*").matches(&twin));
    assert!(s("/messages/*").matches(&device) && !s("/messages/*").matches(&twin));
    assert!(
        s("/messages/modules/*").matches(&hub_out) && !s("/messages/modules/*").matches(&device)
    );
    assert!(s("/messages/modules/filter/*").matches(&hub_out));
    assert!(!s("/messages/modules/other/*").matches(&hub_out));
    assert!(s("/messages/modules/filter/outputs/*").matches(&hub_out));
    assert!(s("/messages/modules/filter/outputs/out1").matches(&hub_out));
    assert!(!s("/messages/modules/filter/outputs/out2").matches(&hub_out));
    assert!(
        s("/twinChangeNotifications").matches(&twin)
            && !s("/twinChangeNotifications").matches(&device)
    );
}

#[test]
fn route_sets_are_all_or_nothing_with_every_error() {
    let spec = |name: &str, text: &str| RouteSpec {
        name: name.into(),
        text: text.into(),
        priority: 0,
        ttl_secs: None,
        origin: "test".into(),
    };
    let errors = RouteTable::build(
        vec![
            spec("good", "FROM /* INTO $upstream"),
            spec("bad1", "FROM /messages/* WHERE a = INTO $upstream"),
            spec("bad2", "FROM /nowhere INTO $upstream"),
        ],
        7200,
    )
    .unwrap_err();
    assert_eq!(errors.len(), 2);
    assert_eq!(errors[0].name, "bad1");
    assert_eq!(errors[0].column, Some(28));
    assert!(errors[1]
        .to_string()
        .starts_with("route 'bad2' (test): expected a source"));
    let mut high = spec("z", "FROM /* INTO $upstream");
    high.priority = 1;
    let table = RouteTable::build(vec![high, spec("a", "FROM /* INTO $upstream")], 60).unwrap();
    assert_eq!(
        table
            .routes
            .iter()
            .map(|r| r.spec.name.as_str())
            .collect::<Vec<_>>(),
        ["a", "z"]
    );
    let mut bad = spec("p", "FROM /* INTO $upstream");
    bad.priority = 10;
    assert!(RouteTable::build(vec![bad], 60).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn route_parser_never_panics(s in ".{0,100}") {
        let _ = Route::parse(&s);
        let _ = Route::parse(&format!("FROM /messages/* WHERE {s} INTO $upstream"));
        let _ = Route::parse(&format!("FROM {s}"));
    }

    #[test]
    fn route_parser_never_panics_on_fragments(
        parts in proptest::collection::vec(
            prop_oneof![
                Just("FROM"), Just("WHERE"), Just("INTO"), Just("/*"), Just("/messages/*"),
                Just("$upstream"), Just("BrokeredEndpoint"), Just("(\"/modules/a/inputs/b\")"),
                Just("a"), Just("="), Just("'x'"), Just("("), Just(")"), Just("AND"), Just("["), Just("]"),
                Just(","), Just("$body.x"), Just("IN"), Just("1"),
            ],
            0..14,
        )
    ) {
        let text = parts.join(" ");
        if let Ok(route) = Route::parse(&text) {
            if let Some(c) = route.condition {
                let m = message();
                let _ = c.evaluate(&MessageContext::new(&m, true, false));
            }
        }
    }
}
