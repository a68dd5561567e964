//! Routes: `FROM <source> [WHERE <condition>] INTO <sink>`, as IoT Edge's edgeHub writes them.
//!
//! A route's text is parsed once into a [`Route`]; a whole set is built into a
//! [`RouteTable`] only if every route in it is valid, with every error reported (route name,
//! column, what was expected). Keywords are case-insensitive; sources and sink paths are not.

use std::fmt;

use crate::condition::lexer::{self, Spanned, Tok};
use crate::condition::{Condition, ParseError};

/// Where a route takes messages from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// `/*`: every message and twin change notification.
    All,
    /// `/messages/*`: device and module telemetry.
    Messages,
    /// `/messages/modules/*`: output of any of the hub's modules.
    AnyModule,
    /// `/messages/modules/{m}/*`
    Module(String),
    /// `/messages/modules/{m}/outputs/*`
    ModuleOutputs(String),
    /// `/messages/modules/{m}/outputs/{o}`
    ModuleOutput(String, String),
    /// `/twinChangeNotifications`
    TwinChangeNotifications,
}

/// Where a matched message goes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Sink {
    /// `$upstream`
    Upstream,
    /// `BrokeredEndpoint("/modules/{module}/inputs/{input}")`
    ModuleInput { module: String, input: String },
}

impl fmt::Display for Sink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Sink::Upstream => f.write_str("$upstream"),
            Sink::ModuleInput { module, input } => write!(f, "/modules/{module}/inputs/{input}"),
        }
    }
}

/// What the router knows about a message's origin, to match sources.
#[derive(Debug, Clone, Copy)]
pub struct Origin<'a> {
    /// The module, when the sender is one of the hub's own modules; messages from other
    /// devices' modules count as device telemetry.
    pub hub_module: Option<&'a str>,
    pub output: Option<&'a str>,
    pub twin_change: bool,
}

impl Source {
    pub fn matches(&self, o: &Origin<'_>) -> bool {
        match self {
            Source::All => true,
            Source::TwinChangeNotifications => o.twin_change,
            _ if o.twin_change => false,
            Source::Messages => true,
            Source::AnyModule => o.hub_module.is_some(),
            Source::Module(m) => o.hub_module == Some(m.as_str()),
            Source::ModuleOutputs(m) => o.hub_module == Some(m.as_str()) && o.output.is_some(),
            Source::ModuleOutput(m, out) => {
                o.hub_module == Some(m.as_str()) && o.output == Some(out.as_str())
            }
        }
    }

    fn parse(text: &str) -> Option<Source> {
        let name_ok = |s: &str| {
            !s.is_empty()
                && !s.contains(['/', '*', '#', '+'])
                && !s.chars().any(char::is_whitespace)
        };
        Some(match text {
            "/*" => Source::All,
            "/messages/*" => Source::Messages,
            "/messages/modules/*" => Source::AnyModule,
            "/twinChangeNotifications" => Source::TwinChangeNotifications,
            _ => {
                let rest = text.strip_prefix("/messages/modules/")?;
                let (module, rest) = rest.split_once('/')?;
                if !name_ok(module) {
                    return None;
                }
                match rest {
                    "*" => Source::Module(module.into()),
                    "outputs/*" => Source::ModuleOutputs(module.into()),
                    _ => {
                        let output = rest.strip_prefix("outputs/")?;
                        if !name_ok(output) {
                            return None;
                        }
                        Source::ModuleOutput(module.into(), output.into())
                    }
                }
            }
        })
    }
}

/// One parsed route.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub source: Source,
    pub condition: Option<Condition>,
    pub sink: Sink,
}

fn is_kw(t: &Spanned, kw: &str) -> bool {
    matches!(&t.tok, Tok::Ident(s) if s.eq_ignore_ascii_case(kw))
}

