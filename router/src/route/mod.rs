//! Routes: `[SELECT *] FROM <source> [WHERE <condition>] INTO <sink>`, as IoT Edge's edgeHub
//! writes them, meaning what they mean in edgeHub.
//!
//! A route's text is parsed and its condition type-checked once, into a [`Route`]; a whole set
//! is built into a [`RouteTable`] only if every route in it is valid, with every error
//! reported (route name, column, what was expected). The language is edgeHub's, cut into
//! tokens as its lexer cuts them ([`lexer`]), parsed with its precedence ([`parser`]),
//! type-checked as its compiler checks ([`compile`]) and evaluated with its semantics
//! ([`eval`]); `tests/conformance/` holds the rows that show it.

use std::fmt;

use crate::condition::ParseError;
use crate::context::MessageContext;

pub mod builtins;
pub mod compile;
pub mod eval;
pub mod lexer;
pub mod parser;

use lexer::Tok;

pub use eval::Truth;

/// Where a route takes messages from: a path matched, as edgeHub matches it, as a
/// case-insensitive prefix of the message's source (`/messages` for device telemetry,
/// `/messages/modules/{m}/outputs/{o}` for a hub module's output, `/messages/modules/{m}`
/// without one, `/twinChangeNotifications`) after trailing `*` are cut. Any path parses;
/// one that no source starts with simply never matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// As written.
    pub path: String,
    /// Lower case, `*` cut from the end, one trailing `/`.
    prefix: String,
}

impl Source {
    pub fn new(path: &str) -> Source {
        let cut = path.trim().trim_end_matches('*').trim_end_matches('/');
        Source {
            path: path.to_string(),
            prefix: format!("{}/", cut.to_ascii_lowercase()),
        }
    }

    pub fn matches(&self, o: &Origin<'_>) -> bool {
        // The origin's path, piece by piece, with a trailing '/', compared case-insensitively.
        let mut rest = self.prefix.as_str();
        let mut consume = |piece: &str| -> bool {
            if rest.is_empty() {
                return true;
            }
            let n = piece.len().min(rest.len());
            let (head, tail) = rest.split_at(n);
            if !piece.is_char_boundary(n) || !piece[..n].eq_ignore_ascii_case(head) {
                return false;
            }
            rest = tail;
            true
        };
        let pieces: [&str; 5] = if o.twin_change {
            ["/twinChangeNotifications/", "", "", "", ""]
        } else {
            match (o.hub_module, o.output) {
                (Some(m), Some(out)) => ["/messages/modules/", m, "/outputs/", out, "/"],
                (Some(m), None) => ["/messages/modules/", m, "/", "", ""],
                (None, _) => ["/messages/", "", "", "", ""],
            }
        };
        pieces.iter().all(|p| consume(p)) && rest.is_empty()
    }

    /// Whether twin change notifications can come from this source.
    fn twin_changes(&self) -> bool {
        "/twinchangenotifications/".starts_with(&self.prefix)
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.path)
    }
}

/// Where a matched message goes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Sink {
    /// `$upstream`
    Upstream,
    /// `$events`: the hub's built-in events endpoint (a retained log its consumer groups
    /// read), as IoT Hub's routes name "events". Not edgeHub syntax; edgeHub routes never
    /// meet it.
    Events,
    /// `Endpoint("name")`: a custom endpoint configured in `[endpoints.name]` (IoT Hub's
    /// custom endpoints). Not edgeHub syntax either.
    Endpoint(String),
    /// `BrokeredEndpoint("/modules/{module}/inputs/{input}")`
    ModuleInput { module: String, input: String },
}

impl fmt::Display for Sink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Sink::Upstream => f.write_str("$upstream"),
            Sink::Events => f.write_str("$events"),
            Sink::Endpoint(name) => write!(f, "Endpoint(\"{name}\")"),
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

/// A route's condition, checked: evaluate it against a message.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteCondition {
    source: String,
    node: compile::Node,
    ty: compile::Ty,
}

impl RouteCondition {
    /// Parses and checks a condition on its own (as after `WHERE`), for a route from
    /// `/messages/*`.
    pub fn parse(text: &str) -> Result<RouteCondition, ParseError> {
        Self::parse_for(text, &Source::new("/messages/*"))
    }

    fn parse_for(text: &str, source: &Source) -> Result<RouteCondition, ParseError> {
        let chars: Vec<char> = text.chars().collect();
        let mut p = parser::Parser::new(lexer::lex(text)?, &chars);
        let ast = p.condition()?;
        if p.peek().tok != Tok::End {
            return Err(p.error("an operator or end of input"));
        }
        Self::checked(ast, text.trim(), source)
    }

