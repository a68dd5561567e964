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

/// Valid routes: (text, source path, has condition, sink).
fn valid() -> Vec<(&'static str, &'static str, bool, Sink)> {
    vec![
        ("FROM /* INTO $upstream", "/*", false, Sink::Upstream),
        ("FROM /* INTO $events", "/*", false, Sink::Events),
        (
            "FROM /messages/* INTO Endpoint(\"lake-1\")",
            "/messages/*",
            false,
            Sink::Endpoint("lake-1".into()),
        ),
        ("from /* into $upstream", "/*", false, Sink::Upstream),
        (
            "SELECT * FROM /messages/* INTO $upstream",
            "/messages/*",
            false,
            Sink::Upstream,
        ),
        (
            "FROM /messages/* INTO $upstream",
            "/messages/*",
            false,
            Sink::Upstream,
        ),
        (
            "FROM /messages INTO $upstream",
            "/messages",
            false,
            Sink::Upstream,
        ),
        (
            "FROM /messages/modules/* INTO $upstream",
            "/messages/modules/*",
            false,
            Sink::Upstream,
        ),
        (
            "FROM /messages/modules/filter/* INTO $upstream",
            "/messages/modules/filter/*",
            false,
            Sink::Upstream,
        ),
        (
            "FROM /messages/modules/filter/outputs/* INTO $upstream",
            "/messages/modules/filter/outputs/*",
            false,
            Sink::Upstream,
        ),
        (
            "FROM /messages/modules/filter/outputs/out1 INTO $upstream",
            "/messages/modules/filter/outputs/out1",
            false,
            Sink::Upstream,
        ),
        (
            "FROM /twinChangeNotifications INTO $upstream",
            "/twinChangeNotifications",
            false,
            Sink::Upstream,
        ),
        (
            "FROM /nothing/* INTO $upstream",
            "/nothing/*",
            false,
            Sink::Upstream,
        ),
        (
            "FROM / messages / * INTO $upstream",
            "/messages/*",
            false,
            Sink::Upstream,
        ),
        (
            "FROM /messages/* INTO BrokeredEndpoint(\"/modules/filter/inputs/in1\")",
            "/messages/*",
            false,
            input("filter", "in1"),
        ),
        (
            "FROM /messages/* INTO brokeredendpoint(\"/modules/f/inputs/i\")",
            "/messages/*",
            false,
            input("f", "i"),
        ),
        (
            "FROM /messages/* INTO BrokeredEndpoint( \"/modules/f/inputs/i\" )",
            "/messages/*",
            false,
            input("f", "i"),
        ),
        (
            "FROM /messages/* INTO BrokeredEndpoint('/modules/f/inputs/i')",
            "/messages/*",
            false,
            input("f", "i"),
        ),
        (
            "FROM /messages/* WHERE $body.temperature > 30 INTO $upstream",
            "/messages/*",
            true,
            Sink::Upstream,
        ),
        (
            "FROM /messages/* where $body.temperature > 30 into $upstream",
            "/messages/*",
            true,
            Sink::Upstream,
        ),
        (
            "FROM /messages/* WHERE $connectionDeviceId = 'dev1' INTO $upstream",
            "/messages/*",
            true,
            Sink::Upstream,
        ),
        (
            "FROM /messages/* WHERE (a = '1') INTO $upstream",
            "/messages/*",
            true,
            Sink::Upstream,
        ),
        (
            "FROM /messages/* WHERE NOT IS_DEFINED($body.x) INTO $upstream",
            "/messages/*",
            true,
            Sink::Upstream,
        ),
        (
            "FROM /messages/* WHERE CONTAINS(name, 'INTO') INTO $upstream",
            "/messages/*",
            true,
            Sink::Upstream,
        ),
        (
            "FROM /messages/* WHERE a = 'x' AND (b = 'y' OR c = 'z') INTO $upstream",
            "/messages/*",
            true,
            Sink::Upstream,
        ),
        (
            "  FROM   /messages/*   INTO   $upstream  ",
            "/messages/*",
            false,
            Sink::Upstream,
        ),
        (
            "FROM /messages/modules/m-1.x/outputs/o_2 INTO $upstream",
            "/messages/modules/m-1.x/outputs/o_2",
            false,
            Sink::Upstream,
        ),
        (
            "FROM /messages/* WHERE $body.readings[1] = 20 INTO $upstream",
            "/messages/*",
            true,
            Sink::Upstream,
        ),
        (
            "FROM /messages/* WHERE x = 'it\\'s' INTO $upstream",
            "/messages/*",
            true,
            Sink::Upstream,
        ),
        (
            "FROM /messages/* WHERE $body.temperature * 9 / 5 + 32 > 80 INTO $upstream",
            "/messages/*",
            true,
            Sink::Upstream,
        ),
        (
            "FROM /messages/* WHERE true INTO $upstream",
            "/messages/*",
            true,
            Sink::Upstream,
        ),
        (
            "FROM /twinChangeNotifications WHERE $body.properties.reported.fw > 1 INTO $upstream",
            "/twinChangeNotifications",
            true,
            Sink::Upstream,
        ),
        (
            "FROM /* WHERE 1 = 1 INTO $UPSTREAM",
            "/*",
            true,
            Sink::Upstream,
        ),
        (
            "FROM /messages/* WHERE into_count = '1' INTO $upstream",
            "/messages/*",
            true,
            Sink::Upstream,
        ),
        (
            "FROM /messages/* WHERE (key ?? 'none') || '!' = 'x!' INTO $upstream",
            "/messages/*",
            true,
            Sink::Upstream,
        ),
    ]
}

