//! The condition language of twin queries and deployment target conditions: the IoT Hub query
//! language's expressions. (Route `WHERE` clauses are edgeHub's language: see `route`.)
//!
//! A condition is parsed once into an [`Expr`] ([`Condition::parse`]), with errors that say
//! where and what was expected (`expected ')' at column 27, found 'AND'`). Evaluation is
//! three-valued: a reference that does not resolve is *undefined*, any comparison or
//! arithmetic with an undefined operand is undefined, and a condition matches only when it
//! evaluates to `true`. Comparisons between different types are undefined too (as in IoT
//! Hub and Cosmos DB), so `properties.reported.fw >= 2` never matches a string `fw`.
//!
//! References are dotted paths (`tags.location.region`, `$body.a.b[0]`,
//! `$connectionDeviceId`); what they resolve to is up to the caller's [`Resolve`].

mod eval;
pub(crate) mod lexer;
mod parser;
pub mod query;

use serde_json::Value;

pub use eval::Resolve;
pub use parser::{ArithOp, CmpOp, Expr, Func, Segment, MAX_DEPTH};

/// Where a condition stopped making sense, and what would have.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("expected {expected} at column {column}, found {found}")]
pub struct ParseError {
    /// 1-based, in characters.
    pub column: usize,
    pub expected: String,
    pub found: String,
}

impl ParseError {
    pub(crate) fn new(column: usize, expected: &str, found: &str) -> Self {
        ParseError {
            column,
            expected: expected.to_string(),
            found: found.to_string(),
        }
    }
}

/// A parsed, checked boolean condition.
#[derive(Debug, Clone, PartialEq)]
pub struct Condition {
    expr: Expr,
    source: String,
}

impl Condition {
    pub fn parse(src: &str) -> Result<Condition, ParseError> {
        let tokens = lexer::lex(src)?;
        let mut p = parser::Parser::new(tokens);
        let expr = p.expression()?;
        p.expect_end()?;
        Ok(Condition {
            expr,
            source: src.to_string(),
        })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn expr(&self) -> &Expr {
        &self.expr
    }

    /// The value of the condition (`None`: undefined).
    pub fn evaluate(&self, ctx: &dyn Resolve) -> Option<Value> {
        eval::eval(&self.expr, ctx)
    }

    /// True only when the condition evaluates to boolean `true`.
    pub fn matches(&self, ctx: &dyn Resolve) -> bool {
        matches!(self.evaluate(ctx), Some(Value::Bool(true)))
    }
}

/// Resolves references against one JSON document: `a.b[0]` walks the document.
pub struct JsonDoc<'a>(pub &'a Value);

impl Resolve for JsonDoc<'_> {
    fn resolve(&self, path: &[Segment]) -> Option<Value> {
        walk(self.0, path).cloned()
    }
}

/// Walks `path` into `value`.
pub fn walk<'v>(mut value: &'v Value, path: &[Segment]) -> Option<&'v Value> {
    for seg in path {
        value = match (seg, value) {
            (Segment::Key(k), Value::Object(map)) => map.get(k)?,
            (Segment::Index(i), Value::Array(items)) => items.get(*i)?,
            _ => return None,
        };
    }
    Some(value)
}

#[cfg(test)]
mod tests;
