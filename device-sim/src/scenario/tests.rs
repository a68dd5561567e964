//! Scenario files: parsing, checking whole, and the plans they make.
use super::*;
use serde_json::json;

fn plan(text: &str) -> Result<Plan> {
    let s: Scenario = toml::from_str(text)?;
    s.plan(&Overrides::default())
}

#[test]
fn rates_and_durations() {
    assert_eq!(parse_rate("2/s").unwrap(), 2.0);
    assert_eq!(parse_rate("30/min").unwrap(), 0.5);
    assert_eq!(parse_rate("4").unwrap(), 4.0);
    assert!(parse_rate("0/s").is_err());
    assert!(parse_rate("2/week").is_err());
    assert_eq!(parse_duration("1.5").unwrap(), Duration::from_millis(1500));
    assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
    assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
    assert!(parse_duration("soon").is_err());
}

#[test]
fn generators_render_per_device_state() {
    let t = Template::compile(
        &json!({
            "seq": {"$counter": {"start": 5, "step": 2}},
            "t": {"$drift": {"start": 20.0, "step": 1.0, "min": 19.0, "max": 21.0}},
            "r": {"$random": {"min": 1, "max": 3}},
            "c": {"$choice": ["a", "b"]},
            "id": "$deviceId",
            "fixed": [1, "x"]
        }),
        "body",
    )
    .unwrap();
    let mut rng = rand::thread_rng();
    let (mut a, mut b) = (t.state(), t.state());
    let first = t.render("d1", &mut a, &mut rng);
    let second = t.render("d1", &mut a, &mut rng);
    let other = t.render("d2", &mut b, &mut rng);
    assert_eq!(first["seq"], 5);
    assert_eq!(second["seq"], 7);
    assert_eq!(other["seq"], 5, "state is per device");
    assert_eq!(first["id"], "d1");
    assert_eq!(other["id"], "d2");
    assert_eq!(first["fixed"], json!([1, "x"]));
    for v in [&first, &second, &other] {
        let t = v["t"].as_f64().unwrap();
        assert!((19.0..=21.0).contains(&t), "{v}");
        assert!([1, 2, 3].contains(&v["r"].as_i64().unwrap()), "{v}");
        assert!(v["c"] == "a" || v["c"] == "b");
    }
}

#[test]
fn errors_name_the_field() {
    let e = plan("[telemetry.body]\ntemp = { \"$drfit\" = { start = 1 } }\n").unwrap_err();
    assert!(
        format!("{e:#}").contains("telemetry.body.temp.$drfit: unknown generator"),
        "{e:#}"
    );
    let e = plan("[telemetry.body]\nt = { \"$drift\" = { start = 1, stp = 2 } }\n").unwrap_err();
    assert!(format!("{e:#}").contains("unknown field `stp`"), "{e:#}");
    let e =
        plan("[telemetry.body]\nt = { \"$drift\" = { start = 1.0, step = 1e308 } }\n").unwrap_err();
    assert!(
        format!("{e:#}").contains("$drift.step: must be a finite"),
        "{e:#}"
    );
    let e = plan("[telemetry]\nduration = \"forever\"\n").unwrap_err();
    assert!(format!("{e:#}").starts_with("telemetry.duration"), "{e:#}");
    let e = plan("[fleet]\ndevces = 3\n").unwrap_err();
    assert!(format!("{e:#}").contains("devces"), "{e:#}");
}

proptest::proptest! {
    /// Rates, durations and whole scenario files come from users: any text gives a
    /// scenario or an error, never a panic.
    #[test]
    fn parsers_never_panic(text in "\\PC{0,200}") {
        let _ = parse_rate(&text);
        let _ = parse_duration(&text);
        let _ = plan(&text);
    }

    /// Generator tables with arbitrary numbers plan or are refused, and what plans renders.
    #[test]
    fn generators_with_any_numbers_render_or_are_refused(
        start in proptest::prop_oneof![-1e6f64..1e6, proptest::num::f64::ANY],
        step in proptest::prop_oneof![
            0.0f64..10.0,
            proptest::strategy::Just(f64::MAX),
            proptest::strategy::Just(-1.0),
            proptest::num::f64::ANY,
        ],
        min in -1e6f64..1e6,
        max in -1e6f64..1e6,
        kind in 0..4usize,
    ) {
        let arg = json!({ "start": start, "step": step, "min": min, "max": max });
        let body = match kind {
            0 => json!({ "v": { "$drift": arg } }),
            1 => json!({ "v": { "$counter": { "start": start, "step": step } } }),
            2 => json!({ "v": { "$random": { "min": min, "max": max } } }),
            _ => json!({ "v": { "$choice": [start, step] } }),
        };
        if let Ok(t) = Template::compile(&body, "body") {
            let mut state = t.state();
            let mut rng = rand::thread_rng();
            for _ in 0..3 {
                let _ = t.render("d", &mut state, &mut rng);
            }
        }
    }
}

#[test]
fn every_shipped_scenario_plans() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/scenarios");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml")
            && !path.to_string_lossy().ends_with("-hub.toml")
        {
            Scenario::load(&path)
                .and_then(|s| s.plan(&Overrides::default()))
                .unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
            n += 1;
        }
    }
    assert!(n >= 4, "expected the four shipped scenarios, found {n}");
}