/// Invalid routes: (text, column, what the error must say it expected).
fn invalid() -> Vec<(&'static str, usize, &'static str)> {
    vec![
        ("", 1, "FROM"),
        ("SELECT /* INTO $upstream", 8, "'*' after SELECT"),
        ("FROM", 5, "a source path"),
        ("FROM INTO $upstream", 6, "a source path"),
        ("FROM messages INTO $upstream", 6, "a source path"),
        ("FROM /messages/*", 17, "WHERE or INTO"),
        ("FROM /messages/* $upstream", 18, "WHERE or INTO"),
        ("FROM /messages/ INTO $upstream", 17, "'*' or a name"),
        ("FROM /messages/* INTO", 22, "a sink"),
        ("FROM /messages/* INTO upstream", 23, "a sink"),
        ("FROM /messages/* INTO $downstream", 23, "a sink"),
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
            "FROM /messages/* INTO BrokeredEndpoint(\"/modules/a/inputs/b\"",
            61,
            "')'",
        ),
        ("FROM /messages/* WHERE INTO $upstream", 24, "an expression"),
        (
            "FROM /messages/* WHERE a = INTO $upstream",
            28,
            "an expression",
        ),
        ("FROM /messages/* WHERE a = '1'", 31, "INTO"),
        (
            "FROM /messages/* WHERE a = '1' INT0 $upstream",
            32,
            "an operator or INTO",
        ),
        ("FROM /messages/* WHERE (a = '1' INTO $upstream", 33, "')'"),
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
            "LOWER arguments (string)",
        ),
        (
            "FROM /messages/* WHERE SUBSTRING(a) = 'x' INTO $upstream",
            24,
            "(string, number) or (string, number, number)",
        ),
        (
            "FROM /messages/* WHERE a IN ['x'] INTO $upstream",
            26,
            "an operator or INTO",
        ),
        (
            "FROM /messages/* WHERE a = '1' AND INTO $upstream",
            36,
            "an expression",
        ),
        (
            "FROM /messages/* WHERE count = 7 INTO $upstream",
            30,
            "the same type on both sides of '='",
        ),
        (
            "FROM /messages/* WHERE a = '1' OR b INTO $upstream",
            32,
            "bools on both sides of OR",
        ),
        (
            "FROM /messages/* WHERE NOT a INTO $upstream",
            24,
            "a bool after NOT",
        ),
        (
            "FROM /messages/* WHERE 'a' + 1 = 2 INTO $upstream",
            28,
            "numbers on both sides of '+'",
        ),
        (
            "FROM /messages/* WHERE $body.a[x] = 1 INTO $upstream",
            24,
            "a $body path",
        ),
        (
            "FROM /messages/* WHERE a = @ INTO $upstream",
            28,
            "an expression",
        ),
        (
            "FROM /messages/* WHERE twin_change_includes(properties.reported.x) INTO $upstream",
            24,
            "only in a route FROM /twinChangeNotifications",
        ),
    ]
}

