use proptest::prelude::*;
use serde_json::{json, Value};

use super::query::{Collection, Item, Projection, Query};
use super::*;

fn twin() -> Value {
    json!({
        "deviceId": "dev-1",
        "tags": { "location": { "region": "US", "plant": 7 }, "env": "prod" },
        "properties": {
            "desired": { "interval": 30 },
            "reported": { "fw": 2, "fwName": "2.1.0", "ok": true, "list": [1, 2, 3] }
        }
    })
}

fn check(cond: &str) -> bool {
    Condition::parse(cond)
        .unwrap_or_else(|e| panic!("{cond}: {e}"))
        .matches(&JsonDoc(&twin()))
}

fn undefined(cond: &str) -> bool {
    Condition::parse(cond)
        .unwrap()
        .evaluate(&JsonDoc(&twin()))
        .is_none()
}

#[test]
fn comparisons_and_logic() {
    assert!(check(
        "tags.location.region = 'US' AND properties.reported.fw >= 2"
    ));
    assert!(check(
        "tags.location.region = 'US' and properties.reported.fw >= 2"
    ));
    assert!(!check("tags.location.region != 'US'"));
    assert!(check("tags.location.region <> 'EU'"));
    assert!(check(
        "tags.location.plant < 8 AND tags.location.plant > 6.5"
    ));
    assert!(check("NOT (tags.env = 'dev')"));
    assert!(check("tags.env = 'dev' OR deviceId = 'dev-1'"));
    assert!(check("properties.reported.ok = true"));
    assert!(check("properties.reported.list[1] = 2"));
    assert!(check("tags['env'] = 'prod'"));
}

#[test]
fn undefined_propagates_and_never_matches() {
    assert!(undefined("tags.missing = 'x'"));
    assert!(undefined("tags.missing != 'x'"));
    assert!(undefined("NOT (tags.missing = 'x')"));
    // Different types compare as undefined.
    assert!(undefined("properties.reported.fwName >= 2"));
    assert!(!check("properties.reported.fwName >= 2"));
    // AND with false is false, OR with true is true, even with an undefined side.
    assert_eq!(
        Condition::parse("tags.missing = 1 AND false")
            .unwrap()
            .evaluate(&JsonDoc(&twin())),
        Some(json!(false))
    );
    assert!(check("tags.missing = 1 OR true"));
}

#[test]
fn in_nin_and_functions() {
    assert!(check("tags.location.region IN ['US', 'EU']"));
    assert!(check("tags.location.region NIN ['EU', 'APAC']"));
    assert!(!check("tags.location.region NIN ['US']"));
    assert!(check("IS_DEFINED(properties.reported.fw)"));
    assert!(check("NOT IS_DEFINED(properties.reported.nothing)"));
    assert!(check("is_number(properties.reported.fw) AND IS_STRING(tags.env) AND IS_ARRAY(properties.reported.list)"));
    assert!(check(
        "STARTS_WITH(properties.reported.fwName, '2.') AND ENDS_WITH(deviceId, '-1')"
    ));
    assert!(check(
        "CONTAINS(LOWER(tags.env), 'pro') AND UPPER(tags.env) = 'PROD'"
    ));
    assert!(check("LENGTH(deviceId) = 5 AND INDEX_OF(deviceId, '-') = 3 AND SUBSTRING(deviceId, 0, 3) = 'dev'"));
    assert!(check("CONCAT(tags.env, '-', deviceId) = 'prod-dev-1'"));
    assert!(check(
        "AS_NUMBER('12.5') = 12.5 AND ABS(-3) = 3 AND CEILING(1.2) = 2 AND FLOOR(1.8) = 1"
    ));
    assert!(check(
        "POWER(2, 10) = 1024 AND SQRT(16) = 4 AND SQUARE(3) = 9 AND SIGN(-2) = -1"
    ));
    assert!(check(
        "(properties.desired.interval + 10) * 2 % 7 = 3 AND -properties.desired.interval = -30"
    ));
    assert!(undefined("1 / 0 = 1"));
}

