//! Twin queries: `SELECT * | SELECT COUNT() [AS n] | SELECT field, … FROM devices |
//! devices.modules [WHERE …]`. Field lists (`SELECT deviceId`) are what IoT Hub's
//! deployment metric queries use.

use serde_json::Value;

use super::lexer::{self, Tok};
use super::parser::{Expr, Parser};
use super::{eval, JsonDoc, ParseError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Projection {
    All,
    Count {
        alias: String,
    },
    /// Top-level fields such as `deviceId`, `moduleId`.
    Fields(Vec<String>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Collection {
    Devices,
    Modules,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Query {
    pub projection: Projection,
    pub from: Collection,
    filter: Option<Expr>,
}

impl Query {
    pub fn parse(src: &str) -> Result<Query, ParseError> {
        let mut p = Parser::new(lexer::lex(src)?);
        p.expect_keyword("SELECT")?;
        let projection = if p.peek().tok == Tok::Star {
            p.next();
            Projection::All
        } else if p.keyword("COUNT") {
            p.expect(Tok::LParen)?;
            p.expect(Tok::RParen)?;
            let alias = if p.keyword("AS") {
                match p.next().tok {
                    Tok::Ident(a) => a,
                    _ => return Err(p.error("an alias name after AS")),
                }
            } else {
                "numberOfDevices".to_string()
            };
            Projection::Count { alias }
        } else if let Tok::Ident(first) = p.peek().tok.clone() {
            p.next();
            let mut fields = vec![first];
            while p.peek().tok == Tok::Comma {
                p.next();
                match p.next().tok {
                    Tok::Ident(f) => fields.push(f),
                    _ => return Err(p.error("a field name after ','")),
                }
            }
            Projection::Fields(fields)
        } else {
            return Err(p.error("'*', COUNT() or field names"));
        };
        p.expect_keyword("FROM")?;
        p.expect_keyword("devices")?;
        let from = if p.peek().tok == Tok::Dot {
            p.next();
            p.expect_keyword("modules")?;
            Collection::Modules
        } else {
            Collection::Devices
        };
        let filter = if p.keyword("WHERE") {
            Some(p.expression()?)
        } else {
            None
        };
        p.expect_end()?;
        Ok(Query {
            projection,
            from,
            filter,
        })
    }

    /// Whether the twin behind `ctx` satisfies the WHERE clause.
    pub fn matches_with(&self, ctx: &dyn eval::Resolve) -> bool {
        match &self.filter {
            None => true,
            Some(e) => matches!(eval::eval(e, ctx), Some(Value::Bool(true))),
        }
    }

    /// Whether a twin document (the JSON the API shows) satisfies the WHERE clause.
    pub fn matches(&self, twin: &Value) -> bool {
        match &self.filter {
            None => true,
            Some(e) => matches!(eval::eval(e, &JsonDoc(twin)), Some(Value::Bool(true))),
        }
    }
}