fn message() -> Message {
    let body = br#"{"temperature": 31.5, "humidity": 40, "name": "Pump-7", "nested": {"level": 3, "ok": true, "none": null}, "readings": [10, 20, 30], "tags": ["a", "b"]}"#;
    Message {
        body: Bytes::from_static(body),
        properties: vec![
            ("alert".into(), Some("true".into())),
            ("severity".into(), Some("high".into())),
            ("count".into(), Some("7".into())),
            ("flag".into(), None),
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

/// Conditions on [`message`]: Some(true) matches, Some(false) false, None undefined. The
/// conformance table (`tests/conformance/edgehub.tsv`) holds several hundred more.
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
        ("ALERT = 'true'", Some(true)),
        ("severity = 'high'", Some(true)),
        ("severity <> 'low'", Some(true)),
        ("severity != 'high'", Some(false)),
        ("missing = 'x'", None),
        ("count = '7'", Some(true)),
        ("AS_NUMBER(count) = 7", Some(true)),
        ("is_null(flag)", Some(true)),
        ("is_defined(flag)", Some(true)),
        // $body values of different types compare by type order, not undefined
        ("$body.name > 3", Some(true)),
        ("$body.temperature = '31.5'", Some(false)),
        ("$body.nested.ok = 'true'", Some(false)),
        // logic, three-valued
        ("$body.temperature > 30 AND severity = 'high'", Some(true)),
        ("$body.temperature > 30 AND severity = 'low'", Some(false)),
        ("$body.temperature > 40 OR severity = 'high'", Some(true)),
        ("$body.temperature > 40 OR severity = 'low'", Some(false)),
        ("NOT ($body.temperature > 30)", Some(false)),
        ("missing = '1' AND true", None),
        ("missing = '1' AND false", Some(false)),
        ("missing = '1' OR true", Some(true)),
        ("missing = '1' OR false", None),
        ("NOT (missing = '1')", None),
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
        ("1 / 0 = 1", Some(false)),
        ("0 / 0 = 1", None),
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
        ("ABS($body.name) = 1", None),
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
        ("severity || '/' || alert = 'high/true'", Some(true)),
        ("CONTAINS($body.name, 'mp-')", Some(true)),
        ("CONTAINS($body.name, 'zz')", Some(false)),
        ("STARTS_WITH($body.name, 'Pu')", Some(true)),
        ("ENDS_WITH($body.name, '-7')", Some(true)),
        ("ENDS_WITH($body.name, 'x')", Some(false)),
        ("INDEX_OF($body.name, '-') = 4", Some(true)),
        ("INDEX_OF($body.name, 'q') = -1", Some(true)),
        ("SUBSTRING($body.name, 0, 4) = 'Pump'", Some(true)),
        ("SUBSTRING($body.name, 5) = '7'", Some(true)),
        ("SUBSTRING($body.name, 5, 10) = '7'", None),
        ("SUBSTRING($body.name, -1, 2) = 'x'", None),
        ("LENGTH(missing) = 1", None),
        ("upper(severity) = 'HIGH'", Some(true)),
        ("(missing ?? severity) = 'high'", Some(true)),
        // literals
        ("true", Some(true)),
        ("false", Some(false)),
        ("null", Some(false)),
        ("null = null", Some(true)),
        ("'x' = 'x'", Some(true)),
        ("'it\\'s' = \"it's\"", Some(true)),
        ("'\\u00FC' = '\u{fc}'", Some(true)),
        ("1.5e1 = 15", Some(true)),
        ("0x10 = 16", Some(true)),
        ("1", None),
    ]
}

#[test]
fn valid_routes_parse_to_the_right_parts() {
    for (text, source, has_condition, sink) in valid() {
        let r = Route::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
        assert_eq!(r.source.path, source, "{text}");
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
        let c = RouteCondition::parse(cond).unwrap_or_else(|e| panic!("{cond}: {e}"));
        let ctx = MessageContext::new(&m, false, false);
        let got = match c.evaluate(&ctx) {
            Truth::True => Some(true),
            Truth::False => Some(false),
            Truth::Undefined => None,
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
    let cond = RouteCondition::parse("$body.temperature > 30").unwrap();
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
            spec("bad2", "FROM nowhere INTO $upstream"),
        ],
        7200,
    )
    .unwrap_err();
    assert_eq!(errors.len(), 2);
    assert_eq!(errors[0].name, "bad1");
    assert_eq!(errors[0].column, Some(28));
    assert!(errors[1]
        .to_string()
        .starts_with("route 'bad2' (test): expected a source path"));
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
        let m = message();
        if let Ok(r) = Route::parse(&format!("FROM /messages/* WHERE {s} INTO $upstream")) {
            if let Some(c) = r.condition {
                let _ = c.evaluate(&MessageContext::new(&m, true, false));
            }
        }
        let _ = Route::parse(&format!("FROM {s}"));
    }

    #[test]
    fn route_parser_never_panics_on_fragments(
        parts in proptest::collection::vec(
            prop_oneof![
                Just("FROM"), Just("WHERE"), Just("INTO"), Just("/*"), Just("/messages/*"),
                Just("$upstream"), Just("BrokeredEndpoint"), Just("(\"/modules/a/inputs/b\")"),
                Just("a"), Just("="), Just("'x'"), Just("("), Just(")"), Just("AND"), Just("["), Just("]"),
                Just(","), Just("$body.x"), Just("??"), Just("||"), Just("1"), Just("NOT"), Just("null"),
                Just("undefined"), Just("{"), Just("}"), Just("$x"), Just("-"), Just("is_defined"),
            ],
            0..14,
        )
    ) {
        let text = parts.join(" ");
        if let Ok(route) = Route::parse(&text) {
            if let Some(c) = route.condition {
                let m = message();
                let _ = c.evaluate(&MessageContext::new(&m, true, false));
                let _ = c.evaluate(&MessageContext::new(&m, true, true));
            }
        }
    }
}