#[test]
fn errors_say_where_and_what() {
    let e = Condition::parse("tags.a = 'x' AND").unwrap_err();
    assert_eq!((e.column, e.expected.as_str()), (17, "an expression"));
    let e = Condition::parse("(tags.a = 1").unwrap_err();
    assert_eq!(
        e.to_string(),
        "expected ')' at column 12, found end of input"
    );
    let e = Condition::parse("tags.a = 'unterminated").unwrap_err();
    assert_eq!(e.expected, "a closing quote");
    let e = Condition::parse("NOPE(tags.a)").unwrap_err();
    assert_eq!((e.column, e.expected.as_str()), (1, "a known function"));
    let e = Condition::parse("POWER(1)").unwrap_err();
    assert!(e.expected.contains("2 argument"), "{e}");
    let e = Condition::parse("tags.a = 1 tags.b").unwrap_err();
    assert_eq!(e.column, 12);
    let e = Condition::parse("tags. = 1").unwrap_err();
    assert_eq!(e.expected, "a property name after '.'");
    let e = Condition::parse("tags.a IN ('x')").unwrap_err();
    assert_eq!(e.expected, "'['");
    assert!(Condition::parse("IS_DEFINED(1)").is_err());
}

#[test]
fn strings_escape_quotes() {
    let c = Condition::parse("tags.name = 'O''Brien'").unwrap();
    assert!(c.matches(&JsonDoc(&json!({"tags": {"name": "O'Brien"}}))));
}

#[test]
fn queries_parse_projection_collection_and_filter() {
    let q = Query::parse(
        "SELECT * FROM devices WHERE tags.location.region = 'US' AND properties.reported.fw >= 2",
    )
    .unwrap();
    assert_eq!(
        (q.projection.clone(), q.from),
        (Projection::All, Collection::Devices)
    );
    assert!(q.matches(&twin()));
    let q = Query::parse("select count() as n from devices.modules").unwrap();
    assert_eq!(q.projection, Projection::Count { alias: "n".into() });
    assert_eq!(q.from, Collection::Modules);
    assert!(q.matches(&json!({})));
    let e = Query::parse("SELECT * FROM things").unwrap_err();
    assert_eq!((e.column, e.expected.as_str()), (15, "devices"));
    let q = Query::parse("SELECT deviceId, moduleId FROM devices.modules").unwrap();
    let field = |name: &str| Item::Field {
        path: vec![Segment::Key(name.into())],
        alias: name.into(),
    };
    assert_eq!(
        q.projection,
        Projection::Items(vec![field("deviceId"), field("moduleId")])
    );
    let e = Query::parse("SELECT 1 FROM devices").unwrap_err();
    assert_eq!(e.expected, "'*', COUNT() or field names");
    let e = Query::parse("SELECT deviceId, FROM devices").unwrap_err();
    assert_eq!(e.column, 23);
    let e = Query::parse("SELECT * FROM devices WHERE").unwrap_err();
    assert_eq!(e.expected, "an expression");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn parser_never_panics(src in ".{0,80}") {
        let _ = Condition::parse(&src);
        let _ = Query::parse(&src);
    }

    #[test]
    fn parser_never_panics_on_token_soup(
        parts in proptest::collection::vec(
            prop_oneof![
                Just("tags.a"), Just("'x'"), Just("1"), Just("AND"), Just("OR"), Just("NOT"),
                Just("("), Just(")"), Just("["), Just("]"), Just(","), Just("="), Just("<="),
                Just("IN"), Just("NIN"), Just("IS_DEFINED"), Just("CONCAT"), Just("."), Just("-"),
                Just("SELECT"), Just("*"), Just("FROM"), Just("devices"), Just("WHERE"), Just("null"),
            ],
            0..20,
        )
    ) {
        let src = parts.join(" ");
        if let Ok(c) = Condition::parse(&src) {
            let _ = c.evaluate(&JsonDoc(&twin()));
        }
        let _ = Query::parse(&src);
    }

    /// A comparison of a path with a literal agrees with direct evaluation in Rust.
    #[test]
    fn number_comparisons_agree(a in -1000i64..1000, b in -1000i64..1000) {
        let doc = json!({ "x": a });
        let c = Condition::parse(&format!("x < {b}")).unwrap();
        prop_assert_eq!(c.matches(&JsonDoc(&doc)), a < b);
        let c = Condition::parse(&format!("x = {b} OR x > {b}")).unwrap();
        prop_assert_eq!(c.matches(&JsonDoc(&doc)), a >= b);
    }
}