impl Route {
    pub fn parse(text: &str) -> Result<Route, ParseError> {
        let tokens = lexer::lex(text)?;
        let end_column = tokens.last().map(|t| t.column).unwrap_or(1);
        let first = &tokens[0];
        if !is_kw(first, "FROM") {
            return Err(ParseError::new(first.column, "FROM", &first.tok.describe()));
        }
        // The source runs up to the first WHERE or INTO that starts a new word.
        let chars: Vec<char> = text.chars().collect();
        let word_start = |t: &Spanned| {
            t.column >= 2 && chars.get(t.column - 2).is_some_and(|c| c.is_whitespace())
        };
        let keyword_at = tokens
            .iter()
            .enumerate()
            .skip(1)
            .find(|(_, t)| (is_kw(t, "WHERE") || is_kw(t, "INTO")) && word_start(t))
            .map(|(i, _)| i);
        let source_start = tokens.get(1).map(|t| t.column).unwrap_or(end_column);
        let source_end = keyword_at.map(|i| tokens[i].column).unwrap_or(end_column);
        let source_text: String = chars
            [(source_start - 1).min(chars.len())..(source_end - 1).min(chars.len())]
            .iter()
            .collect::<String>()
            .trim()
            .to_string();
        if source_text.is_empty() {
            return Err(ParseError::new(
                source_start,
                "a source such as /messages/*",
                &tokens[1].tok.describe(),
            ));
        }
        let source = Source::parse(&source_text).ok_or_else(|| {
            ParseError::new(
                source_start,
                "a source (/*, /messages/*, /messages/modules/*, /messages/modules/{m}/*, /messages/modules/{m}/outputs/*, /messages/modules/{m}/outputs/{o} or /twinChangeNotifications)",
                &format!("'{source_text}'"),
            )
        })?;
        let Some(k) = keyword_at else {
            return Err(ParseError::new(end_column, "WHERE or INTO", "end of input"));
        };

        let (condition, into_at) = if is_kw(&tokens[k], "WHERE") {
            // The condition ends at the first INTO outside parentheses and brackets.
            let mut depth = 0i32;
            let mut into = None;
            for (i, t) in tokens.iter().enumerate().skip(k + 1) {
                match t.tok {
                    Tok::LParen | Tok::LBracket => depth += 1,
                    Tok::RParen | Tok::RBracket => depth -= 1,
                    _ if depth == 0 && is_kw(t, "INTO") => {
                        into = Some(i);
                        break;
                    }
                    _ => {}
                }
            }
            let stop = into.unwrap_or(tokens.len() - 1);
            let mut cond_tokens: Vec<Spanned> = tokens[k + 1..stop].to_vec();
            cond_tokens.push(Spanned {
                tok: Tok::End,
                column: tokens[stop].column,
            });
            let cond_text: String = {
                let from = tokens
                    .get(k + 1)
                    .map(|t| t.column - 1)
                    .unwrap_or(chars.len());
                let to = tokens[stop].column - 1;
                chars[from.min(to)..to]
                    .iter()
                    .collect::<String>()
                    .trim()
                    .to_string()
            };
            let condition = Condition::from_tokens(cond_tokens, &cond_text).map_err(|mut e| {
                if e.expected == "an operator or end of input" {
                    // A complete condition followed by something else: INTO was due there.
                    e.expected = if into.is_none() {
                        "INTO".into()
                    } else {
                        "an operator or INTO".into()
                    };
                } else if e.column == tokens[stop].column && e.found == "end of input" {
                    e.found = match into {
                        Some(_) => "INTO".into(),
                        None => "end of input".into(),
                    };
                }
                e
            })?;
            let Some(into) = into else {
                return Err(ParseError::new(end_column, "INTO", "end of input"));
            };
            (Some(condition), into)
        } else {
            (None, k)
        };

        let sink = parse_sink(&tokens[into_at + 1..])?;
        Ok(Route {
            source,
            condition,
            sink,
        })
    }
}

