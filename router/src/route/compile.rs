//! Type checking a route condition, as edgeHub's route compiler does: every operand and
//! argument has a type known before any message arrives (application and system properties
//! are strings, literals are what they say, `$body` queries are whatever the body holds), and
//! an operator or function given the wrong types is refused when the route is installed,
//! with the place and the types. `length(12.34) = 'hello'` or `none OR true` is a typo caught
//! at deployment time, not a route that silently never matches.

use super::builtins::{Builtin, Signature};
use super::parser::{Ast, BinOp};
use crate::condition::ParseError;

/// A value's type as the compiler knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ty {
    Number,
    String,
    Bool,
    Null,
    Undefined,
    /// A `$body` query: its type is the body's, known per message.
    Body,
}

impl Ty {
    pub fn name(self) -> &'static str {
        match self {
            Ty::Number => "number",
            Ty::String => "string",
            Ty::Bool => "bool",
            Ty::Null => "null",
            Ty::Undefined => "undefined",
            Ty::Body => "$body value",
        }
    }

    /// `given` is acceptable where `self` is required: the same type, or a `$body` value
    /// standing for any of the concrete ones (checked again per message).
    pub fn accepts(self, given: Ty) -> bool {
        let concrete = |t: Ty| matches!(t, Ty::Number | Ty::String | Ty::Bool | Ty::Null);
        self == given
            || (given == Ty::Body && concrete(self))
            || (self == Ty::Body && concrete(given))
    }
}

/// A path into the body: names and array indexes.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    Key(String),
    Index(usize),
}