/// Every way of nesting is refused past the limit with a message naming it, and accepted
/// at it: evaluating and dropping recurse through the tree.
#[test]
fn deep_nesting_is_refused_with_the_limit_never_a_crash() {
    type Shape = Box<dyn Fn(usize) -> String>;
    let shapes: Vec<(&str, Shape)> = vec![
        (
            "parentheses",
            Box::new(|n| format!("{}true{}", "(".repeat(n), ")".repeat(n))),
        ),
        ("NOT", Box::new(|n| format!("{}true", "NOT ".repeat(n)))),
        ("minus", Box::new(|n| format!("{}1 = 1", "- ".repeat(n)))),
        ("AND chain", Box::new(|n| vec!["true"; n + 1].join(" AND "))),
        (
            "?? chain",
            Box::new(|n| format!("({}) = 'a'", vec!["'a'"; n + 1].join(" ?? "))),
        ),
        (
            "calls",
            Box::new(|n| format!("{}1{} = 1", "abs(".repeat(n), ")".repeat(n))),
        ),
    ];
    let m = message();
    for (name, make) in &shapes {
        for n in [10, 60, 126] {
            let c =
                RouteCondition::parse(&make(n)).unwrap_or_else(|e| panic!("{name} at {n}: {e}"));
            let _ = c.evaluate(&MessageContext::new(&m, false, false));
        }
        for n in [129, 2_000, 100_000] {
            let e = RouteCondition::parse(&make(n)).expect_err(name);
            assert!(e.expected.contains("128 levels"), "{name} at {n}: {e}");
        }
    }
}