fn parse_sink(tokens: &[Spanned]) -> Result<Sink, ParseError> {
    let expected = "a sink: $upstream or BrokeredEndpoint(\"/modules/{m}/inputs/{i}\")";
    let first = &tokens[0];
    let sink = if is_kw(first, "$upstream") {
        Sink::Upstream
    } else if is_kw(first, "BrokeredEndpoint") {
        match (
            tokens.get(1).map(|t| &t.tok),
            tokens.get(2),
            tokens.get(3).map(|t| &t.tok),
        ) {
            (
                Some(Tok::LParen),
                Some(Spanned {
                    tok: Tok::Str(path),
                    column,
                }),
                Some(Tok::RParen),
            ) => {
                let parsed = path
                    .strip_prefix("/modules/")
                    .and_then(|r| r.split_once("/inputs/"))
                    .filter(|(m, i)| {
                        let ok = |s: &str| !s.is_empty() && !s.contains(['/', '*', '#', '+']);
                        ok(m) && ok(i)
                    });
                match parsed {
                    Some((m, i)) => Sink::ModuleInput {
                        module: m.to_string(),
                        input: i.to_string(),
                    },
                    None => {
                        return Err(ParseError::new(
                            *column,
                            "an endpoint \"/modules/{m}/inputs/{i}\"",
                            &format!("'{path}'"),
                        ));
                    }
                }
            }
            _ => {
                let at = tokens.get(1).unwrap_or(first);
                return Err(ParseError::new(
                    at.column,
                    "(\"/modules/{m}/inputs/{i}\")",
                    &at.tok.describe(),
                ));
            }
        }
    } else {
        return Err(ParseError::new(
            first.column,
            expected,
            &first.tok.describe(),
        ));
    };
    let used = if sink == Sink::Upstream { 1 } else { 4 };
    match tokens.get(used) {
        Some(t) if t.tok != Tok::End => {
            Err(ParseError::new(t.column, "end of route", &t.tok.describe()))
        }
        _ => Ok(sink),
    }
}

/// A route as configured: its name, text, priority and time to live, and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteSpec {
    pub name: String,
    pub text: String,
    /// 0 highest … 9 lowest.
    pub priority: u8,
    /// Per-route time to live; `None` falls back to the hub-wide setting.
    pub ttl_secs: Option<u64>,
    /// `config`, `$edgeHub`, … — shown by `fleethub route list`.
    pub origin: String,
}

/// A route ready to run.
#[derive(Debug, Clone)]
pub struct CompiledRoute {
    pub spec: RouteSpec,
    pub route: Route,
}

/// One invalid route in a set.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("route '{name}' ({origin}): {message}")]
pub struct RouteError {
    pub name: String,
    pub origin: String,
    pub message: String,
    /// Column of the problem in the route text, when it is a parse error.
    pub column: Option<usize>,
}

/// The routes in force, in a stable order (priority, then name).
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    pub routes: Vec<CompiledRoute>,
    /// `storeAndForwardConfiguration.timeToLiveSecs`.
    pub default_ttl_secs: u64,
}

impl RouteTable {
    /// Builds a table only if every route is valid; otherwise returns every error.
    pub fn build(
        specs: Vec<RouteSpec>,
        default_ttl_secs: u64,
    ) -> Result<RouteTable, Vec<RouteError>> {
        let mut errors = Vec::new();
        let mut routes = Vec::new();
        for spec in specs {
            let err = |message: String, column: Option<usize>| RouteError {
                name: spec.name.clone(),
                origin: spec.origin.clone(),
                message,
                column,
            };
            if spec.priority > 9 {
                errors.push(err(
                    format!("priority {} is out of range 0..9", spec.priority),
                    None,
                ));
                continue;
            }
            match Route::parse(&spec.text) {
                Ok(route) => routes.push(CompiledRoute { spec, route }),
                Err(e) => errors.push(err(e.to_string(), Some(e.column))),
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        routes
            .sort_by(|a, b| (a.spec.priority, &a.spec.name).cmp(&(b.spec.priority, &b.spec.name)));
        Ok(RouteTable {
            routes,
            default_ttl_secs,
        })
    }
}

#[cfg(test)]
mod tests;