/// What `$name` falls back to when no application property has that exact name.
#[derive(Debug, Clone, PartialEq)]
pub enum Fallback {
    Body(Vec<Step>),
    System(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arith {
    Add,
    Sub,
    Mul,
    Div,
    Rem,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

/// A checked condition: every node knows the type family its operator works in.
#[derive(Debug, Clone, PartialEq)]
pub enum Node {
    Number(f64),
    Str(String),
    Bool(bool),
    Null,
    Undefined,
    /// An application property, by name in any case.
    Property(String),
    /// `$name`: the application property of that exact name if the message has one, else
    /// the fallback.
    Dollar {
        name: String,
        fallback: Fallback,
    },
    Body(Vec<Step>),
    System(String),
    Call(Builtin, Vec<Node>),
    /// `twin_change_includes(path)`: whether a twin change notification's body has `path`.
    TwinChangeIncludes(Vec<Step>),
    Neg(Box<Node>, Ty),
    Not(Box<Node>, Ty),
    Arith(Arith, Box<Node>, Box<Node>, Ty),
    Concat(Box<Node>, Box<Node>),
    Cmp(Cmp, Box<Node>, Box<Node>, Ty),
    /// `AND`: the operand types decide null and `$body` handling.
    And(Box<Node>, Box<Node>, Ty, Ty),
    Or(Box<Node>, Box<Node>, Ty, Ty),
    Coalesce(Box<Node>, Box<Node>, Ty),
}

/// What a route's source tells the compiler (`twin_change_includes` needs twin changes).
pub struct Scope {
    pub twin_changes: bool,
}

fn operand_error(column: usize, what: &str, given: &[Ty]) -> ParseError {
    let found = given
        .iter()
        .map(|t| t.name())
        .collect::<Vec<_>>()
        .join(" and ");
    ParseError::new(column, what, &found)
}

/// Checks `ast` and returns its typed form and type.
pub fn compile(ast: &Ast, scope: &Scope) -> Result<(Node, Ty), ParseError> {
    Ok(match ast {
        Ast::Number(n) => (Node::Number(*n), Ty::Number),
        Ast::Str(s) => (Node::Str(s.clone()), Ty::String),
        Ast::Bool(b) => (Node::Bool(*b), Ty::Bool),
        Ast::Null => (Node::Null, Ty::Null),
        Ast::Undefined => (Node::Undefined, Ty::Undefined),
        Ast::Property(name) => (Node::Property(name.clone()), Ty::String),
        Ast::Dollar { text, column } => dollar(text, *column, false)?,
        Ast::Escaped { text, column } => dollar(text, *column, true)?,
        Ast::Call {
            name,
            args,
            raw_args,
            column,
        } => {
            if name.eq_ignore_ascii_case("twin_change_includes") {
                if !scope.twin_changes {
                    return Err(ParseError::new(
                        *column,
                        "twin_change_includes only in a route FROM /twinChangeNotifications",
                        &format!("'{name}'"),
                    ));
                }
                let path = twin_path(raw_args.trim()).ok_or_else(|| {
                    ParseError::new(
                        *column,
                        "a twin path such as properties.reported.name or tags.name",
                        &format!("'{}'", raw_args.trim()),
                    )
                })?;
                return Ok((Node::TwinChangeIncludes(path), Ty::Bool));
            }
            let builtin = Builtin::by_name(name).ok_or_else(|| {
                ParseError::new(*column, "a known function", &format!("'{name}'"))
            })?;
            let mut nodes = Vec::with_capacity(args.len());
            let mut types = Vec::with_capacity(args.len());
            for a in args {
                let (n, t) = compile(a, scope)?;
                nodes.push(n);
                types.push(t);
            }
            let ty = builtin.check(&types).ok_or_else(|| {
                let found = format!(
                    "({})",
                    types
                        .iter()
                        .map(|t| t.name())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                ParseError::new(
                    *column,
                    &format!(
                        "{} arguments {}",
                        builtin.name(),
                        Signature::describe_all(builtin.signatures())
                    ),
                    &found,
                )
            })?;
            (Node::Call(builtin, nodes), ty)
        }
        Ast::Neg(inner, column) => {
            let (n, t) = compile(inner, scope)?;
            if !Ty::Number.accepts(t) {
                return Err(operand_error(*column, "a number after '-'", &[t]));
            }
            (
                Node::Neg(Box::new(n), t),
                if t == Ty::Body { Ty::Body } else { Ty::Number },
            )
        }
        Ast::Not(inner, column) => {
            let (n, t) = compile(inner, scope)?;
            // `NOT null` is allowed (it is true); otherwise a bool.
            if t != Ty::Null && !Ty::Bool.accepts(t) {
                return Err(operand_error(*column, "a bool after NOT", &[t]));
            }
            (Node::Not(Box::new(n), t), Ty::Bool)
        }
        Ast::Binary {
            op,
            left,
            right,
            column,
        } => {
            let (l, lt) = compile(left, scope)?;
            let (r, rt) = compile(right, scope)?;
            let body = lt == Ty::Body || rt == Ty::Body;
            let both = |want: Ty| want.accepts(lt) && want.accepts(rt);
            let expect = |what: &str| operand_error(*column, what, &[lt, rt]);
            let (l, r) = (Box::new(l), Box::new(r));
            match op {
                BinOp::Add | BinOp::Sub | BinOp::Mul | BinOp::Div | BinOp::Rem => {
                    if !both(Ty::Number) {
                        return Err(expect(&format!(
                            "numbers on both sides of '{}'",
                            op.symbol()
                        )));
                    }
                    let a = match op {
                        BinOp::Add => Arith::Add,
                        BinOp::Sub => Arith::Sub,
                        BinOp::Mul => Arith::Mul,
                        BinOp::Div => Arith::Div,
                        _ => Arith::Rem,
                    };
                    let family = if body { Ty::Body } else { Ty::Number };
                    (Node::Arith(a, l, r, family), family)
                }
                BinOp::Concat => {
                    if !both(Ty::String) {
                        return Err(expect("strings on both sides of '||'"));
                    }
                    (Node::Concat(l, r), Ty::String)
                }
                BinOp::Lt | BinOp::Le | BinOp::Gt | BinOp::Ge | BinOp::Eq | BinOp::Ne => {
                    if !lt.accepts(rt) {
                        return Err(expect(&format!(
                            "the same type on both sides of '{}'",
                            op.symbol()
                        )));
                    }
                    let c = match op {
                        BinOp::Lt => Cmp::Lt,
                        BinOp::Le => Cmp::Le,
                        BinOp::Gt => Cmp::Gt,
                        BinOp::Ge => Cmp::Ge,
                        BinOp::Eq => Cmp::Eq,
                        _ => Cmp::Ne,
                    };
                    (
                        Node::Cmp(c, l, r, if body { Ty::Body } else { lt }),
                        Ty::Bool,
                    )
                }
                BinOp::And | BinOp::Or => {
                    let logical =
                        |t: Ty| matches!(t, Ty::Null | Ty::Bool | Ty::Undefined | Ty::Body);
                    // As edgeHub checks it: a `$body` value on the left lets any right side
                    // through (evaluated as a `$body` value, so anything but a bool is
                    // undefined).
                    if !logical(lt) || !(logical(rt) || lt == Ty::Body) {
                        return Err(expect(&format!("bools on both sides of {}", op.symbol())));
                    }
                    let ty = match op {
                        _ if body => Ty::Bool,
                        BinOp::And if lt == Ty::Null || rt == Ty::Null => Ty::Null,
                        BinOp::Or if lt == Ty::Null && rt == Ty::Null => Ty::Null,
                        _ => Ty::Bool,
                    };
                    if *op == BinOp::And {
                        (Node::And(l, r, lt, rt), ty)
                    } else {
                        (Node::Or(l, r, lt, rt), ty)
                    }
                }
                BinOp::Coalesce => {
                    if !lt.accepts(rt) {
                        return Err(expect("the same type on both sides of '??'"));
                    }
                    let ty = if body { Ty::Body } else { lt };
                    (Node::Coalesce(l, r, lt), ty)
                }
            }
        }
    })
}

/// `$name` / `{$name}`: a `$body.` query (any case of `$body`), else a system property.
/// Unescaped, an application property of that exact name comes first, except for names
/// with brackets, which only a `$body` query can have.
fn dollar(text: &str, column: usize, escaped: bool) -> Result<(Node, Ty), ParseError> {
    let rest = text.get(6..).filter(|r| !r.is_empty());
    let is_body = rest.is_some()
        && text
            .get(..6)
            .is_some_and(|p| p.eq_ignore_ascii_case("$body."));
    let brackets = text.contains(['[', ']']);
    let fallback = if is_body {
        let query = rest.unwrap_or_default();
        let path = body_path(query).ok_or_else(|| {
            ParseError::new(
                column,
                "a $body path of names and [index] parts separated by '.'",
                &format!("'{text}'"),
            )
        })?;
        Fallback::Body(path)
    } else if brackets {
        return Ok((Node::Undefined, Ty::Undefined));
    } else {
        Fallback::System(text[1..].to_string())
    };
    let ty = match fallback {
        Fallback::Body(_) => Ty::Body,
        Fallback::System(_) => Ty::String,
    };
    if escaped || brackets {
        return Ok(match fallback {
            Fallback::Body(p) => (Node::Body(p), ty),
            Fallback::System(s) => (Node::System(s), ty),
        });
    }
    Ok((
        Node::Dollar {
            name: text.to_string(),
            fallback,
        },
        ty,
    ))
}

/// edgeHub's `$body` path subset: `name` or `name[int]`, separated by `.`; names without
/// `()<>@,;:\"/[]?={}.` or whitespace.
pub fn body_path(query: &str) -> Option<Vec<Step>> {
    let mut steps = Vec::new();
    for part in query.split('.') {
        let (name, index) = match part.split_once('[') {
            Some((name, rest)) => {
                let digits = rest.strip_suffix(']')?;
                if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_digit()) {
                    return None;
                }
                (name, Some(digits.parse::<usize>().ok()?))
            }
            None => (part, None),
        };
        let bad = |c: char| c.is_whitespace() || "()<>@,;:\\\"/[]?={}.".contains(c);
        if name.is_empty() || name.chars().any(bad) {
            return None;
        }
        steps.push(Step::Key(name.to_string()));
        if let Some(i) = index {
            steps.push(Step::Index(i));
        }
    }
    Some(steps)
}

/// A twin change path: `properties.desired…`, `properties.reported…` or `tags…`.
fn twin_path(text: &str) -> Option<Vec<Step>> {
    let steps = body_path(text)?;
    let key = |i: usize| match steps.get(i) {
        Some(Step::Key(k)) => Some(k.as_str()),
        _ => None,
    };
    let ok = match key(0)? {
        "properties" => matches!(key(1), Some("desired" | "reported")),
        "tags" => true,
        _ => false,
    };
    ok.then_some(steps)
}