    fn checked(
        ast: parser::Ast,
        text: &str,
        source: &Source,
    ) -> Result<RouteCondition, ParseError> {
        let scope = compile::Scope {
            twin_changes: source.twin_changes(),
        };
        let (node, ty) = compile::compile(&ast, &scope)?;
        Ok(RouteCondition {
            source: text.to_string(),
            node,
            ty,
        })
    }

    /// The condition as written.
    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn evaluate(&self, ctx: &MessageContext<'_>) -> Truth {
        eval::truth(self.ty, &eval::eval(&self.node, ctx))
    }

    pub fn matches(&self, ctx: &MessageContext<'_>) -> bool {
        self.evaluate(ctx) == Truth::True
    }
}

/// One parsed route.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub source: Source,
    pub condition: Option<RouteCondition>,
    pub sink: Sink,
}

impl Route {
    pub fn parse(text: &str) -> Result<Route, ParseError> {
        let chars: Vec<char> = text.chars().collect();
        let mut p = parser::Parser::new(lexer::lex(text)?, &chars);
        if p.eat(&Tok::Select) && !p.eat(&Tok::Star) {
            return Err(p.error("'*' after SELECT"));
        }
        if !p.eat(&Tok::From) {
            return Err(p.error("FROM"));
        }
        let source = Source::new(&p.path()?);
        let condition = if p.eat(&Tok::Where) {
            let start = p.peek().column;
            let ast = p.condition()?;
            if p.peek().tok != Tok::Into {
                return Err(p.error(if p.peek().tok == Tok::End {
                    "INTO"
                } else {
                    "an operator or INTO"
                }));
            }
            let end = p.peek().column;
            let text: String = chars[start - 1..end - 1].iter().collect();
            Some(RouteCondition::checked(ast, text.trim(), &source)?)
        } else {
            None
        };
        if !p.eat(&Tok::Into) {
            return Err(p.error("WHERE or INTO"));
        }
        let sink = parse_sink(&mut p)?;
        if p.peek().tok != Tok::End {
            return Err(p.error("end of route"));
        }
        Ok(Route {
            source,
            condition,
            sink,
        })
    }
}

/// `$upstream`, `$events` or `BrokeredEndpoint("/modules/{m}/inputs/{i}")` (names in any
/// case).
fn parse_sink(p: &mut parser::Parser<'_>) -> Result<Sink, ParseError> {
    let expected = "a sink: $upstream, $events, Endpoint(\"name\") or BrokeredEndpoint(\"/modules/{m}/inputs/{i}\")";
    match p.peek().tok.clone() {
        Tok::SysProp(name) if name.eq_ignore_ascii_case("$upstream") => {
            p.advance();
            Ok(Sink::Upstream)
        }
        Tok::SysProp(name) if name.eq_ignore_ascii_case("$events") => {
            p.advance();
            Ok(Sink::Events)
        }
        Tok::Id(name) if name.eq_ignore_ascii_case("Endpoint") => {
            p.advance();
            if !p.eat(&Tok::LParen) {
                return Err(p.error("(\"name\")"));
            }
            let at = p.peek().clone();
            let Tok::Str(endpoint) = at.tok else {
                return Err(p.error("(\"name\")"));
            };
            p.advance();
            if !p.eat(&Tok::RParen) {
                return Err(p.error("')'"));
            }
            let ok = !endpoint.is_empty()
                && endpoint
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_".contains(c));
            if !ok {
                return Err(ParseError::new(
                    at.column,
                    "an endpoint name (letters, digits, '-', '_')",
                    &format!("'{endpoint}'"),
                ));
            }
            Ok(Sink::Endpoint(endpoint))
        }
        Tok::Id(name) if name.eq_ignore_ascii_case("BrokeredEndpoint") => {
            p.advance();
            if !p.eat(&Tok::LParen) {
                return Err(p.error("(\"/modules/{m}/inputs/{i}\")"));
            }
            let at = p.peek().clone();
            let Tok::Str(path) = at.tok else {
                return Err(p.error("(\"/modules/{m}/inputs/{i}\")"));
            };
            p.advance();
            if !p.eat(&Tok::RParen) {
                return Err(p.error("')'"));
            }
            let parsed = path
                .strip_prefix("/modules/")
                .and_then(|r| r.split_once("/inputs/"))
                .filter(|(m, i)| {
                    let ok = |s: &str| !s.is_empty() && !s.contains(['/', '*', '#', '+']);
                    ok(m) && ok(i)
                });
            match parsed {
                Some((m, i)) => Ok(Sink::ModuleInput {
                    module: m.to_string(),
                    input: i.to_string(),
                }),
                None => Err(ParseError::new(
                    at.column,
                    "an endpoint \"/modules/{m}/inputs/{i}\"",
                    &format!("'{path}'"),
                )),
            }
        }
        _ => Err(p.error(expected)),
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