/// Shapes that nest: parentheses, NOT, unary minus, operator chains, lists, function calls.
fn nested(kind: &str, depth: usize) -> String {
    match kind {
        "parens" => format!("{}a = 1{}", "(".repeat(depth), ")".repeat(depth)),
        "not" => format!("{}a = 1", "NOT ".repeat(depth)),
        "minus" => format!("{}1 = a", "-".repeat(depth)),
        "and" => vec!["a = 1"; depth + 1].join(" AND "),
        "plus" => format!("{} = 3", vec!["a"; depth + 1].join(" + ")),
        "list" => format!("a IN {}1{}", "[".repeat(depth), "]".repeat(depth)),
        "call" => format!("{}1{} = 1", "ABS(".repeat(depth), ")".repeat(depth)),
        _ => unreachable!(),
    }
}

const SHAPES: [&str; 7] = ["parens", "not", "minus", "and", "plus", "list", "call"];

#[test]
fn nesting_up_to_the_limit_parses_and_evaluates() {
    for kind in SHAPES {
        // Each shape adds about one level per repetition, plus the comparison's own.
        let src = nested(kind, MAX_DEPTH / 2);
        let c = Condition::parse(&src).unwrap_or_else(|e| panic!("{kind}: {e}"));
        let _ = c.matches(&JsonDoc(&twin()));
    }
}

#[test]
fn nesting_past_the_limit_is_refused_with_the_limit_named() {
    for kind in SHAPES {
        for depth in [MAX_DEPTH + 1, 2_000, 100_000] {
            let src = nested(kind, depth);
            let e = Condition::parse(&src).expect_err(kind);
            assert!(
                e.to_string()
                    .contains(&format!("at most {MAX_DEPTH} levels")),
                "{kind} x{depth}: {e}"
            );
            // The same through the query and route languages.
            let q = format!("SELECT * FROM devices WHERE {src}");
            assert!(query::Query::parse(&q).is_err(), "{kind} x{depth}");
        }
    }
}

#[test]
fn queries_group_by_with_counts_and_aliases() {
    let q = Query::parse(
        "SELECT properties.reported.fw AS fw, COUNT() AS n FROM devices WHERE tags.env = 'prod' GROUP BY properties.reported.fw",
    )
    .unwrap();
    let fw = vec![
        Segment::Key("properties".into()),
        Segment::Key("reported".into()),
        Segment::Key("fw".into()),
    ];
    assert_eq!(q.group_by, vec![fw.clone()]);
    assert_eq!(
        q.projection,
        Projection::Items(vec![
            Item::Field {
                path: fw,
                alias: "fw".into()
            },
            Item::Count { alias: "n".into() }
        ])
    );
    // Without AS a column is named by its last name.
    let q = Query::parse("SELECT tags.location.region FROM devices").unwrap();
    assert!(
        matches!(&q.projection, Projection::Items(i) if matches!(&i[0], Item::Field { alias, .. } if alias == "region"))
    );
    // A field beside COUNT() must be grouped by; GROUP BY needs fields, not '*'.
    let e = Query::parse("SELECT tags.x, COUNT() FROM devices").unwrap_err();
    assert!(e.expected.contains("GROUP BY"), "{e}");
    let e = Query::parse("SELECT * FROM devices GROUP BY tags.x").unwrap_err();
    assert!(e.expected.contains("GROUP BY"), "{e}");
    let e = Query::parse("SELECT COUNT() FROM devices GROUP tags.x").unwrap_err();
    assert_eq!(e.expected, "BY");
}
