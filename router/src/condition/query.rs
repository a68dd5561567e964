//! Twin queries, as IoT Hub's query language writes them: `SELECT * | COUNT() [AS n] | path
//! [AS name], … FROM devices | devices.modules [WHERE …] [GROUP BY path, …]`. Field lists
//! (`SELECT deviceId`) are what IoT Hub's deployment metric queries use; `GROUP BY` with
//! `COUNT()` is how fleets are summarised (`SELECT properties.reported.fw AS fw, COUNT() AS n
//! FROM devices GROUP BY properties.reported.fw`).

use serde_json::Value;

use super::lexer::{self, Tok};
use super::parser::{Expr, Parser, Segment};
use super::{eval, JsonDoc, ParseError};

/// A dotted path (`tags.location.region`) as projections and `GROUP BY` write them.
fn path(p: &mut Parser, what: &str) -> Result<Vec<Segment>, ParseError> {
    let mut path = match p.next().tok {
        Tok::Ident(name) => vec![Segment::Key(name)],
        _ => return Err(p.error(what)),
    };
    while p.peek().tok == Tok::Dot {
        p.next();
        match p.next().tok {
            Tok::Ident(name) => path.push(Segment::Key(name)),
            _ => return Err(p.error("a name after '.'")),
        }
    }
    Ok(path)
}

fn alias(p: &mut Parser, default: String) -> Result<String, ParseError> {
    if !p.keyword("AS") {
        return Ok(default);
    }
    match p.next().tok {
        Tok::Ident(a) => Ok(a),
        _ => Err(p.error("an alias name after AS")),
    }
}

fn last_name(path: &[Segment]) -> String {
    match path.last() {
        Some(Segment::Key(k)) => k.clone(),
        _ => "value".into(),
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Projection {
    All,
    /// `SELECT COUNT() [AS n]` alone: one row with the number of matches.
    Count {
        alias: String,
    },
    /// `SELECT path [AS name], …` with at most one `COUNT() [AS n]` when grouped.
    Items(Vec<Item>),
}

/// One column of a projection.
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    /// A path into the twin (`deviceId`, `properties.reported.fw`), shown under `alias`
    /// (its last name unless `AS` says otherwise).
    Field {
        path: Vec<Segment>,
        alias: String,
    },
    Count {
        alias: String,
    },
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
    /// `GROUP BY` paths: one row per distinct combination, with its `COUNT()`.
    pub group_by: Vec<Vec<Segment>>,
}

impl Query {
    pub fn parse(src: &str) -> Result<Query, ParseError> {
        let mut p = Parser::new(lexer::lex(src)?);
        p.expect_keyword("SELECT")?;
        let projection = if p.peek().tok == Tok::Star {
            p.next();
            Projection::All
        } else {
            let mut items = Vec::new();
            loop {
                if p.keyword("COUNT") {
                    p.expect(Tok::LParen)?;
                    p.expect(Tok::RParen)?;
                    items.push(Item::Count {
                        alias: alias(&mut p, "numberOfDevices".into())?,
                    });
                } else {
                    let path = path(&mut p, "'*', COUNT() or field names")?;
                    let alias = alias(&mut p, last_name(&path))?;
                    items.push(Item::Field { path, alias });
                }
                if p.peek().tok != Tok::Comma {
                    break;
                }
                p.next();
            }
            match items.as_slice() {
                [Item::Count { alias }] => Projection::Count {
                    alias: alias.clone(),
                },
                _ => Projection::Items(items),
            }
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
        let mut group_by = Vec::new();
        if p.keyword("GROUP") {
            p.expect_keyword("BY")?;
            loop {
                group_by.push(path(&mut p, "a field name to group by")?);
                if p.peek().tok != Tok::Comma {
                    break;
                }
                p.next();
            }
        }
        p.expect_end()?;
        // As in IoT Hub: a grouped query selects its group fields and COUNT(); an ungrouped
        // one counts alone or selects fields alone.
        if let Projection::Items(items) = &projection {
            let counts = items.iter().any(|i| matches!(i, Item::Count { .. }));
            for item in items {
                if let Item::Field { path, .. } = item {
                    if counts && !group_by.contains(path) {
                        return Err(ParseError::new(
                            1,
                            "only GROUP BY fields beside COUNT()",
                            &format!("'{}'", path_text(path)),
                        ));
                    }
                }
            }
        }
        if !group_by.is_empty() && matches!(projection, Projection::All) {
            return Err(ParseError::new(
                1,
                "GROUP BY fields and COUNT() in SELECT",
                "'*'",
            ));
        }
        Ok(Query {
            projection,
            from,
            filter,
            group_by,
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

/// A path as written.
pub fn path_text(path: &[Segment]) -> String {
    path.iter()
        .map(|s| match s {
            Segment::Key(k) => k.clone(),
            Segment::Index(i) => i.to_string(),
        })
        .collect::<Vec<_>>()
        .join(".")
}
